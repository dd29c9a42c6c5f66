"""Straight-through estimators used by range learning.

* :func:`round_ste`: round to integers (half to even, or the spec's rounding mode) in the forward
  pass, identity gradient in the backward pass (Bengio et al. 2013, "Estimating or propagating
  gradients through stochastic neurons").
* :func:`clamp_ste`: clamp whose gradient passes where ``lo <= x <= hi`` (the grid's end codes
  included, as torch's fused fake-quantize kernels do; ``torch.clamp`` itself blocks the gradient
  of values exactly on a bound).
* :func:`scale_gradient`: the identity in the forward pass, gradient multiplied by ``factor`` in
  the backward pass (LSQ's step-size gradient scale, Esser et al. 2020, "Learned step size
  quantization", section 2.2).
* :func:`fake_quantize_ste`: quantize-dequantize built from the three, differentiable in the
  input, the scale and a float zero point (the LSQ/LSQ+ gradients, see
  :mod:`quantlib.qat.range_learning`).

All are pure functions of their inputs; nothing is mutated.
"""

from __future__ import annotations

import torch

from ..affine import expand_qparam, round_with_mode
from ..spec import QuantizerSpec


def round_ste(x: torch.Tensor, mode: str = "half_even") -> torch.Tensor:
    """``x`` rounded with ``mode`` (see :func:`quantlib.affine.round_with_mode`); the gradient is the identity."""
    return x + (round_with_mode(x.detach(), mode) - x).detach()


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x`` clamped to ``[lo, hi]``; gradient 1 inside the closed interval, 0 outside it."""
    inside = (x >= lo) & (x <= hi)
    return torch.where(inside, x, x.detach().clamp(lo, hi))


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, with ``d/dx`` multiplied by ``factor`` in the backward pass."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """``(clamp(round(x / s) + z, q_min, q_max) - z) * s`` with straight-through rounding and clipping.

    ``scale`` and ``zero_point`` are ``[groups]`` tensors (``zero_point`` float, integer-valued);
    gradients reach ``x`` inside the grid, and ``scale``/``zero_point`` when they require grad.
    """
    s = expand_qparam(scale, x.shape, spec)
    z = expand_qparam(zero_point, x.shape, spec).to(x.dtype)
    q = clamp_ste(round_ste(x / s, spec.rounding) + z, spec.quant_min, spec.quant_max)
    return (q - z) * s
