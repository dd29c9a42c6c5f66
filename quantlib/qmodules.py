"""Weight-quantized versions of Conv1d, Conv2d, ConvTranspose2d and Linear.

Each class subclasses its float module, shares its parameters, and adds a ``weight_quantizer``.
In inference (no gradient needed) the quantize-dequantized weight is cached and refreshed only
when the weight or the encoding changes, so weight quantization costs nothing per batch.
During export the weight is stored as integers (int8/int16 codes) and biases as int32 codes at
scale ``input_scale * weight_scale``, the layout ONNX Runtime's integer kernels expect.

With ``integer_arithmetic`` on (QuantSim ``arithmetic: integer``), a Conv1d/Conv2d/Linear whose
input and output quantizers are known 8-bit per-tensor grids computes as an integer kernel
(ONNX Runtime's QLinearConv/QGemm) does: the accumulator ``sum((x_q - x_zp) * w_q) + bias_q`` is
exact (integer values held in float32, exact while partial sums stay below 2^24), then it is
requantized by the float32 multiplier ``x_scale * w_scale / y_scale`` with round-half-even and
saturated to the output grid. The float path instead sums dequantized values, whose rounding
differs from the integer kernel near ties; the integer path removes that difference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import onnx_ops
from .affine import container_dtype, expand_qparam, quantize
from .quantizer import FakeQuantizer
from .spec import QuantizerSpec


class IntegerPlan(NamedTuple):
    """What an integer kernel needs, computed once per weight/encoding version."""

    weight_codes: torch.Tensor  # w_q - w_zp, float32
    bias_codes: torch.Tensor | None  # int32 codes at x_scale * w_scale, float32
    multiplier: torch.Tensor  # x_scale * w_scale / y_scale, float32, per output channel
    in_scale: torch.Tensor
    out_scale: torch.Tensor
    lo: float  # output grid bounds minus the zero point
    hi: float
    output_on_grid: bool  # the clamps before the output quantizer keep grid values on the grid


class QuantizedWeightMixin:
    """Shared weight-quantization logic. Subclasses set ``weight_axis`` and define ``forward``."""

    weight_axis = 0
    weight_quantizer: FakeQuantizer
    supports_integer_kernel = False  # True where ``_accumulate`` is defined

    def _init_quant(self, spec: QuantizerSpec, name: str) -> None:
        if spec.granularity != "per_tensor":
            spec = spec.replace(axis=self.weight_axis)
        self.weight_quantizer = FakeQuantizer(spec, name=f"{name}.weight")
        self.weight_quantizer.exact = True  # cached, so the exact (ONNX) arithmetic is free
        self.input_quantizer_ref: tuple[FakeQuantizer] | None = None  # tuple: not a submodule
        self.output_quantizer_ref: tuple[FakeQuantizer] | None = None
        # the clamping ops (ReLU, Clip, ...) between this layer and its output quantizer, as callables
        self.output_clamps: tuple = ()
        self.integer_arithmetic = False
        self._integer_cache = None
        self._cache_key = None
        self._cached_weight = None
        self._bias_cache = None
        self._export_tensors = None

    @classmethod
    def from_float(cls, module: nn.Module, spec: QuantizerSpec, name: str):
        """Wrap ``module`` (sharing its parameters) with a weight quantizer built from ``spec``."""
        q = cls.__new__(cls)
        q.__dict__ = module.__dict__.copy()
        q._parameters = module._parameters.copy()
        q._buffers = module._buffers.copy()
        q._modules = module._modules.copy()
        q._init_quant(spec, name)
        return q

    def calibrate_weight(self) -> None:
        """Set the weight encoding from the current weight."""
        self.weight_quantizer.calibrate_from(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the integer kernel sees it (cached when no gradient is needed)."""
        wq = self.weight_quantizer
        if not wq.spec.enabled:
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return wq(self.weight)
        key = (self.weight._version, id(self.weight), wq.version, self.weight.device)
        if key != self._cache_key:
            with torch.no_grad():
                self._cached_weight = wq(self.weight)
            self._cache_key = key
        return self._cached_weight

    # -- export --------------------------------------------------------------------------------
    def begin_export(self) -> None:
        """Precompute the integer weight (and int32 bias where the input scale is known)."""
        wq = self.weight_quantizer
        self._export_tensors = None
        if not wq.spec.enabled or wq.spec.is_float:
            return
        spec = wq.spec
        codes = quantize(self.weight.detach(), wq.scale, wq.zero_point, spec).to(container_dtype(spec))
        zero_point = wq.zero_point.to(container_dtype(spec))
        scale = wq.scale
        block_size = 0
        axis = self.weight_axis
        if spec.granularity == "per_tensor":
            scale, zero_point, axis = scale.reshape(()), zero_point.reshape(()), 0
        elif spec.granularity == "per_block":
            blocks = wq.scale.numel() // self.weight.shape[0]
            block_size = self.weight.shape[1] // blocks
            trailing = self.weight.shape[2:]
            scale = scale.reshape(self.weight.shape[0], blocks, *([1] * len(trailing))).expand(-1, -1, *trailing).contiguous()
            zero_point = zero_point.reshape(scale.shape[:2] + (1,) * len(trailing)).expand_as(scale).contiguous()
            axis = 1
        bias = self._export_bias(spec)
        self._export_tensors = (codes, scale.detach().clone(), zero_point.clone(), axis, block_size, bias)

    def _export_bias(self, weight_spec: QuantizerSpec):
        inq = self.input_quantizer_ref[0] if self.input_quantizer_ref else None
        if (self.bias is None or inq is None or not inq.spec.enabled or inq.spec.is_float
                or not inq.has_encoding or inq.calibrating or not self.weight_quantizer.has_encoding
                or inq.spec.granularity != "per_tensor" or weight_spec.granularity == "per_block"
                or inq.spec.bitwidth > 8 or weight_spec.bitwidth > 8):
            return None
        w_scale = self.weight_quantizer.scale
        if w_scale.numel() not in (1, self.bias.numel()):  # grouped ConvTranspose: channel g*k+j uses scale j
            w_scale = w_scale.repeat(self.bias.numel() // w_scale.numel())
        bias_scale = (inq.scale.reshape(()) * w_scale).detach().reshape(-1)
        if bias_scale.numel() == 1:
            bias_scale = bias_scale.expand(self.bias.numel()).contiguous()
        codes = torch.round(self.bias.detach() / bias_scale).clamp(-(2**31), 2**31 - 1).to(torch.int32)
        return codes, bias_scale.clone(), torch.zeros_like(codes)

    def end_export(self) -> None:
        self._export_tensors = None

    def _simulated_bias(self) -> torch.Tensor | None:
        """The bias rounded to the int32 grid the integer kernels use (straight-through gradient)."""
        bias = self.bias
        if bias is None or not self.weight_quantizer.spec.enabled or self.weight_quantizer.spec.is_float:
            return bias
        inq = self.input_quantizer_ref[0] if self.input_quantizer_ref else None
        needs_grad = torch.is_grad_enabled() and bias.requires_grad
        key = (bias._version, id(bias), self.weight_quantizer.version, inq.version if inq else None,
               inq.calibrating if inq else None)
        if not needs_grad and self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        quantized = self._export_bias(self.weight_quantizer.spec)
        if quantized is None:
            result = bias
        else:
            codes, scale, _ = quantized
            result = bias + (codes.to(bias.dtype) * scale - bias).detach()
        if not needs_grad:  # a tuple, so a Parameter result is not registered as a submodule parameter
            self._bias_cache = (key, result)
        return result

    # -- integer kernel ------------------------------------------------------------------------
    def integer_kernel_ready(self) -> bool:
        """True when forward runs as an integer kernel now (see the module docstring)."""
        return self._integer_plan() is not None

    def _integer_plan(self):
        """The :class:`IntegerPlan` (cached per weight, bias and encoding version), or None when the float path runs."""
        if not (self.integer_arithmetic and self.supports_integer_kernel) or self.training:
            return None
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return None
        wq = self.weight_quantizer
        inq = self.input_quantizer_ref[0] if self.input_quantizer_ref else None
        outq = self.output_quantizer_ref[0] if self.output_quantizer_ref else None
        if inq is None or outq is None or wq.exporting or not wq.active or not wq.has_encoding:
            return None
        if wq.spec.is_float or wq.spec.bitwidth > 8 or wq.spec.granularity == "per_block":
            return None
        for q in (inq, outq):
            if not q.active or q.exporting or not q.has_encoding or q.spec.is_float or q.spec.bitwidth > 8 \
                    or q.spec.granularity != "per_tensor":
                return None
        bias = self.bias
        key = (self.weight._version, id(self.weight), None if bias is None else (bias._version, id(bias)),
               wq.version, inq.version, outq.version, self.weight.device)
        if self._integer_cache is not None and self._integer_cache[0] == key:
            return self._integer_cache[1]
        plan = self._build_integer_plan(wq, inq, outq)
        self._integer_cache = (key, plan)
        return plan

    @torch.no_grad()
    def _build_integer_plan(self, wq: FakeQuantizer, inq: FakeQuantizer, outq: FakeQuantizer):
        weight = self.weight.detach()
        codes = quantize(weight, wq.scale, wq.zero_point, wq.spec).float()
        codes = codes - expand_qparam(wq.zero_point.float(), weight.shape, wq.spec)
        bias_codes = None
        if self.bias is not None:
            quantized_bias = self._export_bias(wq.spec)
            if quantized_bias is None:
                return None
            bias_codes = quantized_bias[0].float()
        in_scale, out_scale = inq.scale.reshape(()), outq.scale.reshape(())
        multiplier = (in_scale * wq.scale.reshape(-1)) / out_scale  # float32, as ORT computes it
        zero_point = float(outq.zero_point.reshape(()))
        lo, hi = outq.spec.quant_min - zero_point, outq.spec.quant_max - zero_point
        return IntegerPlan(codes, bias_codes, self._channel_view(multiplier), in_scale, out_scale, lo, hi,
                           self._clamps_keep_grid(out_scale, lo, hi))

    def _clamps_keep_grid(self, out_scale: torch.Tensor, lo: float, hi: float) -> bool:
        """True when the clamps before the output quantizer map every grid value onto the grid.

        Clamps are monotone, so it is enough that each end of the grid maps to itself or to 0
        (which is on the grid): then the output quantizer would return its input unchanged.
        """
        ends = torch.tensor([lo, hi], device=out_scale.device) * out_scale
        clamped = ends.clone()  # a clamp may work in place (nn.ReLU(inplace=True))
        for clamp in self.output_clamps:
            clamped = clamp(clamped)
        return bool(((clamped == ends) | (clamped == 0)).all())

    def integer_output_on_grid(self) -> bool:
        """True when forward runs as an integer kernel whose output, after the clamps in
        ``output_clamps``, is already on the output quantizer's grid (so that quantizer may pass
        it through)."""
        plan = self._integer_plan()
        return plan is not None and plan.output_on_grid

    def _integer_forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        # the accumulator is a fresh tensor, so requantization works in place on it
        accumulator = self._accumulate(x.div(plan.in_scale).round_(), plan.weight_codes, plan.bias_codes)
        return accumulator.mul_(plan.multiplier).round_().clamp_(plan.lo, plan.hi).mul_(plan.out_scale)

    def _channel_view(self, per_channel: torch.Tensor) -> torch.Tensor:
        """``per_channel`` shaped to broadcast over this layer's output channels."""
        return per_channel.reshape(-1, *([1] * (self.weight.dim() - 2)))

    def _accumulate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._integer_plan()
        if plan is not None:
            return self._integer_forward(x, plan)
        weight, bias = self._weight_and_bias()
        return self._accumulate(x, weight, bias)

    def _weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._export_tensors is None:
            weight = self.quantized_weight()
            if self.weight_quantizer.exporting and self.weight_quantizer.spec.is_float:
                weight = onnx_ops.float_roundtrip(self.weight, self.weight_quantizer.spec.dtype)
            return weight, self._simulated_bias()
        codes, scale, zero_point, axis, block_size, bias = self._export_tensors
        weight = onnx_ops.dequantize(codes, scale, zero_point, axis, block_size)
        if bias is None:
            return weight, self.bias
        return weight, onnx_ops.dequantize(bias[0], bias[1], bias[2], 0, 0)


class QuantConv1d(QuantizedWeightMixin, nn.Conv1d):
    supports_integer_kernel = True

    def _accumulate(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def forward(self, x):
        return self._forward_quantized(x)


class QuantConv2d(QuantizedWeightMixin, nn.Conv2d):
    supports_integer_kernel = True

    def _accumulate(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def forward(self, x):
        return self._forward_quantized(x)


class QuantConvTranspose2d(QuantizedWeightMixin, nn.ConvTranspose2d):
    weight_axis = 1  # ConvTranspose weights are [in, out/groups, kh, kw]

    def forward(self, x, output_size=None):
        weight, bias = self._weight_and_bias()
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation)


class QuantLinear(QuantizedWeightMixin, nn.Linear):
    supports_integer_kernel = True

    def _accumulate(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def forward(self, x):
        return self._forward_quantized(x)


def quantized_class_for(module: nn.Module) -> type | None:
    """The quantized class for a float module, or None when its weights are not quantized.

    Exact type matches only: a subclass may change forward in ways a wrapper cannot see.
    """
    table = {
        nn.Conv1d: QuantConv1d,
        nn.Conv2d: QuantConv2d,
        nn.ConvTranspose2d: QuantConvTranspose2d,
        nn.Linear: QuantLinear,
    }
    return table.get(type(module))
