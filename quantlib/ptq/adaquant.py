"""AdaQuant: layer-wise optimization of the weights (and bias) of a quantized layer against its
float outputs (Hubara et al. 2021, "Accurate Post Training Quantization With Small Calibration
Sets"; the "fast finetune" of Vitis AI).

For each weight layer of a calibrated QuantSim, in graph order, on cached inputs (quantized by the
model as optimized so far, or float with ``input_source="fp32"``) and float targets:

* the weight is parameterized as ``W = s * U`` (``s`` the quantization step of its channel), so
  one learning rate suits every layer: ``learning_rate`` is in units of quantization steps;
* the forward pass quantizes ``W`` with the layer's own weight quantizer, whose rounding passes
  gradients straight through (STE) inside the clipping range;
* Adam minimizes the mean squared error against the float outputs, over ``U`` and, with
  ``optimize_bias``, the bias (``bias_learning_rate`` in the bias's own units), with the
  learning rates decayed to zero along a cosine;
* every ``check_every`` steps (and before the first) the output MSE on the first cached chunk
  (on the held-out chunks with ``holdout_chunks``, which no step is drawn from) is measured and
  the best weights seen are kept. STE updates make weights hover around rounding
  boundaries and flip codes at random, which can leave a layer worse than round-to-nearest
  (always so when the input features are uncorrelated, where nearest rounding is optimal); keeping
  the best checked state means a layer never ends worse on that chunk than it started;
* the optimized weight and bias are written into the layer and the weight encoding is frozen
  (:mod:`quantlib.ptq.weight_freeze`), so a later calibration keeps the scale the weights were
  optimized for.

Pipeline step ``adaquant`` (phase "sim"): :class:`AdaQuantStepConfig` (the settings above plus
``recalibrate``) runs :func:`apply_adaquant` on ``context.sim``, then recomputes the activation
encodings for the new weights and biases.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import torch

from ..affine import expand_qparam, quantize
from ..quantsim import QuantSim
from .float_parameters import keep_float_bias
from .layer_cache import LayerData
from .layer_ops import ReconstructionBatches, reconstruction_mse
from .layerwise import LayerwiseConfig, LayerwiseStats, fit_and_holdout, loss_activation, run_layerwise
from .pass_config import check_int, check_positive, config_from_mapping
from .registry import PTQContext, PTQStep
from .weight_freeze import freeze_weight_encoding


@dataclass(frozen=True)
class AdaQuantConfig(LayerwiseConfig):
    """Settings of :func:`apply_adaquant` (caching, selection and input source as in
    :class:`~quantlib.ptq.layerwise.LayerwiseConfig`).

    Attributes:
        num_iterations: Adam steps per layer.
        learning_rate: weight learning rate, in quantization steps of each output channel.
        optimize_bias: also optimize the bias (layers without a bias are left without one).
        bias_learning_rate: bias learning rate (in the bias's units).
        check_every: steps between checks of the output MSE on the first chunk, or on the held-out
            chunks with ``holdout_chunks`` (best state kept).
    """

    num_iterations: int = 500
    learning_rate: float = 1e-3
    optimize_bias: bool = True
    bias_learning_rate: float = 1e-3
    check_every: int = 25

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_iterations", self.num_iterations, 0)
        check_positive("learning_rate", self.learning_rate)
        check_positive("bias_learning_rate", self.bias_learning_rate)
        check_int("check_every", self.check_every, 1)


@dataclass
class AdaQuantLayerResult:
    """What AdaQuant did to one layer: output MSE against the float targets before and after, on
    the held-out chunks with ``holdout_chunks`` (where the best iterate is also chosen) and on the
    first cached chunk otherwise, and the fraction of weight codes that changed."""

    name: str
    bitwidth: int
    iterations: int
    mse_before: float
    mse_after: float
    codes_changed: float
    seconds: float


@dataclass
class AdaQuantResult:
    """Per-layer results plus the run's totals; :meth:`to_dict` is JSON-ready."""

    layers: list[AdaQuantLayerResult]
    stats: LayerwiseStats
    config: AdaQuantConfig

    def to_dict(self) -> dict[str, Any]:
        return {"method": "adaquant", "config": asdict(self.config), **self.stats.to_dict(),
                "layers": [asdict(layer) for layer in self.layers]}

    def summary(self) -> dict[str, Any]:
        """Compact JSON-able summary for a run record: totals and per-layer MSE before/after."""
        return {**self.stats.to_dict(), "layers": len(self.layers),
                "layers_improved": sum(layer.mse_after < layer.mse_before for layer in self.layers),
                "mse_before_sum": sum(layer.mse_before for layer in self.layers),
                "mse_after_sum": sum(layer.mse_after for layer in self.layers),
                "per_layer": [{"name": layer.name, "bitwidth": layer.bitwidth, "mse_before": layer.mse_before,
                               "mse_after": layer.mse_after, "codes_changed": round(layer.codes_changed, 5),
                               "seconds": round(layer.seconds, 2)} for layer in self.layers]}


def apply_adaquant(sim: QuantSim, data: Iterable, config: AdaQuantConfig | Mapping[str, Any] | None = None,
                   *, progress: bool = True) -> AdaQuantResult:
    """Optimize the weights (and biases) of every selected layer of ``sim`` (mutated in place).

    ``sim`` must be calibrated; ``data`` yields inputs or (input, label) pairs. Unknown config keys
    raise :class:`~quantlib.ptq.pass_config.PassConfigError`.
    """
    config = config_from_mapping(AdaQuantConfig, config, "adaquant")
    layers, stats = run_layerwise(sim, data, config, lambda layer, gen: adaquant_layer(layer, config, gen),
                                  method="adaquant", progress=progress)
    return AdaQuantResult(layers=layers, stats=stats, config=config)


def adaquant_layer(layer: LayerData, config: AdaQuantConfig, generator: torch.Generator) -> AdaQuantLayerResult:
    """Optimize one layer's weight (and bias) on its cached data, write them and freeze the encoding."""
    start = time.perf_counter()
    module = layer.module
    wq = module.weight_quantizer
    weight = module.weight.detach().float()
    scale = expand_qparam(wq.scale, weight.shape, wq.spec)
    bias0 = module.bias.detach().float() if module.bias is not None else None
    steps = torch.nn.Parameter(weight / scale)
    bias = torch.nn.Parameter(bias0.clone()) if bias0 is not None and config.optimize_bias else None

    activation = loss_activation(layer, config)
    fit_chunks, holdout = fit_and_holdout(layer, config.holdout_chunks)

    def check() -> float:
        with torch.no_grad():
            return reconstruction_mse(layer, wq(steps * scale), bias if bias is not None else bias0,
                                      holdout or (0,), activation)

    mse_before = best_mse = check()
    best = (steps.detach().clone(), bias.detach().clone() if bias is not None else bias0)
    groups = [{"params": [steps], "lr": config.learning_rate}]
    if bias is not None:
        groups.append({"params": [bias], "lr": config.bias_learning_rate})
    batches = ReconstructionBatches(layer, config.crop, generator, activation, config.input_drop, fit_chunks)
    total = config.num_iterations
    with torch.inference_mode(False), torch.enable_grad():
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / total)))
        for iteration in range(1, total + 1):
            x, target = batches.sample()
            out = batches.forward(x, wq(steps * scale), bias if bias is not None else bias0)
            loss = (out - target).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if iteration % config.check_every == 0 or iteration == total:
                mse = check()
                if mse < best_mse:
                    best_mse = mse
                    best = (steps.detach().clone(), bias.detach().clone() if bias is not None else bias0)
    with torch.no_grad():
        codes_before = _codes(wq, weight)
        new_weight = best[0] * scale
        changed = float((_codes(wq, new_weight) != codes_before).float().mean())
        freeze_weight_encoding(module, "adaquant")
        module.weight.copy_(new_weight.to(module.weight.dtype))
        if bias is not None:
            keep_float_bias(module, bias.numel())
            module.bias.copy_(best[1].to(module.bias.dtype))
    return AdaQuantLayerResult(name=layer.name, bitwidth=wq.spec.bitwidth, iterations=total,
                               mse_before=mse_before, mse_after=best_mse, codes_changed=changed,
                               seconds=time.perf_counter() - start)


def _codes(quantizer, weight: torch.Tensor) -> torch.Tensor:
    return quantize(weight, quantizer.scale, quantizer.zero_point, quantizer.spec)


@dataclass(frozen=True)
class AdaQuantStepConfig(AdaQuantConfig):
    """Settings of the ``adaquant`` pipeline step: those of :class:`AdaQuantConfig` plus

    Attributes:
        recalibrate: recompute the activation encodings afterwards (weight encodings stay frozen).
    """

    recalibrate: bool = True


def _run_adaquant(context: PTQContext, config: AdaQuantStepConfig) -> dict[str, Any]:
    sim = context.require_sim("adaquant")
    result = apply_adaquant(sim, context.calibration_data, config, progress=context.progress)
    if config.recalibrate:
        context.recalibrate("adaquant")
    return {**result.summary(), "recalibrated": config.recalibrate}


STEPS = (
    PTQStep(name="adaquant", config_cls=AdaQuantStepConfig, run=_run_adaquant, phase="sim",
            description="optimize each layer's quantized weights and bias against its float output (Hubara et al. 2021)"),
)
