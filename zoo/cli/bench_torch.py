"""Torch side of `quantzoo bench`: quantize (QuantSim build, calibration, each PTQ step), eval, export.

:class:`TorchBench` measures one device. Every stage runs a warm-up first and is then timed
``repeats`` times; the figures are the median, min and max of those repeats, with the peak
memory of each repeat (resident memory on the CPU, CUDA allocations on a GPU).

* :meth:`TorchBench.quantize` runs the recipe's quantize stage exactly as `quantzoo run` does
  (:func:`zoo.cli.quantize_stage.calibrated_quantsim`: model-level PTQ steps, QuantSim,
  calibration, sim-level PTQ steps) on calibration batches already in memory, so image decoding
  is not timed. Its :class:`~quantlib.ptq.pipeline.PTQReport` gives the QuantSim build time,
  the calibration time (reported per sample) and the seconds of each PTQ step
  (:func:`zoo.cli.quantize_stage.stage_seconds`). The warm-up is one build and a one-batch
  calibration without PTQ steps.
* :meth:`TorchBench.evaluate` interleaves FP32 and simulated eval passes over eval batches in
  memory. Each repeat's simulated/FP32 time ratio comes from a pair measured back to back,
  which keeps the ratio meaningful on a busy machine.
* :meth:`TorchBench.export` times quantlib's export (QDQ ONNX, encodings, safetensors).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from evaluators import TorchBackend, evaluate_classification
from quantlib.export import ExportedArtifacts, export
from quantlib.quantsim import QuantSim

from .bench_measure import Measured, PeakCudaMemory, PeakRss, Stat, calls_for, timed_repeats
from .bench_report import BenchRow
from .quantize_stage import calibrated_quantsim, stage_seconds

MIN_BLOCK_SECONDS = 0.25  # short stages (a tiny model's eval pass) are timed in blocks at least this long


class BenchConfigError(ValueError):
    """A bench request cannot be measured; the message names the setting and the fix."""


def _memory_rows(device: str, stage: str, measured: Measured) -> list[BenchRow]:
    if not measured.peak_mib:
        return []
    if measured.memory_scope == "cuda":
        return [BenchRow(device, stage, "peak_cuda_memory", "MiB", Stat.of(measured.peak_mib),
                         note="torch.cuda.max_memory_allocated")]
    note = ("peak RSS of the bench process during the stage" if measured.memory_scope == "stage"
            else "peak RSS of the bench process so far (no per-stage reset on this OS)")
    return [BenchRow(device, stage, "peak_rss", "MiB", Stat.of(measured.peak_mib), note=note)]


@dataclass
class TorchBench:
    """The torch stages on one device; ``rows`` collects the measurements.

    ``fp32`` is moved to ``device`` and put in eval mode (mutated). ``calibration_batches`` are
    (images, labels) pairs in memory, as the calibration DataLoader of `quantzoo run` yields
    them; ``eval_batches`` are image tensors. ``calibration_set`` is the labelled calibration
    dataset that searching PTQ steps score on (as in `quantzoo run`, never the eval split).
    """

    fp32: torch.nn.Module
    quant_config: Any
    calibration_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    eval_batches: Sequence[torch.Tensor]
    device: torch.device
    repeats: int
    calibration_set: Any = None
    eval_batch_size: int = 50
    rows: list[BenchRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fp32.to(self.device).eval()

    @property
    def label(self) -> str:
        return self.device.type

    @property
    def num_calibration_samples(self) -> int:
        return sum(images.shape[0] for images, _ in self.calibration_batches)

    def _sync(self) -> Callable[[], None] | None:
        return (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else None

    def _memory(self) -> Callable[[], Any]:
        return (lambda: PeakCudaMemory(self.device)) if self.device.type == "cuda" else PeakRss

    def _add(self, stage: str, metric: str, unit: str, stat: Stat, samples: int | None = None, note: str = "") -> None:
        self.rows.append(BenchRow(self.label, stage, metric, unit, stat, samples, note))

    def _score(self, model: torch.nn.Module) -> float:
        if self.calibration_set is None:
            raise BenchConfigError("a searching PTQ step needs labelled calibration data; pass calibration_set")
        return evaluate_classification(TorchBackend(model, self.device), self.calibration_set,
                                       batch_size=self.eval_batch_size, progress=False).top1

    def quantize(self, steps: Sequence[Any]) -> QuantSim:
        """Time the quantize stage with ``steps`` (the recipe's ``ptq.steps``); returns the last sim.

        Rows: ``torch_quantize`` seconds and peak memory (the whole stage), ``torch_prepare``
        seconds (QuantSim build), ``torch_calibrate`` ms per sample, ``torch_ptq_<step>`` seconds.
        """
        batches = [(images.to(self.device), labels) for images, labels in self.calibration_batches]
        example = batches[0][0][:1]
        sync = self._sync() or (lambda: None)

        def run(step_list: Sequence[Any], calibration: Sequence) -> tuple[QuantSim, Any, float]:
            sync()
            start = time.perf_counter()
            sim, report = calibrated_quantsim(self.fp32, example, self.quant_config, step_list, calibration,
                                              score_fn=self._score, plots_dir=None, progress=False)
            sync()
            return sim, report, time.perf_counter() - start

        run([], batches[:1])  # warm-up: tracing, quantizer insertion, first kernels and allocations
        totals: list[float] = []
        per_stage: dict[str, list[float]] = {}
        measured = Measured()
        sim = None
        for _ in range(self.repeats):
            probe = self._memory()()
            with probe:
                sim, report, seconds = run(steps, batches)
            totals.append(seconds)
            measured.peak_mib.append(probe.mib)
            measured.memory_scope = probe.scope
            for name, value in stage_seconds(report).items():
                per_stage.setdefault(name, []).append(value)
        n = self.num_calibration_samples
        self._add("torch_quantize", "seconds", "s", Stat.of(totals),
                  note="copy + trace + model-level PTQ + QuantSim build + calibration + sim-level PTQ")
        self.rows += _memory_rows(self.label, "torch_quantize", measured)
        self._add("torch_prepare", "seconds", "s", Stat.of(per_stage.pop("prepare")), note="QuantSim build")
        self._add("torch_calibrate", "time_per_sample", "ms",
                  Stat.of([1000.0 * s / n for s in per_stage.pop("calibrate")]), samples=n,
                  note="observer pass over the calibration split, weight encodings included")
        for name, values in per_stage.items():
            self._add(f"torch_{name}", "seconds", "s", Stat.of(values), samples=n)
        return sim

    def evaluate(self, sim: QuantSim) -> None:
        """Interleaved FP32 and simulated eval passes: throughput, simulated/FP32 time ratio, memory."""
        n = sum(b.shape[0] for b in self.eval_batches)
        batches = [b.to(self.device) for b in self.eval_batches]
        sim.model.to(self.device)

        def passes(model: torch.nn.Module) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    for x in batches:
                        model(x)
            return run

        fp32_run, sim_run = passes(self.fp32.eval()), passes(sim.model.eval())
        sync = self._sync()  # calls_for is the warm-up of each pass (allocator, kernels, thread pools)
        fp32_calls = calls_for(fp32_run, min_seconds=MIN_BLOCK_SECONDS, synchronize=sync)
        sim_calls = calls_for(sim_run, min_seconds=MIN_BLOCK_SECONDS, synchronize=sync)
        fp32_m, sim_m = Measured(), Measured()
        for _ in range(self.repeats):
            fp32_m.extend(timed_repeats(fp32_run, repeats=1, warmup=0, calls=fp32_calls, synchronize=sync,
                                        memory=self._memory()))
            sim_m.extend(timed_repeats(sim_run, repeats=1, warmup=0, calls=sim_calls, synchronize=sync,
                                       memory=self._memory()))
        self._add("torch_fp32_eval", "throughput", "img/s", Stat.of(fp32_m.seconds).inverse(n), samples=n)
        self.rows += _memory_rows(self.label, "torch_fp32_eval", fp32_m)
        self._add("torch_quantsim_eval", "throughput", "img/s", Stat.of(sim_m.seconds).inverse(n), samples=n)
        self._add("torch_quantsim_eval", "time_ratio_to_fp32", "x",
                  Stat.of([s / f for s, f in zip(sim_m.seconds, fp32_m.seconds)]), samples=n,
                  note="each repeat's simulated eval time over the FP32 time measured next to it")
        self.rows += _memory_rows(self.label, "torch_quantsim_eval", sim_m)

    def export(self, sim: QuantSim, directory: Path, prefix: str) -> ExportedArtifacts:
        """Time quantlib's export (on the CPU) after one warm-up export; returns the files of the last one.

        The warm-up and all but the last timed export write to a scratch folder; the last one
        writes to ``directory``. Rows: ``torch_export`` seconds, peak RSS, and the sizes of the
        integer-weight safetensors and encodings JSON.
        """
        example = self.calibration_batches[0][0][:1].cpu()
        made: list[ExportedArtifacts] = []
        with tempfile.TemporaryDirectory(prefix="quantzoo-bench-export-") as scratch:
            def once() -> None:
                target = Path(directory) if len(made) == self.repeats else Path(scratch) / str(len(made))
                made.append(export(sim, target, prefix, example))
            measured = timed_repeats(once, repeats=self.repeats, warmup=1, memory=PeakRss)
        sim.model.to(self.device)
        artifacts = made[-1]
        self._add("torch_export", "seconds", "s", Stat.of(measured.seconds),
                  note="QDQ ONNX + encodings + safetensors, on the CPU")
        self.rows += _memory_rows(self.label, "torch_export", measured)
        self._add("torch_export", "safetensors_size", "bytes", Stat.single(artifacts.weights.stat().st_size),
                  note="integer weights")
        self._add("torch_export", "encodings_size", "bytes", Stat.single(artifacts.encodings.stat().st_size))
        return artifacts
