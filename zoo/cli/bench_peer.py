"""Peer side by side for `quantzoo bench --peer`: ONNX Runtime's own static quantizer on the same model and data.

:func:`run_peers` takes the FP32 ONNX file that bench exports (the model quantzoo quantizes), the
recipe's calibration batches already in memory and its eval split, and for each calibrate method
(``MinMax``, ``Entropy``, ``Percentile``) runs ONNX Runtime's recommended CPU workflow:

1. ``onnxruntime.quantization.shape_inference.quant_pre_process`` (shape inference and the
   basic graph optimisations, which fold BatchNormalization into Conv as quantzoo's recipe does);
2. ``onnxruntime.quantization.quantize_static`` in QDQ format, ``per_channel`` when the recipe's
   weights are per channel, with the activation and weight types and symmetry of the recipe's
   quant config (:class:`PeerSettings`), fed by :class:`BatchReader` over the same calibration
   images, in the recipe's calibration batches.

Each quantized model is then scored with the same evaluator as `quantzoo run`
(:func:`evaluators.evaluate_classification` on an :class:`evaluators.OnnxRuntimeBackend`, the
recipe's eval split and batch size). The quantization time covers steps 1 and 2 and is the
median over ``repeats`` timed runs (no warm-up: one run takes seconds to minutes).

Memory bound: ONNX Runtime's calibrators keep every intermediate tensor of the batches they are
given until ``collect_data`` returns (EfficientNet-Lite0: about 20 MB per image). The reader is
therefore handed over one calibration batch at a time through ONNX Runtime's own
``CalibStridedMinMax`` option. MinMax ranges are identical to a single pass; the Entropy and
Percentile histograms are merged batch by batch, as ONNX Runtime does for any strided
calibration (the first batch sets the initial histogram range).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from evaluators import OnnxRuntimeBackend, evaluate_classification

from .bench_measure import PeakRss, Stat, timed_repeats
from .bench_report import BenchRow
from .bench_torch import BenchConfigError

PEER_METHODS = ("MinMax", "Entropy", "Percentile")
PEER_STAGE_PREFIX = "peer_ort_"


def peer_stage(method: str) -> str:
    """The bench stage name of a calibrate method: ``peer_ort_minmax``, ..."""
    return PEER_STAGE_PREFIX + method.lower()


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` deduplicated; BenchConfigError naming ``--peer-methods`` for an unknown one."""
    bad = [m for m in methods if m not in PEER_METHODS]
    if bad or not methods:
        raise BenchConfigError(f"--peer-methods={','.join(methods)} is not valid; use a comma list of "
                               f"{','.join(PEER_METHODS)}")
    return list(dict.fromkeys(methods))


class BatchReader:
    """An ONNX Runtime ``CalibrationDataReader`` over image batches already in memory.

    Yields ``{input_name: batch}`` (float32, C-contiguous) in order. ``set_range`` and ``__len__``
    (in batches) let ``quantize_static`` collect one stride at a time (``CalibStridedMinMax``).
    """

    def __init__(self, batches: Sequence[np.ndarray], input_name: str) -> None:
        self._batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
        self._input_name = input_name
        self._start, self._end = 0, len(self._batches)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        batch = self._batches[self._next]
        self._next += 1
        return {self._input_name: batch}

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = start_index, min(end_index, len(self._batches))
        self._next = self._start

    def rewind(self) -> None:
        """Start over from the first batch (for the next method or repeat)."""
        self.set_range(0, len(self._batches))


@dataclass(frozen=True)
class PeerSettings:
    """The ``quantize_static`` arguments that match a recipe's quant config.

    ``activation_type``/``weight_type`` are ``QuantType`` names (``QInt8``, ``QUInt8``);
    asymmetric 8-bit activations are the same grid signed or unsigned (the zero point moves by
    128), so the type follows the recipe's ``signed`` flag only to keep the files alike.
    """

    activation_type: str
    weight_type: str
    activation_symmetric: bool
    weight_symmetric: bool
    per_channel: bool

    @classmethod
    def from_quant_config(cls, config: Any) -> "PeerSettings":
        """Settings from a :class:`quantlib.config.QuantSimConfig`; BenchConfigError unless it is W8A8."""
        act, weight = config.activation, config.weight
        if act.bitwidth != 8 or weight.bitwidth != 8 or act.dtype != "int" or weight.dtype != "int":
            raise BenchConfigError(
                f"--peer compares with onnxruntime quantize_static at 8 bits, but the recipe has "
                f"quant.weight_bits={weight.bitwidth} and quant.activation_bits={act.bitwidth}; "
                f"bench a W8A8 recipe (e.g. MODEL/w8a8_per_channel) or drop --peer")
        if config.modules:
            raise BenchConfigError("--peer needs one quant config for the whole model, but quant.modules sets "
                                   "per-module rules; bench a recipe without quant.modules or drop --peer")
        if weight.granularity not in ("per_channel", "per_tensor"):
            raise BenchConfigError(f"--peer supports per_channel or per_tensor weights, not {weight.granularity}; "
                                   f"drop --peer")
        return cls(activation_type="QInt8" if act.signed else "QUInt8",
                   weight_type="QInt8" if weight.signed else "QUInt8",
                   activation_symmetric=act.symmetric, weight_symmetric=weight.symmetric,
                   per_channel=weight.granularity == "per_channel")

    def describe(self) -> str:
        """One line for the CSV note: format, granularity, types and symmetry."""
        granularity = "per_channel=True" if self.per_channel else "per_channel=False"
        return (f"QDQ {granularity} activations {self.activation_type}"
                f"{' symmetric' if self.activation_symmetric else ' asymmetric'} weights {self.weight_type}"
                f"{' symmetric' if self.weight_symmetric else ' asymmetric'}")


