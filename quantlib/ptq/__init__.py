"""Post-training quantization techniques and the pipeline that applies them around QuantSim.

Model-level passes (on the FP32 model, before QuantSim): BatchNorm folding and re-estimation
(:mod:`.bn_fold`, :mod:`.bn_reestimation`), cross-layer equalization (:mod:`.cle`) and high-bias
absorption (:mod:`.high_bias_absorption`). Sim-level passes (on a calibrated QuantSim): bias
correction (:mod:`.bias_correction`). :func:`quantlib.ptq.pipeline.prepare_quantsim` runs a list
of them by name; :mod:`quantlib.ptq.pipeline` documents how to add a step.
"""
