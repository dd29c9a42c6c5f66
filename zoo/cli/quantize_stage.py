"""The quantize stage of ``quantzoo run``: FP32 model -> QuantSim, through the recipe's ``ptq.steps``.

Two ways in:
    * :func:`calibrated_quantsim` (the normal run): model-level PTQ steps, QuantSim, calibration on
      the calibration split, then sim-level PTQ steps (:func:`quantlib.ptq.pipeline.prepare_quantsim`).
    * :func:`uncalibrated_quantsim` (a run from a published checkpoint): only the model-level steps,
      which can change the graph (BN folding, ReLU6 -> ReLU), then QuantSim; the caller loads the
      published integer weights and encodings, which already hold what calibration and the
      sim-level steps produced.

Bad step lists raise :class:`~quantlib.ptq.registry.PTQConfigError` naming ``ptq.steps[i]...``
before any work; the CLI prints it as one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlib.ptq.pipeline import PTQReport, parse_steps, prepare_fp32_model, prepare_quantsim
from quantlib.quantsim import QuantSim

__all__ = ["calibrated_quantsim", "stage_seconds", "uncalibrated_quantsim"]


def calibrated_quantsim(model: nn.Module, example: torch.Tensor, config: Any, steps: Sequence[Any],
                        calibration: Iterable, *, score_fn: Callable[[nn.Module], float], plots_dir: Path,
                        progress: bool) -> tuple[QuantSim, PTQReport]:
    """QuantSim of a copy of ``model`` (not mutated), calibrated, with every PTQ step applied.

    ``calibration`` is re-iterable (a DataLoader over the calibration split); ``score_fn`` scores a
    model on labelled calibration data for searching steps; plots go to ``plots_dir``.
    """
    return prepare_quantsim(model, example, config, list(steps), calibration, progress=progress,
                            plots_dir=plots_dir, score_fn=score_fn)


def uncalibrated_quantsim(model: nn.Module, example: torch.Tensor, config: Any, steps: Sequence[Any],
                          calibration: Iterable) -> tuple[QuantSim, PTQReport]:
    """QuantSim of ``model`` after the model-level PTQ steps only (sim-level ones are skipped), not calibrated."""
    planned = parse_steps(list(steps))
    kept = [entry for entry, item in zip(steps, planned) if item.step.phase == "model"]
    context, report = prepare_fp32_model(model, example, kept, calibration, config=config, progress=False)
    return QuantSim(context.model, example, context.config), report


def stage_seconds(report: PTQReport) -> dict[str, float]:
    """Per-stage timings for the run record: ``prepare``, ``calibrate`` and ``ptq_<step>`` for each step."""
    seconds: dict[str, float] = {"prepare": report.build_seconds}
    if report.calibration_batches:
        seconds["calibrate"] = report.calibrate_seconds
    for index, step in enumerate(report.steps):
        key = f"ptq_{step.name}" if sum(s.name == step.name for s in report.steps) == 1 else f"ptq_{index}_{step.name}"
        seconds[key] = step.seconds
    return seconds
