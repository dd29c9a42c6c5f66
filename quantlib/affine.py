"""Affine fixed-point arithmetic: ranges to scale/zero-point, rounding, and quantize-dequantize.

Conventions (shared with ONNX QuantizeLinear and torch.fake_quantize_*):
    q = clamp(round(x / scale) + zero_point, quant_min, quant_max)
    x_hat = (q - zero_point) * scale

Scales and zero points are stored per *group*: one group for per-tensor, one per channel of
``spec.axis`` for per-channel, and one per (channel, block of ``block_size`` input channels) for
per-block. :func:`group_view` flattens a tensor to ``[groups, elements]``; :func:`expand_qparam`
broadcasts a ``[groups]``-shaped parameter back onto the tensor's shape.
"""

from __future__ import annotations

import math
import warnings

import torch

from .spec import QuantizerSpec, QuantSpecError

# Smallest scale we allow, so a constant tensor (range 0) still gets a usable grid.
_MIN_SCALE = 1e-8


def block_count(shape: torch.Size | tuple[int, ...], spec: QuantizerSpec) -> int:
    """Number of blocks along dim 1 for per_block granularity (validates divisibility)."""
    if len(shape) < 2:
        raise QuantSpecError("granularity=per_block needs a tensor with an input-channel dimension (dim 1)")
    in_channels = shape[1]
    block = spec.block_size or 1
    if in_channels <= block:
        return 1
    if in_channels % block:
        raise QuantSpecError(
            f"block_size={block} does not divide the {in_channels} input channels; use a divisor of {in_channels}"
        )
    return in_channels // block


def num_groups(shape: torch.Size | tuple[int, ...], spec: QuantizerSpec) -> int:
    """How many (scale, zero_point) pairs a tensor of ``shape`` has under ``spec``."""
    if spec.granularity == "per_tensor":
        return 1
    axis = spec.axis % len(shape)
    if spec.granularity == "per_channel":
        return shape[axis]
    return shape[0] * block_count(shape, spec)


