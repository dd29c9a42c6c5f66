"""The compression stage of ``quantzoo run``: recipe ``compress`` group -> compressed FP32 model + record block.

:func:`run_compression` is called by :mod:`zoo.cli.run` after the FP32 evaluation when
``compress.steps`` is non-empty. It builds what :func:`quantlib.compress.pipeline.compress_model`
needs from the recipe (scoring data for greedy selection from the labelled *calibration* split,
calibration batches for channel pruning, fine-tuning data and :class:`quantlib.qat.TrainConfig`),
runs the steps, writes the per-layer sensitivity PNG into the record folder and returns the
compressed model with a JSON-able summary for the run record's ``compress`` block (schema in
:mod:`zoo.cli.schema_compress`; fields in :func:`run_compression`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from evaluators import Preprocessing, TorchBackend, build_dataset, evaluate_classification
from quantlib.affine import quantize
from quantlib.compress.cost import layer_costs, total_cost
from quantlib.compress.pipeline import CompressContext, compress_model
from quantlib.compress.plot import save_sensitivity_plot
from quantlib.compress.prepare import prepare_for_compression
from quantlib.compress.preserve import structure_counts
from quantlib.compress.size import float_sizes, quantized_sizes
from quantlib.compress.selection import SelectionError
from quantlib.compress.steps import CompressConfigError, parse_step
from quantlib.qat import TrainConfig, TrainConfigError
from quantlib.qat.data import cached, training_loader
from quantlib.quantsim import QuantSim
from zoo.registry import default_registry

from .run import RunConfigError, quant_config

SENSITIVITY_PNG = "compression_sensitivity.png"
SCORES = ("top1", "neg_loss")


class CompressStageError(RunConfigError):
    """A ``compress.*`` setting is wrong; the message names it and the fix (a one-line error in ``quantzoo run``)."""


def _first(dataset, num_samples: int | None):
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    if num_samples < 1:
        raise CompressStageError(f"compress.greedy.num_samples={num_samples} must be >= 1 or null")
    return Subset(dataset, range(num_samples))


def _eval_fn(dataset, greedy: dict[str, Any], device):
    if greedy["score"] not in SCORES:
        raise CompressStageError(f"compress.greedy.score={greedy['score']!r} is not supported; use one of {', '.join(SCORES)}")

    def score(model: nn.Module) -> float:
        result = evaluate_classification(TorchBackend(model, device), dataset, batch_size=greedy["batch_size"], progress=False)
        return result.top1 if greedy["score"] == "top1" else -result.loss

    return score


def _train_data(resolved: dict[str, Any], finetune: dict[str, Any]):
    data = resolved["data"]
    if finetune["split"] == data["eval_split"]:
        raise CompressStageError(f"compress.finetune.split={finetune['split']!r} is the eval split; fine-tune on train or calibration data")
    card = default_registry().get(resolved["model"]["name"])
    dataset = build_dataset(data["name"], finetune["split"], root=data.get("root"), num_samples=finetune["num_samples"],
                            preprocessing=Preprocessing(**card.preprocessing.as_kwargs()), seed=data.get("seed", 0))
    try:
        config = TrainConfig.from_dict({"seed": resolved["seed"], **finetune["train"]})
    except TrainConfigError as err:
        raise CompressStageError(f"compress.finetune.train: {err}") from None
    return training_loader(cached(dataset), finetune["batch_size"], seed=config.seed), config


def _quantized(model: nn.Module, example: torch.Tensor, resolved: dict[str, Any]) -> dict[str, int]:
    """Integer sizes of ``model`` under the recipe's quant group (weight encodings only: no activation calibration)."""
    sim = QuantSim(model, example, quant_config(resolved["quant"]))
    return quantized_sizes(sim)


