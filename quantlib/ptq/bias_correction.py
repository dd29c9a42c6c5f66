"""Bias correction (Nagel et al. 2019, DFQ, section 4.2): remove the mean output shift that
weight quantization adds to each layer.

Quantizing a layer's weight ``W`` to ``W~ = W + eps`` shifts its expected output by
``E[eps x] = eps E[x]``; subtracting that shift from the bias makes the quantized layer unbiased.

* ``empirical`` (needs calibration data): for every weight layer in forward order, compare the
  per-channel mean of the quantized layer's output (on quantized inputs, layers before it already
  corrected) with the FP32 model's (on FP32 inputs) and subtract the difference from the bias.
  This also removes the shift that activation quantization and earlier layers add. All layers are
  corrected in one FP32/quantized lockstep pass (:mod:`quantlib.ptq.lockstep`).
* ``analytical`` (data-free): ``E[x]`` of a layer's input is computed from the BatchNorm of the
  layer that produced it, captured before folding: the input is ``act(z)``, ``z ~ N(beta,
  gamma^2)``, and ``E[relu(z)]``/``E[relu6(z)]`` is the mean of a clipped normal. Average
  pooling and flattening of 1x1 maps keep the mean, so a classifier after global pooling is
  corrected too. Layers whose input does not come from such a layer (the first layer, layers
  after residual adds) are left alone and counted.

Both mutate the QuantSim's biases in place (a missing bias is created). The pipeline step then
recalibrates the activation encodings (``recalibrate``), as the shifted biases move them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..qmodules import QuantizedWeightMixin
from ..quantizer import FakeQuantizer
from . import channels
from .bn_stats import ChannelGaussian, expected_activation
from .float_parameters import keep_float_bias
from .layer_pairs import IDENTITY, activation_of, is_identity, is_zero_pad, module_call_counts
from .lockstep import LayerIO, run_lockstep
from .registry import PTQConfigError, PTQContext, PTQStep

KINDS = ("empirical", "analytical")


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """Settings of bias correction.

    Attributes:
        kind: empirical (calibration data) or analytical (BatchNorm statistics, data-free).
        num_samples: calibration samples used by empirical correction (None: all). Memory grows
            with it: every live activation is held for all samples, in FP32 and quantized.
        recalibrate: recompute the activation encodings after correcting.
    """

    kind: str = "empirical"
    num_samples: int | None = 128
    recalibrate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PTQConfigError(f"kind={self.kind!r} is not supported; use one of {', '.join(KINDS)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise PTQConfigError(f"num_samples={self.num_samples} must be at least 1, or null for all")


@dataclass
class BiasCorrectionResult:
    """``shifts``: per corrected layer, the amount subtracted from its bias; ``skipped``: reason -> count."""

    shifts: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        sizes = [float(s.abs().mean()) for s in self.shifts.values()]
        return {
            "corrected_layers": len(self.shifts),
            "skipped": dict(sorted(self.skipped.items())),
            "mean_abs_shift": round(sum(sizes) / len(sizes), 6) if sizes else 0.0,
            "max_abs_shift": round(max((float(s.abs().max()) for s in self.shifts.values()), default=0.0), 6),
        }


def _quantizes_weight(module: QuantizedWeightMixin) -> bool:
    spec = module.weight_quantizer.spec
    return spec.enabled and not spec.is_float


def channel_axis(module: nn.Module) -> int:
    """The channel axis of a layer's output: last for Linear, 1 for convolutions."""
    return -1 if isinstance(module, nn.Linear) else 1


@torch.no_grad()
def subtract_from_bias(module: nn.Module, shift: torch.Tensor) -> None:
    """``module.bias -= shift`` (creates a zero bias first when the layer has none).

    The bias before the first correction is kept (:func:`~quantlib.ptq.float_parameters.keep_float_bias`)
    so later passes still compare with the float model.
    """
    keep_float_bias(module, shift.numel())
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros_like(shift).to(module.weight))
    module.bias.sub_(shift.to(module.bias))


def channel_mean(values: list[torch.Tensor], axis: int) -> torch.Tensor:
    """Per-channel mean over every other axis of a list of batches."""
    total, count = None, 0
    for value in values:
        moved = value.movedim(axis, -1).reshape(-1, value.shape[axis])
        part = moved.double().sum(dim=0)
        total = part if total is None else total + part
        count += moved.shape[0]
    return (total / count).float()


def correct_bias_empirical(sim: Any, batches: list[tuple[torch.Tensor, ...]]) -> BiasCorrectionResult:
    """Empirical bias correction of every weight-quantized layer of ``sim`` (mutates its biases)."""
    result = BiasCorrectionResult()
    counts = module_call_counts(sim.model)

    def hook(io: LayerIO) -> None:
        if not _quantizes_weight(io.module):
            result.skipped["weight_not_quantized"] += 1
            return
        if counts[io.name] != 1:
            result.skipped["shared_module"] += 1
            return
        axis = channel_axis(io.module)
        shift = channel_mean(io.quantized_outputs(), axis) - channel_mean(io.fp32_outputs(), axis)
        subtract_from_bias(io.module, shift)
        result.shifts[io.name] = shift.cpu()

    run_lockstep(sim.model, batches, hook)
    return result


