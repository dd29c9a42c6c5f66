"""AutoQuant: climb a ladder of PTQ techniques until a score target is met (AIMET's AutoQuant,
Intel Neural Compressor's accuracy-aware tuning).

Pipeline step ``autoquant`` (phase "sim"). With the caller's ``score_fn`` (e.g. top-1 on the
labelled calibration split) it:

1. scores the FP32 model (``context.fp32_model``) and sets the target ``fp32 - target_drop``;
2. scores the calibrated sim as the pipeline built it (the ``baseline`` trial); if it meets the
   target it stops there;
3. tries each rung of ``ladder`` in order (default: BatchNorm folding -> cross-layer
   equalization -> bias correction -> AdaRound -> mixed precision), each on top of the best state
   so far, and scores the result. A rung that raises the score is kept; one that does not is
   recorded and dropped (``keep_if_worse`` keeps every rung). It stops at the first state that
   meets the target; the rungs after it are recorded as not tried.

Rungs are registered PTQ steps run through their own ``run(context, config)`` on a copy of the
state: a model-level rung (bn_fold, cle, ...) changes a copy of the FP32 working model, from which
a new QuantSim is built and calibrated on the calibration data; a sim-level rung (bias_correction,
adaround, mixed_precision, ...) changes a copy of the best sim. ``settings`` holds each rung's
step settings (``{adaround: {num_iterations: 500}}``); the mixed_precision rung's ``max_drop``
defaults to ``target_drop``. Model-level rungs must come before sim-level rungs in the ladder.

Corrective rungs (``PTQStep.corrective``: bias correction) fix up the quantization error of the
sim they run on, so they go stale when a later rung changes that error: AdaRound re-rounds the
weights, mixed precision changes bit-widths. A later sim-level rung is therefore applied to the
sim *before* the kept corrections, the corrections are run again on its result, and the better of
the two (with or without them) is the rung's candidate; the trial records both scores. Without
this, AdaRound and mixed precision started from biases corrected for the nearest-rounded 4-bit
error and scored far below what they give alone.

When it ends, ``context.sim`` and ``context.model`` are the best state found (the first to meet
the target, else the best-scoring one). The summary lists every trial with its score, seconds and
its step's own summary. Because model-level rungs rebuild the sim from the working model, sim-level
steps listed before ``autoquant`` in ``ptq.steps`` would be lost: list autoquant as the only
sim-level step, or first.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..quantsim import QuantSim
from .pass_config import PassConfigError, check_positive
from .registry import PTQConfigError, PTQContext, PTQStep, config_from_dict, config_to_dict

DEFAULT_LADDER = ("bn_fold", "cle", "bias_correction", "adaround", "mixed_precision")


def _registry():
    from .pipeline import default_registry  # the pipeline discovers this module: import at call time

    return default_registry()


@dataclass(frozen=True)
class AutoQuantConfig:
    """Settings of AutoQuant.

    Attributes:
        target_drop: stop once the score is at least the FP32 score minus this (score units).
        ladder: registered PTQ step names, tried in order (model-level ones first).
        settings: ``{step name: {setting: value}}`` for rungs of the ladder.
        keep_if_worse: keep a rung's result even when it lowers the score.
    """

    target_drop: float = 1.0
    ladder: tuple[str, ...] = DEFAULT_LADDER
    settings: Any = field(default_factory=dict)
    keep_if_worse: bool = False

    def __post_init__(self) -> None:
        check_positive("target_drop", self.target_drop, allow_zero=True)
        if not isinstance(self.settings, Mapping):
            raise PassConfigError(f"settings={self.settings!r} must map rung names to settings, e.g. {{adaround: {{num_iterations: 500}}}}")
        self.rungs()

    def rungs(self) -> list[tuple[PTQStep, Any]]:
        """The ladder as (step, validated step config) pairs; PTQConfigError names the bad entry."""
        registry = _registry()
        unknown = sorted(set(self.settings) - set(self.ladder))
        if unknown:
            raise PTQConfigError(f"settings.{unknown[0]} is not a rung of ladder={list(self.ladder)}; add it or drop its settings")
        if len(set(self.ladder)) != len(self.ladder):
            raise PTQConfigError(f"ladder={list(self.ladder)} names a step twice; list each once")
        rungs = []
        seen_sim = None
        for index, name in enumerate(self.ladder):
            if name == "autoquant":
                raise PTQConfigError("ladder cannot contain autoquant itself")
            step = registry.get(name, f"ladder[{index}]")
            if step.phase == "sim":
                seen_sim = seen_sim or name
            elif seen_sim is not None:
                raise PTQConfigError(f"ladder[{index}]={name} changes the FP32 model, so it must come before {seen_sim}; move it up")
            values = dict(self.settings.get(name) or {})
            if name == "mixed_precision":
                values.setdefault("max_drop", self.target_drop)
            rungs.append((step, config_from_dict(step.config_cls, values, f"settings.{name}", name)))
        return rungs


@dataclass
class _State:
    """A candidate result: the FP32 working model, its calibrated sim, BN stats and score.

    ``uncorrected`` is the sim before the corrective rungs in ``corrections`` (bias correction)
    were applied, ``sim`` the sim after them (the same object when there are none).
    """

    model: fx.GraphModule
    sim: QuantSim
    layer_output_stats: dict[str, Any]
    score: float
    applied: list[str]
    uncorrected: QuantSim
    corrections: list[tuple[PTQStep, Any]] = field(default_factory=list)


def _sub_context(context: PTQContext, stats: dict[str, Any], *, model: fx.GraphModule, sim: QuantSim | None,
                 score_fn: Callable[[nn.Module], float], plots: str) -> PTQContext:
    return PTQContext(
        fp32_model=context.fp32_model, model=model, example_input=context.example_input, config=context.config,
        calibration_data=context.calibration_data, forward_fn=context.forward_fn, progress=context.progress,
        plots_dir=context.plots_dir / f"autoquant_{plots}" if context.plots_dir is not None else None,
        layer_output_stats=copy.deepcopy(stats), sim=sim, score_fn=score_fn)


def _apply(context: PTQContext, model: fx.GraphModule, sim: QuantSim, stats: dict[str, Any], step: PTQStep,
           step_config: Any, score_fn: Callable[[nn.Module], float], plots: str) -> tuple[PTQContext, dict[str, Any]]:
    """Run a sim-level step on a copy of ``sim``; returns its context (holding the new sim) and summary."""
    sub = _sub_context(context, stats, model=model, sim=copy.deepcopy(sim), score_fn=score_fn, plots=plots)
    summary = step.run(sub, step_config)
    context.plots.extend(sub.plots)
    return sub, dict(summary or {})


def _try_rung(context: PTQContext, state: _State, step: PTQStep, step_config: Any,
              score_fn: Callable[[nn.Module], float]) -> tuple[_State, dict[str, Any]]:
    """Apply one rung to a copy of ``state``; returns the new state (scored) and what the trial records.

    A corrective rung goes on top of the state's sim. Any other sim-level rung goes on the sim
    before the state's corrections (they were measured for the old quantization error), and the
    corrections are then run again on its result; the corrections stay only if that scores higher.
    """
    if step.phase == "model":
        sub = _sub_context(context, state.layer_output_stats, model=copy.deepcopy(state.model), sim=None,
                           score_fn=score_fn, plots=step.name)
        summary = dict(step.run(sub, step_config) or {})
        context.plots.extend(sub.plots)
        sub.sim = QuantSim(sub.model, context.example_input, context.config)
        sub.sim.calibrate(context.calibration_data, forward_fn=context.forward_fn, progress=context.progress)
        new = _State(model=sub.model, sim=sub.sim, layer_output_stats=sub.layer_output_stats,
                     score=float(score_fn(sub.sim.model)), applied=[*state.applied, step.name], uncorrected=sub.sim)
        return new, {"summary": summary}
    if step.corrective:
        sub, summary = _apply(context, state.model, state.sim, state.layer_output_stats, step, step_config, score_fn,
                              step.name)
        new = _State(model=state.model, sim=sub.sim, layer_output_stats=sub.layer_output_stats,
                     score=float(score_fn(sub.sim.model)), applied=[*state.applied, step.name],
                     uncorrected=state.uncorrected, corrections=[*state.corrections, (step, step_config)])
        return new, {"summary": summary}
    names = [c.name for c, _ in state.corrections]
    base_applied = [name for name in state.applied if name not in names]
    sub, summary = _apply(context, state.model, state.uncorrected, state.layer_output_stats, step, step_config,
                          score_fn, step.name)
    plain = _State(model=state.model, sim=sub.sim, layer_output_stats=sub.layer_output_stats,
                   score=float(score_fn(sub.sim.model)), applied=[*base_applied, step.name], uncorrected=sub.sim)
    if not state.corrections:
        return plain, {"summary": summary}
    sim, stats, reapplied = plain.sim, plain.layer_output_stats, {}
    for correction, correction_config in state.corrections:
        fixed, reapplied[correction.name] = _apply(context, state.model, sim, stats, correction, correction_config,
                                                   score_fn, f"{step.name}_{correction.name}")
        sim, stats = fixed.sim, fixed.layer_output_stats
    corrected = _State(model=state.model, sim=sim, layer_output_stats=stats, score=float(score_fn(sim.model)),
                       applied=[*plain.applied, *names], uncorrected=plain.sim, corrections=list(state.corrections))
    keep = corrected.score > plain.score
    record = {"summary": summary, "reapplied": names, "score_without_reapplied": plain.score,
              "score_with_reapplied": corrected.score, "reapplied_kept": keep, "reapplied_summaries": reapplied}
    return (corrected if keep else plain), record


def run_autoquant(caller: PTQContext, config: AutoQuantConfig) -> dict[str, Any]:
    """Climb the ladder on ``caller`` (see the module docstring); returns the JSON-able summary.

    Mutates ``caller.sim``, ``caller.model``, ``caller.layer_output_stats`` (the best state) and
    ``caller.plots``. The calibration batches are held in memory for the run (one list).
    """
    sim = caller.require_sim("autoquant")
    score_fn = caller.require_score_fn("autoquant")
    rungs = config.rungs()
    # every rung reads the calibration data again (calibration, bias correction, AdaRound, ...):
    # hold the batches once instead of decoding and preprocessing them on every pass (the copy
    # shares the caller's plots list)
    context = dataclasses.replace(caller, calibration_data=list(caller.calibration_data))
    fp32_score = float(score_fn(context.fp32_model))

    def scored(model: nn.Module) -> float:  # rungs that score the FP32 model again reuse the number
        return fp32_score if model is context.fp32_model else float(score_fn(model))

    target = fp32_score - config.target_drop
    start = time.perf_counter()
    best = _State(model=context.model, sim=sim, layer_output_stats=context.layer_output_stats,
                  score=float(score_fn(sim.model)), applied=[], uncorrected=sim)
    trials: list[dict[str, Any]] = [{"rung": "baseline", "score": best.score, "kept": True,
                                     "seconds": round(time.perf_counter() - start, 3), "met": best.score >= target}]
    for step, step_config in rungs:
        if best.score >= target:
            trials.append({"rung": step.name, "tried": False, "reason": "target met before this rung"})
            continue
        start = time.perf_counter()
        candidate, record = _try_rung(context, best, step, step_config, scored)
        kept = config.keep_if_worse or candidate.score > best.score
        trials.append({"rung": step.name, "tried": True, "config": config_to_dict(step_config),
                       "score": candidate.score, "gain": candidate.score - best.score, "kept": kept,
                       "met": candidate.score >= target, "seconds": round(time.perf_counter() - start, 3), **record})
        if kept:
            best = candidate
    caller.model, caller.sim, caller.layer_output_stats = best.model, best.sim, best.layer_output_stats
    return {"fp32_score": fp32_score, "target_drop": config.target_drop, "target_score": target,
            "met": best.score >= target, "final_score": best.score, "applied": best.applied, "trials": trials}


STEPS = (
    PTQStep(name="autoquant", config_cls=AutoQuantConfig, run=run_autoquant, phase="sim",
            description="try BN fold, CLE, bias correction, AdaRound, mixed precision in turn until a score target is met"),
)
