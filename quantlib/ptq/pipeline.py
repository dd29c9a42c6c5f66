"""The PTQ pipeline: run a list of PTQ steps around QuantSim construction and calibration.

Entry point::

    sim, report = prepare_quantsim(model, example_input, "per_tensor", [
        {"name": "bn_fold"},
        {"name": "cle", "relu6": "per_channel_clip"},
        {"name": "bias_correction", "kind": "empirical"},
    ], calibration_loader)

Order of work:
    1. validate every step (unknown names, unknown keys and wrong types raise
       :class:`PTQConfigError` naming ``ptq.steps[i].key``; a model-level step after a sim-level
       step, or a step listed after one it ``must_precede``, is refused) -- before any work;
    2. deep-copy and fx-trace the model into the FP32 working copy ``context.model`` and capture
       the BatchNorm statistics of every layer BN follows (:mod:`quantlib.ptq.bn_stats`);
    3. run the model-level steps in the listed order on ``context.model``;
    4. build ``QuantSim(context.model, example_input, config)`` and calibrate it;
    5. run the sim-level steps in the listed order on ``context.sim``.

Step contract (for anyone adding a step):
    * A step is a :class:`~quantlib.ptq.registry.PTQStep`: ``name``, a frozen dataclass
      ``config_cls`` (its fields are the step's settings; validate values in ``__post_init__``
      and raise ``PTQConfigError("field=value ... ; use ...")``), ``run(context, config)``,
      ``phase`` ("model" or "sim") and optionally ``must_precede``.
    * ``run`` reads and mutates the :class:`~quantlib.ptq.registry.PTQContext`: model-level steps
      change ``context.model`` (an ``fx.GraphModule``, FP32) and keep
      ``context.layer_output_stats`` true when they rescale/shift a layer's output channels;
      sim-level steps change ``context.sim`` (calibrated, with activation and weight encodings)
      and may use ``context.model`` as the FP32 reference and ``context.calibration_data``
      (re-iterable). ``context.fp32_model`` is never mutated. Plots go to
      ``context.plots_dir`` (when not None) and their paths to ``context.plots``.
    * ``run`` returns a small JSON-able dict saying what it did (counts, errors); the report
      stores it with the step's seconds.
    * Registration: a module of the ``quantlib.ptq`` package defines
      ``STEPS: tuple[PTQStep, ...]``; :func:`default_registry` collects the ``STEPS`` of every
      module of the package (sorted by module name). One ``PTQStep(...)`` entry is one
      registration; a duplicate name raises.
"""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import load_config
from ..graph import trace
from ..quantsim import QuantSim
from .bn_stats import collect_bn_output_stats
from .registry import (
    PTQConfigError,
    PTQContext,
    PTQStep,
    StepRegistry,
    config_from_dict,
    config_to_dict,
    default_forward,
)

__all__ = ["PTQReport", "StepRecord", "default_registry", "parse_steps", "prepare_fp32_model", "prepare_quantsim"]


def default_registry() -> StepRegistry:
    """A new registry with the ``STEPS`` of every module of :mod:`quantlib.ptq` (sorted by module name)."""
    import quantlib.ptq as package

    registry = StepRegistry()
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        steps = getattr(module, "STEPS", None)
        if steps is None:
            continue
        if not isinstance(steps, tuple) or not all(isinstance(s, PTQStep) for s in steps):
            raise TypeError(f"{module.__name__}.STEPS must be a tuple of PTQStep, got {type(steps).__name__}")
        for step in steps:
            registry.add(step)
    return registry


@dataclass(frozen=True)
class PlannedStep:
    """A validated step: its registration, its config and where it was written."""

    step: PTQStep
    config: Any
    where: str


