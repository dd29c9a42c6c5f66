"""Quantized checkpoints: weights stored as integers plus scales and zero points.

A quantized state dict holds, for every weight quantized to an integer grid:
    ``<module>.weight.int8`` / ``.int16`` (codes) or ``.int4`` (two 4-bit codes per byte, low
    nibble first), together with the quantizer buffers ``<module>.weight_quantizer.scale`` and
    ``.zero_point``;
and every other tensor of the simulated model as it is (biases, norms, activation encodings).
The float weight is *not* stored. Loading rebuilds the weight as ``(codes - zero_point) * scale``,
which lies exactly on the grid, so the rebuilt simulation is bit-for-bit the same.
"""

from __future__ import annotations

import json

import torch

from .affine import dequantize, quantize
from .quantsim import QuantSim

FORMAT = "quantzoo.quantized/1"


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed or unsigned 4-bit codes (any int dtype, values in -8..15) two per uint8."""
    flat = (codes.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: returns ``numel`` int16 codes."""
    low, high = packed & 0xF, packed >> 4
    flat = torch.stack([low, high], dim=1).reshape(-1)[:numel].to(torch.int16)
    if signed:
        flat = torch.where(flat >= 8, flat - 16, flat)
    return flat


def _storage_key(name: str, bitwidth: int) -> str:
    if bitwidth <= 4:
        return f"{name}.weight.int4"
    return f"{name}.weight.int8" if bitwidth <= 8 else f"{name}.weight.int16"


def quantized_state_dict(sim: QuantSim) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the simulated model with integer weights; for safetensors."""
    tensors = {k: v.detach().contiguous() for k, v in sim.model.state_dict().items() if v.numel() > 0}
    shapes: dict[str, list[int]] = {}
    for name, module in sim.weight_modules().items():
        wq = module.weight_quantizer
        if not wq.spec.enabled or wq.spec.is_float or not wq.has_encoding:
            continue
        codes = quantize(module.weight.detach(), wq.scale, wq.zero_point, wq.spec)
        key = _storage_key(name, wq.spec.bitwidth)
        if key.endswith(".int4"):
            stored = pack_int4(codes)
        elif key.endswith(".int8"):
            stored = codes.to(torch.int8 if wq.spec.signed else torch.uint8)
        else:
            stored = codes.to(torch.int16) if wq.spec.signed else codes.to(torch.int32)
        del tensors[f"{name}.weight"]
        tensors[key] = stored.contiguous()
        shapes[key] = list(module.weight.shape)
    metadata = {"format": FORMAT, "shapes": json.dumps(shapes, sort_keys=True), "config": sim.config.name}
    return tensors, metadata


@torch.no_grad()
def load_quantized_state_dict(sim: QuantSim, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Load a dict written by :func:`quantized_state_dict` into ``sim`` (same model and config)."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {metadata.get('format')!r} is not {FORMAT!r}; it is not a quantzoo quantized checkpoint")
    shapes = json.loads(metadata.get("shapes", "{}"))
    tensors = dict(tensors)
    quantizers = {**{f"activation_quantizers.{n}": q for n, q in sim.activation_quantizers().items()},
                  **{f"{n}.weight_quantizer": m.weight_quantizer for n, m in sim.weight_modules().items()}}
    empty = {k for k, v in sim.model.state_dict().items() if v.numel() == 0}
    loaded: set[str] = set()
    for prefix, quantizer in quantizers.items():
        scale, zero_point = tensors.pop(f"{prefix}.scale", None), tensors.pop(f"{prefix}.zero_point", None)
        if scale is not None and zero_point is not None:
            quantizer.set_qparams(scale, zero_point)
            loaded.update({f"{prefix}.scale", f"{prefix}.zero_point"})
    rebuilt: set[str] = set()
    for name, module in sim.weight_modules().items():
        key = _storage_key(name, module.weight_quantizer.spec.bitwidth)
        if key not in tensors:
            continue
        rebuilt.add(f"{name}.weight")
        wq = module.weight_quantizer
        stored = tensors.pop(key)
        shape = torch.Size(shapes[key])
        codes = unpack_int4(stored, shape.numel(), wq.spec.signed) if key.endswith(".int4") else stored
        module.weight.copy_(dequantize(codes.reshape(shape), wq.scale, wq.zero_point, wq.spec))
    missing, unexpected = sim.model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in rebuilt and k not in loaded and k not in empty]
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
