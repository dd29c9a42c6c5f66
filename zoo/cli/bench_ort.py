"""ONNX Runtime side of `quantzoo bench`: FP32 export, provider choice, and the speed worker.

Speed and memory are measured by :mod:`zoo.cli.bench_ort_worker` in a fresh Python process per
model, so the peak resident memory is that of ONNX Runtime serving the model, not of this
process (which holds torch and the datasets).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from quantlib.export import ONNX_OPSET
from quantlib.io import atomic_output

from .bench_measure import Stat

WORKER = Path(__file__).with_name("bench_ort_worker.py")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OrtBenchError(RuntimeError):
    """The ONNX Runtime worker failed; the message holds its last error line."""


def export_fp32_onnx(model: torch.nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """Write ``model`` (FP32) as ONNX with a dynamic batch, the way quantlib exports the int8 model.

    Same exporter (``torch.onnx.export(dynamo=True, optimize=True)``), opset
    (:data:`quantlib.export.ONNX_OPSET`) and names (input ``input``, output ``logits``) as
    :func:`quantlib.export.export_onnx`, so the FP32 and int8 files differ only by quantization.
    ``model`` is put in eval mode and exported on the CPU; its device is restored afterwards.
    The file is written atomically; returns its path.
    """
    path = Path(path)
    device = next(model.parameters()).device
    model.cpu().eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example_input.cpu(),), dynamo=True, opset_version=ONNX_OPSET, optimize=True, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                input_names=["input"], output_names=["logits"])
        with atomic_output(path) as tmp:
            onnx.save(program.model_proto, str(tmp))
    finally:
        model.to(device)
    return path


def ort_provider(device: str) -> tuple[str | None, str]:
    """(ONNX Runtime provider for ``device`` or None, the reason when None)."""
    import onnxruntime as ort

    provider = _PROVIDERS.get(device)
    if provider is None:
        return None, f"device {device!r} has no ONNX Runtime provider here; use cpu or cuda"
    if provider not in ort.get_available_providers():
        return None, f"onnxruntime has no {provider} (available: {', '.join(ort.get_available_providers())})"
    return provider, ""


def measure_ort(model_path: str | Path, inputs_path: str | Path, *, provider: str, repeats: int,
                warmup: int = 3, block_seconds: float = 0.2, timeout: float = 1800) -> dict[str, Any]:
    """Run the worker on one model; returns its JSON with ``Stat`` values for the timed lists.

    Keys: ``latency_b1_ms``, ``throughput_b32`` (Stat), ``session_seconds``, ``peak_rss_mib``,
    ``baseline_rss_mib``, ``calls_per_block``, ``provider``.
    """
    command = [sys.executable, str(WORKER), str(model_path), str(inputs_path), "--provider", provider,
               "--repeats", str(repeats), "--warmup", str(warmup), "--block-seconds", str(block_seconds)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 or "error" in result or not lines:
        detail = result.get("error") or (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise OrtBenchError(f"onnxruntime worker failed on {Path(model_path).name}: {detail}")
    result["latency_b1_ms"] = Stat.of(result["latency_b1_ms"])
    result["throughput_b32"] = Stat.of(result["throughput_b32"])
    return result


def save_inputs(images: torch.Tensor, path: str | Path) -> Path:
    """Save an image batch (N, C, H, W) as float32 .npy for the worker; returns the path."""
    path = Path(path)
    np.save(path, images.detach().cpu().numpy().astype(np.float32))
    return path