def parse_steps(steps: Sequence[str | Mapping[str, Any]], registry: StepRegistry | None = None,
                where: str = "ptq.steps") -> list[PlannedStep]:
    """Validate a step list (``"name"`` or ``{"name": ..., **settings}`` each); raises PTQConfigError."""
    registry = registry or default_registry()
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise PTQConfigError(f"{where} must be a list of steps, e.g. [{{name: bn_fold}}, {{name: cle}}]")
    planned: list[PlannedStep] = []
    for index, entry in enumerate(steps):
        here = f"{where}[{index}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping):
            raise PTQConfigError(f"{here} must be a step name or a mapping with 'name', got {entry!r}")
        if "name" not in entry:
            raise PTQConfigError(f"{here} needs a 'name'; use one of {', '.join(registry.names())}")
        step = registry.get(entry["name"], here)
        settings = {k: v for k, v in entry.items() if k != "name"}
        planned.append(PlannedStep(step, config_from_dict(step.config_cls, settings, here, step.name), here))
    _check_order(planned)
    return planned


def _check_order(planned: list[PlannedStep]) -> None:
    first_sim = next((p for p in planned if p.step.phase == "sim"), None)
    for index, item in enumerate(planned):
        if item.step.phase == "model" and first_sim is not None and planned.index(first_sim) < index:
            raise PTQConfigError(
                f"{item.where} ({item.step.name}) changes the FP32 model, so it must come before "
                f"{first_sim.where} ({first_sim.step.name}), which runs on the QuantSim; move it up")
        for earlier in planned[:index]:
            if earlier.step.name in item.step.must_precede:
                raise PTQConfigError(
                    f"{item.where} ({item.step.name}) must come before {earlier.where} ({earlier.step.name}); move it up")


@dataclass
class StepRecord:
    """One executed step: name, phase, seconds, its settings and what it did."""

    name: str
    phase: str
    seconds: float
    config: dict[str, Any]
    summary: dict[str, Any]


