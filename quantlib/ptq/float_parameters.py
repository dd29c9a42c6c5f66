"""The float weight and bias a QuantSim layer had before PTQ passes rewrote them.

Sim-level passes change a layer's float parameters in place: AdaRound and AdaQuant write the
chosen grid values into the weight (:mod:`quantlib.ptq.weight_freeze` keeps the float weight as
the frozen quantizer's ``float_weight``), and bias correction and AdaQuant change the bias. The
FP32 reference that a later pass compares with (the sim with its quantizers off, or the float
twins of :mod:`quantlib.ptq.lockstep`) must still be the float model the sim was built from, not
one carrying an earlier pass's corrections: bias shifts computed for one quantization error
would otherwise leak into the targets of the next pass.

A pass that changes a bias calls :func:`keep_float_bias` first. It stores the bias (zeros for a
layer that has none) as the non-persistent buffer ``float_bias`` on the module, once: later
passes keep the first copy. Checkpoints, encodings and exports are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .weight_freeze import is_frozen

FLOAT_BIAS = "float_bias"


@torch.no_grad()
def keep_float_bias(module: nn.Module, channels: int) -> None:
    """Remember ``module``'s bias before a pass changes it (zeros of size ``channels`` if it has none).

    Only the first call stores a copy; later calls leave it.
    """
    if FLOAT_BIAS in module._buffers:
        return
    bias = module.bias.detach().clone() if module.bias is not None else module.weight.new_zeros(channels)
    module.register_buffer(FLOAT_BIAS, bias, persistent=False)


def original_weight(module: nn.Module) -> torch.Tensor:
    """The float weight the layer had before any pass wrote grid values into it."""
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None and is_frozen(quantizer):
        return quantizer.float_weight
    return module.weight


def original_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias the layer had before any pass changed it (None for a layer that never had one)."""
    return module._buffers.get(FLOAT_BIAS, module.bias)


@torch.no_grad()
def restore_float_parameters(module: nn.Module) -> None:
    """Write the original float weight and bias back into ``module`` (for float reference copies)."""
    module.weight.copy_(original_weight(module).to(module.weight.dtype))
    bias = original_bias(module)
    if module.bias is not None and bias is not None:
        module.bias.copy_(bias.to(module.bias.dtype))