def group_view(x: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Reshape ``x`` to ``[groups, elements]`` so that row ``g`` holds the values of group ``g``."""
    if spec.granularity == "per_tensor":
        return x.reshape(1, -1)
    if spec.granularity == "per_channel":
        axis = spec.axis % x.dim()
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    blocks = block_count(x.shape, spec)
    per_block = x.shape[1] // blocks
    return x.reshape(x.shape[0], blocks, per_block, -1).reshape(x.shape[0] * blocks, -1)


def expand_qparam(param: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: QuantizerSpec) -> torch.Tensor:
    """Broadcast a ``[groups]`` parameter so it lines up with a tensor of ``shape``."""
    if spec.granularity == "per_tensor":
        return param.reshape(())
    ndim = len(shape)
    if spec.granularity == "per_channel":
        axis = spec.axis % ndim
        view = [1] * ndim
        view[axis] = shape[axis]
        return param.reshape(view)
    blocks = block_count(shape, spec)
    per_block = shape[1] // blocks
    expanded = param.reshape(shape[0], blocks).repeat_interleave(per_block, dim=1)
    return expanded.reshape(shape[0], shape[1], *([1] * (ndim - 2)))


def compute_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantizerSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn calibrated ranges into ``(scale float32, zero_point int32)``, both shaped like the ranges.

    - signed symmetric: zero_point 0, scale = max(|min|, |max|) / quant_max (AIMET and ONNX Runtime
      convention: the positive end is never clipped; the extra negative code is kept unless narrow).
    - unsigned symmetric: zero_point = quant_min, scale = max / (quant_max - quant_min).
    - asymmetric: the range is widened to include 0, scale = (max - min) / (quant_max - quant_min),
      zero_point = quant_min - round(min / scale), so that 0.0 is exactly representable.
    - power_of_two: the scale is rounded *up* to 2^k (never clips more than the float scale).
    """
    min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    qmin, qmax = spec.quant_min, spec.quant_max
    if spec.symmetric:
        if spec.signed:
            absmax = torch.maximum(-min_val, max_val)
            scale = absmax / qmax
        else:
            scale = max_val / float(qmax - qmin)
        scale = _finish_scale(scale, spec)
        zero_point = torch.full_like(scale, 0 if spec.signed else qmin, dtype=torch.int32)
        return scale, zero_point
    scale = _finish_scale((max_val - min_val) / float(qmax - qmin), spec)
    zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _finish_scale(scale: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    scale = scale.clamp_min(_MIN_SCALE)
    if spec.scale_type == "power_of_two":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale.to(torch.float32)


def round_with_mode(values: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round to integers with ``mode`` (half_even, half_up, half_down or stochastic). No gradient."""
    if mode == "half_even":
        return torch.round(values)
    if mode == "half_up":
        return torch.floor(values + 0.5)
    if mode == "half_down":
        return torch.ceil(values - 0.5)
    if mode == "stochastic":
        noise = torch.rand(values.shape, generator=generator, device=values.device, dtype=values.dtype)
        return torch.floor(values + noise)
    raise QuantSpecError(f"rounding={mode!r} is not supported")


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantizerSpec,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes of ``x`` (returned as an int32 tensor); ``scale``/``zero_point`` are [groups]."""
    s = expand_qparam(scale, x.shape, spec)
    z = expand_qparam(zero_point, x.shape, spec)
    q = round_with_mode(x / s, spec.rounding, generator) + z
    return q.clamp(spec.quant_min, spec.quant_max).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Float values of integer codes ``q``."""
    s = expand_qparam(scale, q.shape, spec)
    z = expand_qparam(zero_point, q.shape, spec)
    return (q.to(torch.float32) - z) * s


class _RoundSTE(torch.autograd.Function):
    """Rounding whose backward is the identity (the straight-through estimator, Bengio et al. 2013)."""

    @staticmethod
    def forward(ctx, values, mode, generator):  # noqa: D401 - autograd signature
        return round_with_mode(values, mode, generator)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantizerSpec,
                  generator: torch.Generator | None = None, exact: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x`` under ``spec`` (differentiable with the straight-through estimator).

    Gradients flow to ``x`` inside the clipping range and are zero outside it; they also flow to
    ``scale`` when it requires grad (LSQ-style range learning). The half-even per-tensor and
    per-channel cases use torch's fused kernels, which are what keeps simulation near FP32 speed;
    they multiply by 1/scale where ONNX QuantizeLinear divides by scale, which can flip a code
    that lies within an ulp of a rounding tie. ``exact=True`` divides, matching ONNX bit for bit
    (used for weights, whose quantized values are computed once and cached).
    """
    if spec.is_float:
        return _float_passthrough(x, spec.dtype)
    qmin, qmax = spec.quant_min, spec.quant_max
    learnable = scale.requires_grad
    if spec.rounding == "half_even" and not learnable and x.dtype == torch.float32 and not exact:
        if spec.granularity == "per_tensor":
            fast = _inference_qdq_per_tensor(x, scale, zero_point, qmin, qmax)
            if fast is not None:
                return fast
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
        if spec.granularity == "per_channel":
            return torch.fake_quantize_per_channel_affine(x, scale, zero_point, spec.axis % x.dim(), qmin, qmax)
    s = expand_qparam(scale, x.shape, spec)
    z = expand_qparam(zero_point, x.shape, spec).to(x.dtype)
    q = _RoundSTE.apply(x / s, spec.rounding, generator) + z
    q = torch.clamp(q, qmin, qmax)
    return (q - z) * s


def _inference_qdq_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                              qmin: int, qmax: int) -> torch.Tensor | None:
    """Per-tensor 8-bit QDQ through torch's int8 quantize/dequantize kernels, or None when it does not apply.

    It applies when no gradient is needed and the grid is exactly uint8 [0, 255] or int8
    [-128, 127]. The arithmetic is the fused fake-quantize kernel's (x * (1/scale), round half to
    even, + zero point, saturate; tests check bit equality, ties included), but the fused kernel
    also writes a gradient mask and is about 10x slower on a CPU, which made it most of the
    simulation overhead. The quantized-tensor API is deprecated in torch, so its absence falls
    back to the fused kernel and its warning is silenced here.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return None
    dtype = {(0, 255): torch.quint8, (-128, 127): torch.qint8}.get((qmin, qmax))
    quantize = getattr(torch, "quantize_per_tensor", None)
    if dtype is None or quantize is None:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        return quantize(x, scale.reshape(()), zero_point.reshape(()), dtype).dequantize()


def _float_passthrough(x: torch.Tensor, dtype: str) -> torch.Tensor:
    target = torch.float16 if dtype == "float16" else torch.bfloat16
    rounded = x.to(target).to(x.dtype)
    # straight-through: the value is the rounded one, the gradient is the identity
    return x + (rounded - x).detach()


def container_dtype(spec: QuantizerSpec) -> torch.dtype:
    """The smallest standard integer dtype that holds the grid (int8/uint8/int16/uint16)."""
    if spec.bitwidth <= 8:
        return torch.int8 if spec.signed else torch.uint8
    return torch.int16 if spec.signed else torch.uint16


def aimet_offset(zero_point: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """AIMET's ``offset`` field: the grid shifted to unsigned codes, x = (q_unsigned + offset) * scale."""
    shift = 2 ** (spec.bitwidth - 1) if spec.signed else 0
    return -(zero_point.to(torch.int64) + shift)


def zero_point_from_aimet_offset(offset: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Inverse of :func:`aimet_offset`."""
    shift = 2 ** (spec.bitwidth - 1) if spec.signed else 0
    return (-offset.to(torch.int64) - shift).to(torch.int32)


def is_power_of_two(value: float) -> bool:
    """True when ``value`` is exactly 2^k."""
    mantissa, _ = math.frexp(value)
    return value > 0 and mantissa == 0.5