@dataclass
class PTQReport:
    """What :func:`prepare_quantsim` did, in order, with timings."""

    steps: list[StepRecord] = field(default_factory=list)
    build_seconds: float = 0.0
    calibrate_seconds: float = 0.0
    calibration_batches: int = 0
    plots: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for run records)."""
        return {
            "steps": [vars(s) for s in self.steps],
            "build_seconds": self.build_seconds,
            "calibrate_seconds": self.calibrate_seconds,
            "calibration_batches": self.calibration_batches,
            "plots": list(self.plots),
        }

    def format(self) -> str:
        """One line per step, for logs."""
        lines = [f"quantsim build {self.build_seconds:.2f}s, calibrate {self.calibrate_seconds:.2f}s "
                 f"({self.calibration_batches} batches)"]
        for s in self.steps:
            lines.append(f"{s.name:<22}{s.phase:<7}{s.seconds:>8.2f}s  {json.dumps(s.summary, sort_keys=True)}")
        return "\n".join(lines)


def _check_reiterable(data: Iterable) -> None:
    if iter(data) is data:
        raise PTQConfigError("calibration_data is a one-shot iterator; pass a DataLoader or a list, "
                             "which PTQ steps can read more than once")


def _new_context(model: nn.Module, example_input: Any, config: Any, calibration_data: Iterable, *,
                 progress: bool, plots_dir: str | Path | None, forward_fn: Callable | None,
                 extra_leaf_types: tuple[type, ...], score_fn: Callable[[nn.Module], float] | None = None,
                 ) -> PTQContext:
    _check_reiterable(calibration_data)
    working = trace(copy.deepcopy(model).eval(), extra_leaf_types)
    return PTQContext(
        fp32_model=model, model=working, example_input=example_input, config=load_config(config),
        calibration_data=calibration_data, forward_fn=forward_fn or default_forward, progress=progress,
        plots_dir=Path(plots_dir) if plots_dir is not None else None,
        layer_output_stats=collect_bn_output_stats(working), score_fn=score_fn,
    )


def _run_steps(context: PTQContext, planned: list[PlannedStep], phase: str, report: PTQReport) -> None:
    for item in planned:
        if item.step.phase != phase:
            continue
        start = time.perf_counter()
        summary = item.step.run(context, item.config)
        report.steps.append(StepRecord(item.step.name, item.step.phase, round(time.perf_counter() - start, 3),
                                       config_to_dict(item.config), dict(summary or {})))
    report.plots = [str(p) for p in context.plots]


def prepare_fp32_model(model: nn.Module, example_input: torch.Tensor | tuple,
                       steps: Sequence[str | Mapping[str, Any]], calibration_data: Iterable, *,
                       config: Any = "per_channel", progress: bool = True, plots_dir: str | Path | None = None,
                       forward_fn: Callable[[nn.Module, Any, torch.device], Any] | None = None,
                       registry: StepRegistry | None = None,
                       extra_leaf_types: tuple[type, ...] = ()) -> tuple[PTQContext, PTQReport]:
    """Run only model-level ``steps`` (sim-level ones are refused) on an FP32 copy of ``model``.

    Returns the context, whose ``model`` is the prepared FP32 ``fx.GraphModule`` (e.g. to measure
    what CLE's ReLU6 -> ReLU conversion does to FP32 accuracy, or to export an equalized model),
    and the report. Arguments as in :func:`prepare_quantsim`.
    """
    planned = parse_steps(steps, registry)
    sim_steps = [p for p in planned if p.step.phase == "sim"]
    if sim_steps:
        raise PTQConfigError(f"{sim_steps[0].where} ({sim_steps[0].step.name}) runs on a QuantSim; "
                             "use prepare_quantsim for sim-level steps")
    context = _new_context(model, example_input, config, calibration_data, progress=progress, plots_dir=plots_dir,
                           forward_fn=forward_fn, extra_leaf_types=extra_leaf_types)
    report = PTQReport()
    _run_steps(context, planned, "model", report)
    return context, report


def prepare_quantsim(model: nn.Module, example_input: torch.Tensor | tuple, config: Any,
                     steps: Sequence[str | Mapping[str, Any]], calibration_data: Iterable, *,
                     progress: bool = True, plots_dir: str | Path | None = None,
                     forward_fn: Callable[[nn.Module, Any, torch.device], Any] | None = None,
                     registry: StepRegistry | None = None, extra_leaf_types: tuple[type, ...] = (),
                     num_calibration_batches: int | None = None,
                     score_fn: Callable[[nn.Module], float] | None = None) -> tuple[QuantSim, PTQReport]:
    """Apply ``steps`` and return the calibrated QuantSim and a :class:`PTQReport`.

    Args:
        model: any fx-traceable ``nn.Module`` (not mutated); runs on its own device.
        example_input: a tensor or tuple with the model's input shape.
        config: a QuantSim config (preset name, YAML path, mapping or QuantSimConfig).
        steps: ``[{"name": "bn_fold"}, {"name": "cle", "relu6": "per_channel_clip"}, ...]``; a bare
            name stands for a step with default settings; ``[]`` gives plain QuantSim + calibrate.
        calibration_data: re-iterable batches (tensors or (inputs, labels)), e.g. a DataLoader.
        progress: progress bars for calibration and data-driven steps.
        plots_dir: folder for PNG plots (e.g. CLE weight ranges); None writes none.
        forward_fn: ``forward_fn(model, batch, device)``; default handles tensors and pairs.
        registry: steps to choose from (default: :func:`default_registry`).
        extra_leaf_types: module types fx should not trace into (passed to QuantSim).
        num_calibration_batches: calibrate on at most this many batches (None: all).
        score_fn: ``score_fn(model) -> float`` (higher is better) for searching steps
            (sensitivity, mixed precision, AutoQuant); see :class:`PTQContext`.

    Raises PTQConfigError (one line, naming ``ptq.steps[i]...``) before any work for a bad list.
    """
    planned = parse_steps(steps, registry)
    context = _new_context(model, example_input, config, calibration_data, progress=progress, plots_dir=plots_dir,
                           forward_fn=forward_fn, extra_leaf_types=extra_leaf_types, score_fn=score_fn)
    report = PTQReport()
    _run_steps(context, planned, "model", report)
    start = time.perf_counter()
    context.sim = QuantSim(context.model, example_input, context.config, extra_leaf_types=extra_leaf_types)
    report.build_seconds = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    report.calibration_batches = context.sim.calibrate(calibration_data, num_batches=num_calibration_batches,
                                                       forward_fn=context.forward_fn, progress=progress)
    report.calibrate_seconds = round(time.perf_counter() - start, 3)
    _run_steps(context, planned, "sim", report)
    return context.sim, report