def quantize_with_ort(fp32_onnx: Path, reader: BatchReader, method: str, settings: PeerSettings,
                      out_path: Path) -> Path:
    """Pre-process ``fp32_onnx`` and run ``quantize_static`` with calibrate ``method``; returns ``out_path``.

    ``reader`` is rewound first and consumed one batch per collection stride.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    preprocessed = out_path.with_name(out_path.stem + "-preprocessed.onnx")
    reader.rewind()
    # quantize_static prints progress and warns about every tensor it leaves in float; the bench
    # output is the table, so both go to a buffer (errors still raise).
    with contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
        quant_pre_process(str(fp32_onnx), str(preprocessed))
        quantize_static(
            str(preprocessed), str(out_path), reader, quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel, reduce_range=False,
            activation_type=getattr(QuantType, settings.activation_type),
            weight_type=getattr(QuantType, settings.weight_type),
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options={"ActivationSymmetric": settings.activation_symmetric,
                           "WeightSymmetric": settings.weight_symmetric,
                           "CalibStridedMinMax": 1})
    preprocessed.unlink(missing_ok=True)
    return out_path


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 (percent) with the 95% interval of top-1, over ``samples`` eval images."""

    top1: float
    top5: float
    ci95: tuple[float, float]
    samples: int


def onnx_accuracy(path: Path, evaluation, *, batch_size: int, num_workers: int = 0) -> Accuracy:
    """The evaluator of `quantzoo run` on ONNX Runtime (CPU) over the eval dataset."""
    result = evaluate_classification(OnnxRuntimeBackend(str(path), device="cpu"), evaluation, batch_size=batch_size,
                                     num_workers=num_workers, progress=False)
    return Accuracy(result.top1, result.top5, tuple(result.top1_ci95), result.num_samples)


def accuracy_rows(stage: str, accuracy: Accuracy, note: str = "") -> list[BenchRow]:
    """``top1`` and ``top5`` rows (percent) of ``stage``; the top-1 note carries its 95% interval."""
    lo, hi = accuracy.ci95
    return [BenchRow("cpu", stage, "top1", "%", Stat.single(accuracy.top1), samples=accuracy.samples,
                     note=f"95% CI {lo:.2f}..{hi:.2f}" + (f"; {note}" if note else "")),
            BenchRow("cpu", stage, "top5", "%", Stat.single(accuracy.top5), samples=accuracy.samples)]


def run_peers(fp32_onnx: Path, calibration_batches: Sequence[torch.Tensor], evaluation, *, settings: PeerSettings,
              methods: Sequence[str], repeats: int, eval_batch_size: int, work: Path,
              num_workers: int = 0) -> list[BenchRow]:
    """Quantize ``fp32_onnx`` with each method, time it, score it; returns the bench rows.

    Rows per method (stage :func:`peer_stage`): ``quantize_time`` (s, pre-processing plus
    ``quantize_static``), ``peak_rss`` (MiB, this process during quantization), ``file_size``
    (bytes), ``top1`` and ``top5`` (%) on ``evaluation``.
    """
    samples = sum(int(b.shape[0]) for b in calibration_batches)
    reader = BatchReader([b.detach().cpu().numpy() for b in calibration_batches], "input")
    rows: list[BenchRow] = []
    for method in methods:
        out = work / f"ort-{method.lower()}-int8.onnx"
        measured = timed_repeats(lambda: quantize_with_ort(fp32_onnx, reader, method, settings, out),
                                 repeats=repeats, warmup=0, memory=PeakRss)
        stage = peer_stage(method)
        rows.append(BenchRow("cpu", stage, "quantize_time", "s", Stat.of(measured.seconds), samples=samples,
                             note=f"quant_pre_process + quantize_static calibrate_method={method} "
                                  f"{settings.describe()}; {len(calibration_batches)} calibration batches, one per stride"))
        if measured.peak_mib:
            rows.append(BenchRow("cpu", stage, "peak_rss", "MiB", Stat.of(measured.peak_mib),
                                 note="peak RSS of the bench process while quantize_static ran"))
        rows.append(BenchRow("cpu", stage, "file_size", "bytes", Stat.single(out.stat().st_size), note=out.name))
        rows += accuracy_rows(stage, onnx_accuracy(out, evaluation, batch_size=eval_batch_size,
                                                   num_workers=num_workers))
    return rows

