"""Inference backends: one calling convention for torch modules and ONNX Runtime.

Every backend is a callable ``backend(batch) -> logits`` with a ``name``:

* input ``batch``: ``float32`` tensor ``(N, C, H, W)`` on any device (not mutated);
* output: ``float32`` tensor ``(N, num_classes)`` on the CPU, a fresh tensor the
  caller owns (not an inference-mode tensor).

:class:`TorchBackend` runs FP32 and simulated-quantization ``torch.nn.Module``\\ s;
:class:`OnnxRuntimeBackend` runs an ``.onnx`` file with ONNX Runtime.
Devices are chosen with ``evaluator.device`` = ``"cpu"``, ``"cuda"``,
``"cuda:<index>"`` or ``"auto"`` (CUDA when available, else CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from evaluators.errors import EvaluatorConfigError

__all__ = [
    "InferenceBackend",
    "OnnxRuntimeBackend",
    "TorchBackend",
    "resolve_device",
    "onnxruntime_providers",
]

_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


@runtime_checkable
class InferenceBackend(Protocol):
    """``backend(batch) -> float32 CPU logits``; ``name`` identifies it in reports."""

    name: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``evaluator.device`` into a :class:`torch.device`.

    ``"auto"`` picks ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.
    Raises :class:`EvaluatorConfigError` naming ``evaluator.device`` for an
    unparsable string or a CUDA device that is not available.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EvaluatorConfigError(
            f"evaluator.device={device!r} is not a valid device; use cpu, cuda, cuda:<index> or auto"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EvaluatorConfigError(
                f"evaluator.device={device!r} but CUDA is not available on this machine; "
                f"set evaluator.device=cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EvaluatorConfigError(
                f"evaluator.device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    return dev


class TorchBackend:
    """Run a ``torch.nn.Module`` under ``torch.inference_mode()``.

    Construction *mutates* ``module``: it is moved to the resolved device and
    put in ``eval()`` mode. Calls move the batch to that device and return the
    logits as a new ``float32`` CPU tensor. The module must return a tensor
    (or a tuple/list whose first element is the logits tensor).
    """

    def __init__(self, module: torch.nn.Module, device: str | torch.device = "cpu", *, name: str | None = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchBackend expects a torch.nn.Module, got {type(module).__name__}")
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        self.name = name or f"torch:{self.device}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(batch.to(self.device, non_blocking=True))
            if isinstance(out, (tuple, list)) and out:
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"{self.name}: the module returned {type(out).__name__}; expected a logits tensor"
                )
        # A copy made outside inference mode is an ordinary tensor the caller owns.
        return out.to(device="cpu", dtype=torch.float32, copy=True)

    def __repr__(self) -> str:
        return f"TorchBackend(module={type(self.module).__name__}, device={str(self.device)!r})"


def onnxruntime_providers(device: str = "cpu", available: Sequence[str] | None = None) -> list[Any]:
    """Execution providers for ``evaluator.device``.

    ``cpu`` -> CPU only; ``cuda``/``cuda:<i>`` -> CUDA (then CPU as fallback for
    unsupported ops), an :class:`EvaluatorConfigError` naming
    ``evaluator.device`` if onnxruntime has no CUDA provider; ``auto`` -> CUDA
    when available, else CPU.
    """
    import onnxruntime as ort

    available = list(ort.get_available_providers() if available is None else available)
    if device == "auto":
        device = "cuda" if _CUDA_EP in available else "cpu"
    if device == "cpu":
        return [_CPU_EP]
    if device == "cuda" or device.startswith("cuda:"):
        if _CUDA_EP not in available:
            raise EvaluatorConfigError(
                f"evaluator.device={device!r} but onnxruntime offers only {available} (no {_CUDA_EP}); "
                f"install onnxruntime-gpu or set evaluator.device=cpu"
            )
        index = device.partition(":")[2]
        if index:
            if not index.isdigit():
                raise EvaluatorConfigError(f"evaluator.device={device!r} is not valid; use cuda:<index>")
            return [(_CUDA_EP, {"device_id": int(index)}), _CPU_EP]
        return [_CUDA_EP, _CPU_EP]
    raise EvaluatorConfigError(
        f"evaluator.device={device!r} is not supported by onnxruntime; use cpu, cuda, cuda:<index> or auto"
    )


def has_16bit_quantized_weights(model_path: str | os.PathLike) -> bool:
    """True when a DequantizeLinear of ``model_path`` reads a 16-bit integer initializer (a weight)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    sixteen = {onnx.TensorProto.INT16, onnx.TensorProto.UINT16}
    weights16 = {init.name for init in proto.graph.initializer if init.data_type in sixteen}
    return any(node.op_type == "DequantizeLinear" and node.input and node.input[0] in weights16
               for node in proto.graph.node)


class OnnxRuntimeBackend:
    """Run an ONNX classification model with ONNX Runtime.

    Args:
        model_path: the ``.onnx`` file (one input, logits as the first output).
        providers: execution providers passed to ``InferenceSession``; default
            from ``device`` via :func:`onnxruntime_providers`.
        intra_op_num_threads: ONNX Runtime CPU threads (``None``: its default).
        device: ``evaluator.device`` used when ``providers`` is ``None``.

    Inputs are fed as ``numpy.float32`` (``float16`` if the model asks for it).
    If the model's batch dimension is a fixed int and the batch differs, the
    batch runs in chunks of that size (the last chunk zero-padded, the padding
    outputs dropped). Nothing passed in is mutated.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        providers: Sequence[Any] | None = None,
        intra_op_num_threads: int | None = None,
        *,
        device: str = "cpu",
        name: str | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise EvaluatorConfigError(f"model_path={path} does not exist; export the ONNX model first or fix the path")
        available = ort.get_available_providers()
        if providers is None:
            providers = onnxruntime_providers(device, available)
        else:
            providers = list(providers)
            missing = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
            if missing:
                raise EvaluatorConfigError(
                    f"evaluator.providers {missing} are not available in this onnxruntime; available: {available}"
                )
        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            if intra_op_num_threads <= 0:
                raise EvaluatorConfigError(
                    f"evaluator.intra_op_num_threads={intra_op_num_threads} must be a positive integer or null"
                )
            options.intra_op_num_threads = int(intra_op_num_threads)
        if has_16bit_quantized_weights(path):
            # ONNX Runtime's QDQ fusions treat a 16-bit weight DequantizeLinear feeding a Conv as
            # 8-bit and compute wrong outputs (mnist_cnn W16A16: 75.9% against 98.4% unfused); the
            # QDQ nodes then run as written.
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.model_path = path
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected a model with one input, found {[i.name for i in inputs]}")
        self.input_name: str = inputs[0].name
        first_dim = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch: int | None = first_dim if isinstance(first_dim, int) and first_dim > 0 else None
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.output_name: str = self.session.get_outputs()[0].name
        self.name = name or f"onnxruntime:{self.session.get_providers()[0]}"

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to("cpu").numpy().astype(self.input_dtype, copy=False)
        n = x.shape[0]
        if self.fixed_batch is None or n == self.fixed_batch:
            out = self._run(x)
        else:
            size = self.fixed_batch
            parts = []
            for start in range(0, n, size):
                chunk = x[start : start + size]
                real = chunk.shape[0]
                if real < size:
                    pad = np.zeros((size - real, *chunk.shape[1:]), dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                parts.append(self._run(chunk)[:real])
            out = np.concatenate(parts)
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend(model_path={str(self.model_path)!r}, providers={self.session.get_providers()})"