def _layers(model: nn.Module, example: torch.Tensor) -> dict[str, dict[str, Any]]:
    costs = layer_costs(model, example)
    counts = structure_counts(model)
    return {name: {"macs": costs[name].macs, "params": costs[name].params, **counts[name]} for name in costs}


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def run_compression(fp32_model: nn.Module, resolved: dict[str, Any], calibration_dataset, example_input: torch.Tensor,
                    record_dir: str | Path, device, progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Compress ``fp32_model`` (not mutated) as ``resolved["compress"]`` says; returns (model, summary).

    The model is a BatchNorm-folded ``fx.GraphModule`` in eval mode. The summary holds:
    ``steps`` (per step: method, greedy-search table and chosen per-layer ratios, per-layer ranks or
    kept channels, fine-tuning history, seconds), ``structure`` (what QAT must preserve, for
    ``qat.preserve``), ``cost`` (MACs and parameters before/after and their ratios), ``size``
    (float32 file and weight bytes, integer weight bytes and their gzip sizes under the recipe's
    quant group, before/after, and the ratios), ``layers`` (per conv/linear layer of the compressed
    model: MACs, params, zeros, sparsity, unique values) and ``sensitivity_plot`` (the PNG written
    into ``record_dir``, or null when no step measured sensitivities).
    """
    conf = resolved["compress"]
    try:
        steps = [parse_step(step, index) for index, step in enumerate(conf["steps"])]
    except CompressConfigError as err:
        raise CompressStageError(str(err)) from None
    example = example_input.to(next(fp32_model.parameters()).device)
    greedy = conf["greedy"]
    # decoded once: greedy scoring and the re-fit read these images once per candidate / per layer
    scoring = cached(_first(calibration_dataset, greedy["num_samples"]))
    refit = DataLoader(cached(_first(calibration_dataset, conf["refit_samples"])), batch_size=conf["refit_batch_size"],
                       shuffle=False)
    train_data, train_config = (_train_data(resolved, conf["finetune"]) if any(s.finetune for s in steps) else (None, None))
    ctx = CompressContext(example_input=example, calibration=refit, eval_fn=_eval_fn(scoring, greedy, device),
                          train_data=train_data, train_config=train_config, sensitivity=greedy["sensitivity"],
                          device=device, progress=progress)
    try:
        result = compress_model(fp32_model, steps, ctx)
    except (CompressConfigError, SelectionError) as err:
        raise CompressStageError(f"compress.steps: {err}") from None
    model = result.model
    baseline = prepare_for_compression(fp32_model, example)  # same MACs as the FP32 model, BatchNorms folded
    before, after = total_cost(baseline, example), total_cost(model, example)
    size_before = {**float_sizes(baseline), **_quantized(baseline, example, resolved)}
    size_after = {**float_sizes(model), **_quantized(model, example, resolved)}
    plot = None
    if result.panels:
        score_name = "top-1 %" if greedy["score"] == "top1" else "-loss"
        plot = str(save_sensitivity_plot(result.panels, Path(record_dir) / SENSITIVITY_PNG, score_name=score_name))
    summary = {
        "steps": result.steps,
        "structure": list(result.structure),
        "cost": {"before": before, "after": after, "macs_ratio": _ratio(after["macs"], before["macs"]),
                 "params_ratio": _ratio(after["params"], before["params"])},
        "size": {"before": size_before, "after": size_after,
                 "file_int_gzip_ratio": _ratio(size_after["file_int_gzip_bytes"], size_before["file_int_gzip_bytes"]),
                 "file_int_gzip_vs_fp32_gzip": _ratio(size_after["file_int_gzip_bytes"], size_before["file_fp32_gzip_bytes"]),
                 "weights_int_gzip_vs_fp32": _ratio(size_after["weights_int_gzip_bytes"], size_before["weights_fp32_bytes"])},
        "layers": _layers(model, example),
        "scoring": {"split": resolved["data"]["calibration_split"], "num_samples": len(scoring), "score": greedy["score"]},
        "sensitivity_plot": plot,
    }
    return model.eval(), summary


@torch.no_grad()
def quantized_structure(sim: QuantSim, summary: dict[str, Any]) -> dict[str, Any]:
    """The record's ``compress.quantized`` block, measured on the final simulated model (after QAT).

    Per conv/linear layer of ``sim.model``: zeros, sparsity and unique values of the float weights
    (what ``qat.preserve`` keeps exactly), and unique integer codes; the integer sizes of
    :func:`quantlib.compress.size.quantized_sizes`; and ``file_int_gzip_vs_fp32_gzip``, the gzipped
    integer checkpoint over the gzipped FP32 file of the uncompressed model from ``summary``
    (:func:`run_compression`'s). Nothing is mutated.
    """
    layers = structure_counts(sim.model)
    for name, module in sim.weight_modules().items():
        wq = module.weight_quantizer
        if name in layers and wq.spec.enabled and not wq.spec.is_float and wq.has_encoding:
            codes = quantize(module.weight.detach(), wq.scale, wq.zero_point, wq.spec)
            layers[name]["unique_codes"] = int(torch.unique(codes).numel())
    size = quantized_sizes(sim)
    before = summary["size"]["before"]
    return {"layers": layers, "size": size,
            "file_int_gzip_vs_fp32_gzip": _ratio(size["file_int_gzip_bytes"], before["file_fp32_gzip_bytes"]),
            "file_int_gzip_ratio": _ratio(size["file_int_gzip_bytes"], before["file_int_gzip_bytes"])}
