"""Model sizes: dense float32, integer weights, and gzip-compressed, as TFMOT reports compression.

TFMOT's collaborative-optimization guide measures a compressed model by the gzip size of its
deployable int8 file, next to the gzip size of the float baseline: sparsity (runs of zeros) and
clustering (few distinct codes) only pay off once an entropy coder sees them. Here:

* :func:`float_sizes`: a float model's conv/linear weight bytes at float32, and the size of its
  whole float32 ``state_dict`` as a safetensors file, raw and gzipped;
* :func:`quantized_sizes`: a QuantSim's integer weight codes (the conv/linear weights as the
  integer checkpoint of :mod:`quantlib.checkpoint` stores them, concatenated in layer order), raw
  and gzipped, and the whole integer checkpoint file (the ``.safetensors`` artifact ``export``
  writes, biases and encodings included), raw and gzipped.

gzip runs at level 9 with a fixed timestamp, so the sizes are deterministic. Nothing is mutated.
"""

from __future__ import annotations

import gzip
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..affine import quantize
from ..checkpoint import quantized_state_dict
from .layers import weight_layers

if TYPE_CHECKING:
    from ..quantsim import QuantSim


def gzip_size(data: bytes) -> int:
    """Bytes of ``data`` gzipped at level 9 (mtime 0)."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def _file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items() if v.numel() > 0}, metadata)


def float_sizes(model: nn.Module) -> dict[str, int]:
    """``{"weights_fp32_bytes", "file_fp32_bytes", "file_fp32_gzip_bytes"}`` of a float model."""
    weights = sum(m.weight.numel() for m in weight_layers(model).values()) * 4
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    data = _file_bytes(state)
    return {"weights_fp32_bytes": weights, "file_fp32_bytes": len(data), "file_fp32_gzip_bytes": gzip_size(data)}


@torch.no_grad()
def quantized_sizes(sim: QuantSim) -> dict[str, int]:
    """``{"weights_int_bytes", "weights_int_gzip_bytes", "file_int_bytes", "file_int_gzip_bytes"}`` of ``sim``.

    Weight codes are taken at their container width (int8 for <= 8 bits, int16 above); weights
    the simulation leaves in float (disabled or float16 quantizers) count at float32.
    """
    chunks = []
    for module in sim.weight_modules().values():
        wq = module.weight_quantizer
        if wq.spec.enabled and not wq.spec.is_float and wq.has_encoding:
            codes = quantize(module.weight.detach(), wq.scale, wq.zero_point, wq.spec)
            dtype = torch.int8 if wq.spec.bitwidth <= 8 and wq.spec.signed else \
                torch.uint8 if wq.spec.bitwidth <= 8 else torch.int16 if wq.spec.signed else torch.int32
            chunks.append(codes.to(dtype).cpu().contiguous().numpy().tobytes())
        else:
            chunks.append(module.weight.detach().float().cpu().contiguous().numpy().tobytes())
    codes = b"".join(chunks)
    tensors, metadata = quantized_state_dict(sim)
    data = _file_bytes(tensors, metadata)
    return {"weights_int_bytes": len(codes), "weights_int_gzip_bytes": gzip_size(codes),
            "file_int_bytes": len(data), "file_int_gzip_bytes": gzip_size(data)}
