"""FakeQuantizer: the module that simulates one tensor's fixed-point format.

States:
    calibrating: observe the tensor and pass it through unchanged.
    quantizing (default after an encoding is set): quantize-dequantize with the encoding.
    disabled (spec.enabled False): pass through.
    exporting: emit the ``quantzoo::qdq`` custom op that ONNX export turns into Q/DQ nodes.
"""

from __future__ import annotations

import torch
from torch import nn

from . import onnx_ops
from .affine import aimet_offset, compute_qparams, container_dtype, expand_qparam, fake_quantize, num_groups
from .observers import build_observer
from .spec import QuantizerSpec


class QuantizerNotCalibratedError(RuntimeError):
    """A quantizer was asked to quantize before it had an encoding."""


class FakeQuantizer(nn.Module):
    """Quantize-dequantize one tensor according to ``spec``.

    Buffers ``scale`` (float32) and ``zero_point`` (int32) hold one value per group (see
    :mod:`quantlib.affine`). ``version`` increases whenever they change so that cached quantized
    weights know when to refresh.
    """

    def __init__(self, spec: QuantizerSpec, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.observer = build_observer(spec)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.calibrating = False
        self.exporting = False
        self.exact = False  # divide by the scale as ONNX does (see affine.fake_quantize)
        # (layer,) whose integer kernel may already emit values on this grid (QuantSim links it);
        # a tuple so that the layer is not registered as a submodule
        self.on_grid_producer: tuple | None = None
        self.version = 0

    def extra_repr(self) -> str:
        s = self.spec
        if s.is_float:
            return f"{s.dtype} passthrough, enabled={s.enabled}"
        kind = "sym" if s.symmetric else "asym"
        sign = "int" if s.signed else "uint"
        return f"{sign}{s.bitwidth} {kind} {s.granularity} rounding={s.rounding} enabled={s.enabled}"

    @property
    def has_encoding(self) -> bool:
        """True once a scale and zero point are set (always True for float passthrough)."""
        return self.spec.is_float or self.scale.numel() > 0

    @property
    def active(self) -> bool:
        """True when forward changes the tensor."""
        return self.spec.enabled and not self.calibrating

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            if self.spec.enabled and not self.spec.is_float:
                self.observer.update(x)
            return x
        if not self.spec.enabled:
            return x
        if not self.has_encoding:
            raise QuantizerNotCalibratedError(
                f"quantizer {self.name or '<unnamed>'} has no encoding; run QuantSim.calibrate(data) "
                "or QuantSim.load_encodings(path) first"
            )
        if self.exporting:
            return self.export_forward(x)
        if self.exact and self.on_grid_producer is not None and self.on_grid_producer[0].integer_output_on_grid():
            return x  # already on this grid: quantizing again would return the same values
        return fake_quantize(x, self.scale, self.zero_point, self.spec, exact=self.exact)

    # -- encodings -----------------------------------------------------------------------------
    def compute_encoding(self) -> None:
        """Turn the observer's range into scale/zero_point. No-op when disabled or float."""
        if not self.spec.enabled or self.spec.is_float:
            return
        min_val, max_val = self.observer.compute_range()
        scale, zero_point = compute_qparams(min_val, max_val, self.spec)
        self.set_qparams(scale, zero_point)

    @torch.no_grad()
    def calibrate_from(self, tensor: torch.Tensor) -> None:
        """Observe ``tensor`` once and set the encoding from it (used for weights)."""
        if not self.spec.enabled or self.spec.is_float:
            return
        self.observer.reset()
        self.observer.update(tensor)
        self.compute_encoding()

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install an encoding (shapes must be ``[groups]`` or a scalar for per-tensor)."""
        device = self.scale.device
        scale = scale.detach().to(device=device, dtype=torch.float32).reshape(-1)
        zero_point = zero_point.detach().to(device=device, dtype=torch.int32).reshape(-1)
        if scale.shape != zero_point.shape:
            raise ValueError(f"{self.name}: scale {tuple(scale.shape)} and zero_point {tuple(zero_point.shape)} differ")
        if isinstance(self.scale, nn.Parameter):
            self.scale.data = scale
        else:
            self.scale = scale
        self.zero_point = zero_point
        self.version += 1

    def check_groups(self, shape: torch.Size) -> None:
        """Raise if the encoding does not fit a tensor of ``shape``."""
        expected = num_groups(shape, self.spec)
        if self.has_encoding and not self.spec.is_float and self.scale.numel() != expected:
            raise ValueError(
                f"{self.name}: encoding has {self.scale.numel()} scales but the tensor {tuple(shape)} "
                f"needs {expected} for granularity={self.spec.granularity}"
            )

    def representable_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) float values of the integer grid, per group."""
        zp = self.zero_point.float()
        return (self.spec.quant_min - zp) * self.scale, (self.spec.quant_max - zp) * self.scale

    def encoding(self) -> list[dict]:
        """AIMET-style encoding records, one per group (field names as in AIMET's JSON)."""
        spec = self.spec
        if spec.is_float:
            return [{"bitwidth": 16, "dtype": "float", "float_dtype": spec.dtype}]
        lo, hi = self.representable_range()
        offsets = aimet_offset(self.zero_point, spec)
        return [
            {
                "bitwidth": spec.bitwidth,
                "dtype": "int",
                "is_symmetric": str(bool(spec.symmetric)),
                "scale": float(s),
                "offset": int(o),
                "min": float(a),
                "max": float(b),
            }
            for s, o, a, b in zip(self.scale.tolist(), offsets.tolist(), lo.tolist(), hi.tolist())
        ]

    # -- export --------------------------------------------------------------------------------
    def begin_export(self) -> None:
        """Switch forward to the export op, precomputing every constant it needs.

        The constants are computed here, outside tracing, because torch.export traces buffers as
        fake tensors whose values cannot be read.
        """
        spec = self.spec
        self.exporting = True
        if spec.is_float or not spec.enabled:
            return
        if spec.granularity == "per_block":
            raise NotImplementedError(f"{self.name}: per_block activations cannot be exported; use per_tensor or per_channel")
        per_tensor = spec.granularity == "per_tensor"
        # ORT 1.32's S8->U8 transform breaks signed-int8 QDQ before Reshape/Flatten
        # (microsoft/onnxruntime#25526); the same grid as uint8 shifted by 128 is numerically identical.
        dtype, shift = container_dtype(spec), 0
        if dtype == torch.int8:
            dtype, shift = torch.uint8, 128
        self._export_scale = self.scale.detach().clone().reshape(()) if per_tensor else self.scale.detach().clone()
        zero_point = (self.zero_point.detach().to(torch.int32) + shift).to(dtype)
        self._export_zero_point = zero_point.reshape(()) if per_tensor else zero_point
        container = torch.iinfo(dtype)
        self._export_clip = None
        if spec.quant_min + shift > container.min or spec.quant_max + shift < container.max:
            lo, hi = self.representable_range()
            self._export_clip = (lo.item(), hi.item()) if per_tensor else (lo.detach().clone(), hi.detach().clone())

    def end_export(self) -> None:
        """Return forward to simulation."""
        self.exporting = False
        for attr in ("_export_scale", "_export_zero_point", "_export_clip"):
            self.__dict__.pop(attr, None)

    def export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Emit the custom op that ONNX export lowers to (Clip ->) QuantizeLinear -> DequantizeLinear.

        Grids narrower than their integer container (e.g. 4-bit codes in int8) are clipped to the
        grid's float range first, which is exactly what the narrower QuantizeLinear would do.
        """
        spec = self.spec
        if spec.is_float:
            return onnx_ops.float_roundtrip(x, spec.dtype)
        per_tensor = spec.granularity == "per_tensor"
        if self._export_clip is not None:
            lo, hi = self._export_clip
            if per_tensor:
                x = torch.clamp(x, lo, hi)
            else:
                x = torch.maximum(torch.minimum(x, expand_qparam(hi, x.shape, spec)), expand_qparam(lo, x.shape, spec))
        axis = 1 if per_tensor else spec.axis % x.dim()
        return onnx_ops.quantize_dequantize(x, self._export_scale, self._export_zero_point, axis)