_MEAN_PRESERVING_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _keeps_channel_mean(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Average pooling, a spatial mean, or flattening a map whose spatial size is 1."""
    kind = type(modules[node.target]) if node.op == "call_module" else None
    if kind is not None and issubclass(kind, _MEAN_PRESERVING_MODULES):
        return True
    if node.op == "call_function" and node.target in (torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d,
                                                      torch.nn.functional.avg_pool1d, torch.nn.functional.adaptive_avg_pool1d):
        return True
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape_in, shape_out = (_shape(source) if source is not None else None), _shape(node)
    if shape_in is None or shape_out is None or len(shape_in) < 3:
        return False
    spatial_dims = set(range(2, len(shape_in)))
    if node.op == "call_method" and node.target == "mean" or node.op == "call_function" and node.target is torch.mean:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        return bool(dims) and {d % len(shape_in) for d in dims} == spatial_dims
    flat = (kind is nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target in ("flatten", "view", "reshape"))
    return flat and math.prod(shape_in[2:]) == 1 and len(shape_out) == 2 and shape_out[1] == shape_in[1]


def expected_layer_input(node: fx.Node, modules: dict[str, nn.Module],
                         stats: dict[str, ChannelGaussian]) -> torch.Tensor | str:
    """``E[x]`` per input channel of the layer called at ``node``, or the reason it is unknown.

    Walks back from the layer's input through quantizers, identity/dropout/zero padding, mean-
    preserving ops (before the activation only) and at most one activation to the producing layer.
    """
    current = node.args[0] if node.args else None
    activation = None
    while isinstance(current, fx.Node) and current.op in ("call_module", "call_function", "call_method"):
        module = modules.get(current.target) if current.op == "call_module" else None
        if isinstance(module, FakeQuantizer) or is_identity(current, modules) or is_zero_pad(current, modules):
            current = current.args[0]
            continue
        if module is not None and (isinstance(module, QuantizedWeightMixin) or current.target in stats):
            if current.target not in stats:
                return "no_bn_statistics"
            return expected_activation(stats[current.target], activation or IDENTITY)
        found = activation_of(current, modules)
        if found is not None and activation is None:
            activation = found
            current = current.args[0]
            continue
        if activation is None and _keeps_channel_mean(current, modules):
            current = current.args[0]
            continue
        return "input_not_from_batchnorm_layer"
    return "input_not_from_batchnorm_layer"


@torch.no_grad()
def correct_bias_analytical(sim: Any, stats: dict[str, ChannelGaussian]) -> BiasCorrectionResult:
    """Analytical (data-free) bias correction of ``sim`` from BatchNorm statistics (mutates biases)."""
    result = BiasCorrectionResult()
    modules = dict(sim.model.named_modules())
    counts = module_call_counts(sim.model)
    for node in sim.model.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, QuantizedWeightMixin):
            continue
        if not _quantizes_weight(module):
            result.skipped["weight_not_quantized"] += 1
            continue
        if counts[node.target] != 1:
            result.skipped["shared_module"] += 1
            continue
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            result.skipped["unsupported_layer"] += 1
            continue
        expected = expected_layer_input(node, modules, stats)
        if isinstance(expected, str):
            result.skipped[expected] += 1
            continue
        groups = getattr(module, "groups", 1)
        if expected.numel() != channels.in_channels(module.weight, groups):
            result.skipped["channel_mismatch"] += 1
            continue
        error = module.quantized_weight() - module.weight
        shift = channels.in_channel_response(error, groups, expected)
        subtract_from_bias(module, shift)
        result.shifts[node.target] = shift.cpu()
    return result


def _run_bias_correction(context: PTQContext, config: BiasCorrectionConfig) -> dict[str, Any]:
    sim = context.require_sim("bias_correction")
    if config.kind == "empirical":
        batches = context.input_batches(config.num_samples)
        result = correct_bias_empirical(sim, batches)
        summary = {**result.summary(), "samples": sum(b[0].shape[0] for b in batches)}
    else:
        result = correct_bias_analytical(sim, context.layer_output_stats)
        summary = result.summary()
    if config.recalibrate:
        context.recalibrate("bias_correction")
    summary["recalibrated"] = config.recalibrate
    return summary


STEPS = (
    PTQStep(name="bias_correction", config_cls=BiasCorrectionConfig, run=_run_bias_correction, phase="sim",
            description="correct the mean output shift of quantized layers (empirical or analytical)", corrective=True),
)
