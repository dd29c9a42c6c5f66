"""Custom torch ops used only while exporting, and their ONNX translations.

During export, quantizers call these ops instead of fake-quantizing; ``torch.onnx.export``
(dynamo) lowers them through :func:`translation_table` to standard ONNX operators:

    quantzoo::quantize_dequantize -> QuantizeLinear -> DequantizeLinear
    quantzoo::dequantize          -> DequantizeLinear (weights and biases stored as integers)
    quantzoo::float_roundtrip     -> Cast(float16/bfloat16) -> Cast(float)

Each op also has a real eager implementation, so an exporting model still computes the same
numbers when run in torch.
"""

from __future__ import annotations

import torch
from onnxscript import opset21 as op

_ONNX_FLOAT16, _ONNX_BFLOAT16, _ONNX_FLOAT = 10, 16, 1


def _along(param: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if param.dim() == 0:
        return param
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


@torch.library.custom_op("quantzoo::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear: saturates to the range of ``zero_point``'s dtype."""
    info = torch.iinfo(zero_point.dtype)
    s = _along(scale, x.dim(), axis)
    z = _along(zero_point.to(torch.float32), x.dim(), axis)
    q = torch.clamp(torch.round(x / s) + z, info.min, info.max)
    return (q - z) * s


@quantize_dequantize.register_fake
def _quantize_dequantize_fake(x, scale, zero_point, axis):
    return torch.empty_like(x)


@torch.library.custom_op("quantzoo::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """DequantizeLinear of integer ``q``: per-tensor, per-axis, or blocked along ``axis``."""
    if block_size > 0:
        s = scale.repeat_interleave(block_size, dim=axis)
        z = zero_point.to(torch.float32).repeat_interleave(block_size, dim=axis)
        return (q.to(torch.float32) - z) * s
    s = _along(scale, q.dim(), axis)
    z = _along(zero_point.to(torch.float32), q.dim(), axis)
    return (q.to(torch.float32) - z) * s


@dequantize.register_fake
def _dequantize_fake(q, scale, zero_point, axis, block_size):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("quantzoo::float_roundtrip", mutates_args=())
def float_roundtrip(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round ``x`` through float16 or bfloat16 and back."""
    target = torch.float16 if dtype == "float16" else torch.bfloat16
    return x.to(target).to(x.dtype)


@float_roundtrip.register_fake
def _float_roundtrip_fake(x, dtype):
    return torch.empty_like(x)


def _quantize_dequantize_onnx(x, scale, zero_point, axis: int):
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, axis=axis), scale, zero_point, axis=axis)


def _dequantize_onnx(q, scale, zero_point, axis: int, block_size: int):
    if block_size > 0:
        return op.DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block_size)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _float_roundtrip_onnx(x, dtype: str):
    target = _ONNX_FLOAT16 if dtype == "float16" else _ONNX_BFLOAT16
    return op.Cast(op.Cast(x, to=target), to=_ONNX_FLOAT)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    return {
        torch.ops.quantzoo.quantize_dequantize.default: _quantize_dequantize_onnx,
        torch.ops.quantzoo.dequantize.default: _dequantize_onnx,
        torch.ops.quantzoo.float_roundtrip.default: _float_roundtrip_onnx,
    }
