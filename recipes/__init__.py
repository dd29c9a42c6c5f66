"""Hydra recipes: config groups (model, data, quant, ptq, evaluator) and one file per model and recipe."""
