"""Export a QuantSim: ONNX with QuantizeLinear/DequantizeLinear, encodings JSON, safetensors.

The ONNX model is standard (opset 21): activations go through QuantizeLinear -> DequantizeLinear
(per-axis through ``axis``), weights are stored as int8/int16 initializers feeding
DequantizeLinear, and conv/gemm biases as int32 at scale input_scale * weight_scale. ONNX Runtime
fuses these patterns into its integer kernels (QLinearConv, QLinearMatMul, QLinearAdd, ...).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
import torch
from safetensors.torch import save as safetensors_save

from . import onnx_ops
from .checkpoint import quantized_state_dict
from .io import atomic_output, atomic_write_bytes, canonical_safetensors
from .quantsim import QuantSim

ONNX_OPSET = 21


@dataclass(frozen=True)
class ExportedArtifacts:
    """Paths of the three exported files."""

    onnx: Path
    encodings: Path
    weights: Path

    def as_dict(self) -> dict[str, Path]:
        return {"onnx": self.onnx, "encodings": self.encodings, "weights": self.weights}


@contextmanager
def exporting(sim: QuantSim) -> Iterator[None]:
    """Switch every quantizer and weight module of ``sim`` to export mode for the block."""
    quantizers = list(sim.activation_quantizers().values())
    modules = list(sim.weight_modules().values())
    try:
        for q in quantizers:
            q.begin_export()
        for m in modules:
            m.weight_quantizer.exporting = True
            m.begin_export()
        yield
    finally:
        for q in quantizers:
            q.end_export()
        for m in modules:
            m.weight_quantizer.exporting = False
            m.end_export()


def export_onnx(sim: QuantSim, path: str | Path, example_input: torch.Tensor, *, dynamic_batch: bool = True) -> Path:
    """Write ``sim`` as a QDQ ONNX model to ``path`` (atomically); returns the path.

    The input is named ``input`` and the output ``logits``; with ``dynamic_batch`` the first
    dimension is symbolic. Export runs on the CPU.
    """
    path = Path(path)
    model = sim.model.cpu().eval()
    example_input = example_input.cpu()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with exporting(sim), _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model, (example_input,), dynamo=True, opset_version=ONNX_OPSET,
            custom_translation_table=onnx_ops.translation_table(), dynamic_shapes=dynamic_shapes,
            input_names=["input"], output_names=["logits"], optimize=True, verbose=False,
        )
    proto = program.model_proto
    strip_debug_metadata(proto)
    onnx.checker.check_model(proto)
    with atomic_output(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def strip_debug_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node and per-value debug metadata (``metadata_props``: the source
    stack trace with absolute file paths and line numbers, the fx node, name scopes), in subgraphs
    too, so the file's bytes depend on the model and not on where or how the source was checked
    out. Model- and graph-level metadata stay. Returns ``proto``, modified in place."""
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for item in (*graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer):
            del item.metadata_props[:]
        for node in graph.node:
            graphs += [attr.g for attr in node.attribute if attr.HasField("g")]
            graphs += [g for attr in node.attribute for g in attr.graphs]
    return proto


def export(sim: QuantSim, directory: str | Path, prefix: str, example_input: torch.Tensor,
           *, dynamic_batch: bool = True) -> ExportedArtifacts:
    """Write ``<prefix>.onnx``, ``<prefix>.encodings.json`` and ``<prefix>.safetensors`` to ``directory``.

    The safetensors file holds the integer weights (see :mod:`quantlib.checkpoint`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(sim, directory / f"{prefix}.onnx", example_input, dynamic_batch=dynamic_batch)
    encodings_path = sim.save_encodings(directory / f"{prefix}.encodings.json")
    weights_path = directory / f"{prefix}.safetensors"
    tensors, metadata = quantized_state_dict(sim)
    data = safetensors_save({k: v.cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(weights_path, canonical_safetensors(data))
    return ExportedArtifacts(onnx=onnx_path, encodings=encodings_path, weights=weights_path)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter prints progress lines and warnings; keep user output clean."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
