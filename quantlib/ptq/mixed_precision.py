"""Automatic mixed precision: per-layer-group bitwidths that meet a score-drop budget at the fewest bit-ops.

The search follows AIMET's AMP (quantizer groups, candidate (weight, activation) bitwidth pairs,
a greedy Pareto front, then a binary search on it), with the per-candidate sensitivity measured
as output SQNR instead of accuracy so that phase 1 costs forward passes on a few samples, not one
scoring per group and candidate:

1. **Formats** (:class:`~quantlib.ptq.precision_formats.PrecisionSwitch`): every candidate weight
   format of every layer group and every candidate activation encoding are prepared once (one
   calibration pass per activation bitwidth); everything starts at the widest candidate.
2. **Sensitivity**: for each group and each narrower candidate, only that group is narrowed and
   the relative output noise ``sum((y - y_q)^2) / sum(y^2)`` against the float model is measured
   on ``num_samples`` calibration samples (minus the noise with every group at the widest).
3. **Pareto path**: starting from all-widest, repeatedly narrow the group whose next narrower
   candidate adds the least estimated noise per bit-op saved (noise of groups is taken as
   additive), down to all-narrowest. Each point of the path has its bit-ops
   (:func:`quantlib.cost.model_cost` conventions: MACs x weight bits x activation bits) and an
   estimated output SQNR.
4. **Selection** (:mod:`~quantlib.ptq.budget_selection`): ``score_fn`` (e.g. top-1 on the
   labelled calibration split) is evaluated at ``curve_points`` evenly spaced points (for the
   plot), then ``selection: score`` binary-searches for the point with the fewest bit-ops whose
   score is at least ``reference_score - max_drop``, while ``selection: noise_fit`` scores points
   up a ladder of estimated noise, fits ``drop = slope * noise`` and chooses the last point whose
   fitted drop is within the budget. That point is applied to the sim and every score evaluated
   is recorded (the Pareto curve explored).

The sim is mutated: its groups end at the chosen formats (encodings from step 1, weights of
frozen layers kept at their own bitwidth). When even the widest assignment misses the budget, the
sim is left at the widest assignment and ``met`` is false. Under ``noise_fit`` ``met`` is the
fit's verdict, and the chosen point's own score may sit below the target.

Pipeline step ``mixed_precision`` (phase "sim"): ``reference_score`` is ``score_fn`` on the FP32
model the pipeline was given; the Pareto plot goes to ``plots_dir``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cost import model_cost
from ..quantsim import QuantSim
from ..spec import OBSERVERS
from .budget_selection import PathScorer, select_by_noise_fit, select_by_score
from .pass_config import PassConfigError, check_choice, check_int, check_positive
from .precision_formats import Candidate, PrecisionSwitch, parse_candidates
from .quantizer_groups import QuantizerGroup, fp32_reference, quantizer_groups, select
from .registry import PTQContext, PTQStep
from .sensitivity import model_outputs


SELECTIONS = ("score", "noise_fit")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Settings of the mixed-precision search.

    Attributes:
        candidates: (weight, activation) bitwidth pairs written ``w4a8``; at least two.
        max_drop: allowed drop of ``score_fn`` below the FP32 model's score (score units, e.g.
            top-1 points).
        num_samples: calibration samples for the SQNR sensitivity of phase 2.
        curve_points: extra evenly spaced Pareto points scored for the plot (0: only the points the
            selection scores).
        include, exclude: fnmatch globs over layer-group names (first weight module of the group);
            groups left out keep their format.
        selection: how the budget is judged along the path (:mod:`quantlib.ptq.budget_selection`):
            ``score`` binary-searches single scores; ``noise_fit`` fits ``drop = slope * noise`` to
            points scored along the path and chooses by the fitted drop (for scores too coarse to
            resolve the budget, e.g. top-1 on a few hundred images).
        fit_window: ``noise_fit`` scores points until one drops more than ``fit_window * max_drop``
            and fits over the points within that drop.
        weight_observers: weight bitwidth -> observer of the weight ranges at that bitwidth, e.g.
            ``{4: mse, 8: minmax}``: MSE-searched clipping helps 4-bit grids, while at 8 bits the
            full range loses less. Bitwidths not named keep the quantizers' observer. Keys may be
            ints or their strings (a run record's JSON); they must be candidate weight bitwidths.
    """

    candidates: tuple[str, ...] = ("w4a8", "w8a8", "w16a16")
    max_drop: float = 0.5
    num_samples: int = 32
    curve_points: int = 0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    weight_observers: Mapping[int, str] = field(default_factory=dict)
    selection: str = "score"
    fit_window: float = 10.0

    def __post_init__(self) -> None:
        candidates = self.parsed_candidates()
        check_positive("max_drop", self.max_drop, allow_zero=True)
        check_choice("selection", self.selection, SELECTIONS)
        check_positive("fit_window", self.fit_window)
        if self.fit_window < 1:
            raise PassConfigError(f"fit_window={self.fit_window!r} must be >= 1: it is in budgets (max_drop), and a "
                                  "point within the budget must not end the noise ladder; 10 is the default")
        if self.selection == "noise_fit" and self.max_drop <= 0:
            raise PassConfigError(f"max_drop={self.max_drop!r}: selection 'noise_fit' fits a drop model and needs a "
                                  "budget > 0; use selection: score for a zero budget")
        check_int("num_samples", self.num_samples, 1)
        check_int("curve_points", self.curve_points, 0)
        object.__setattr__(self, "weight_observers", _weight_observers(self.weight_observers, candidates))

    def parsed_candidates(self) -> tuple[Candidate, ...]:
        """The candidates, cheapest first."""
        return parse_candidates(self.candidates)


def _weight_observers(values: Any, candidates: Sequence[Candidate]) -> dict[int, str]:
    """``weight_observers`` with int keys, checked against the candidates and the observer names."""
    if not isinstance(values, Mapping):
        raise PassConfigError(f"weight_observers={values!r} must map weight bitwidths to observers, e.g. {{4: mse, 8: minmax}}")
    bitwidths = sorted({c.weight_bits for c in candidates})
    checked: dict[int, str] = {}
    for key, name in values.items():
        try:
            bits = int(key)
        except (TypeError, ValueError):
            bits = None
        if bits not in bitwidths:
            raise PassConfigError(f"weight_observers key {key!r} is not a candidate weight bitwidth; use one of {bitwidths}")
        check_choice(f"weight_observers[{bits}]", name, OBSERVERS)
        checked[bits] = name
    return dict(sorted(checked.items()))


@dataclass
class ParetoPoint:
    """One point of the greedy path: bit-ops, estimated SQNR (dB), and the score if evaluated."""

    index: int
    bitops: int
    estimated_sqnr_db: float
    score: float | None = None


@dataclass
class MixedPrecisionResult:
    """What the search found; :meth:`to_dict` is JSON-ready (the run record's step summary)."""

    candidates: tuple[Candidate, ...]
    reference_score: float
    target_score: float
    met: bool
    chosen_index: int
    chosen: dict[str, Candidate]
    path: list[ParetoPoint]
    bitops_start: int
    bitops_chosen: int
    bitops_uniform: dict[str, int]
    sensitivity_sqnr_db: dict[str, dict[str, float]] = field(default_factory=dict)
    selection: str = "score"
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluated(self) -> list[ParetoPoint]:
        return [p for p in self.path if p.score is not None]

    @property
    def chosen_score(self) -> float | None:
        return self.path[self.chosen_index].score

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for candidate in self.chosen.values():
            counts[candidate.name] = counts.get(candidate.name, 0) + 1
        return {
            "candidates": [c.name for c in self.candidates],
            "reference_score": self.reference_score, "target_score": self.target_score, "met": self.met,
            "chosen_score": self.chosen_score, "chosen_index": self.chosen_index, "path_length": len(self.path),
            "bitops_start": self.bitops_start, "bitops_chosen": self.bitops_chosen,
            "bitops_uniform": self.bitops_uniform,
            "bitops_vs_start": round(self.bitops_chosen / self.bitops_start, 4) if self.bitops_start else None,
            "groups_per_candidate": dict(sorted(counts.items())),
            "chosen": {name: c.name for name, c in self.chosen.items()},
            "evaluated": [{"index": p.index, "bitops": p.bitops, "score": p.score,
                           "estimated_sqnr_db": _finite(p.estimated_sqnr_db)} for p in self.evaluated],
            "path": [{"index": p.index, "bitops": p.bitops, "estimated_sqnr_db": _finite(p.estimated_sqnr_db)}
                     for p in self.path],
            "sensitivity_sqnr_db": {g: {c: _finite(v) for c, v in per.items()} for g, per in self.sensitivity_sqnr_db.items()},
            **({"selection": self.selection, "fit": self.fit} if self.selection != "score" else {}),
        }


def _finite(value: float) -> float | str:
    return round(value, 3) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _noise(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    noise = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(reference, outputs))
    return noise / signal if signal > 0 else math.inf


def _sqnr_db(noise: float) -> float:
    return math.inf if noise <= 0 else -10.0 * math.log10(noise)


def searched_groups(sim: QuantSim, config: MixedPrecisionConfig) -> list[QuantizerGroup]:
    """Layer groups matching the globs, in graph order."""
    groups = [g for g in quantizer_groups(sim) if g.kind == "layer"]
    chosen = set(select([g.name for g in groups], config.include, config.exclude))
    return [g for g in groups if g.name in chosen]


def greedy_path(groups: Sequence[str], candidates: Sequence[Candidate], added_noise: dict[str, dict[Candidate, float]],
                group_bitops: Callable[[str, Candidate], int]) -> list[dict[str, Candidate]]:
    """Assignments from all-widest to all-narrowest, one group narrowed by one candidate per step.

    At each step the move with the least added noise per bit-op saved is taken (ties: graph
    order); ``added_noise[g][c]`` is the estimated noise with ``g`` at ``c`` (0 at the widest).
    """
    order = list(candidates)
    level = {g: len(order) - 1 for g in groups}
    path = [{g: order[level[g]] for g in groups}]
    while any(level[g] > 0 for g in groups):
        best, best_key = None, None
        for position, g in enumerate(groups):
            if level[g] == 0:
                continue
            now, nxt = order[level[g]], order[level[g] - 1]
            saved = group_bitops(g, now) - group_bitops(g, nxt)
            extra = max(added_noise[g][nxt] - added_noise[g][now], 0.0)
            key = (extra / saved if saved > 0 else math.inf, position)
            if best_key is None or key < best_key:
                best, best_key = g, key
        level[best] -= 1
        path.append({g: order[level[g]] for g in groups})
    return path


def search_mixed_precision(sim: QuantSim, data: Iterable, batches: Sequence[tuple[torch.Tensor, ...]],
                           score_fn: Callable[[nn.Module], float], reference_score: float,
                           config: MixedPrecisionConfig | None = None, *, forward_fn: Callable | None = None,
                           progress: bool = False) -> MixedPrecisionResult:
    """Run the search (module docstring) on ``sim`` (mutated) and return a :class:`MixedPrecisionResult`.

    Args:
        sim: a calibrated QuantSim built with a one-sample ``example_input`` for per-inference bit-ops.
        data: re-iterable calibration batches (activation encodings per bitwidth).
        batches: input tuples for the SQNR sensitivity.
        score_fn: ``score_fn(model) -> float``, higher is better (labelled calibration data).
        reference_score: the score the budget is measured from (the FP32 model's).
        config: the settings.
        forward_fn: ``forward_fn(model, batch, device)`` for calibration.
    """
    config = config or MixedPrecisionConfig()
    candidates = config.parsed_candidates()
    groups = searched_groups(sim, config)
    if not groups:
        raise PassConfigError(f"include={list(config.include)} exclude={list(config.exclude)} select no layer group; "
                              "use include: ['*']")
    bitops_start = model_cost(sim).bitops
    reference = model_outputs(fp32_reference(sim), batches)
    switch = PrecisionSwitch(sim, groups, candidates, data, forward_fn=forward_fn, progress=progress,
                             weight_observers=config.weight_observers)
    names = [g.name for g in groups]
    base_noise = _noise(reference, model_outputs(sim.model, batches))
    added: dict[str, dict[Candidate, float]] = {g: {candidates[-1]: 0.0} for g in names}
    sensitivity: dict[str, dict[str, float]] = {}
    for g in tqdm(names, desc="mixed precision: sensitivity", disable=not progress, leave=False):
        for candidate in candidates[:-1]:
            switch.apply({g: candidate})
            group_noise = _noise(reference, model_outputs(sim.model, batches))
            added[g][candidate] = max(group_noise - base_noise, 0.0)
            sensitivity.setdefault(g, {})[candidate.name] = _sqnr_db(group_noise)
        switch.apply({g: candidates[-1]})
    path_assignments = greedy_path(names, candidates, added, switch.costs.group_bitops)
    noise = [base_noise + sum(added[g][c] for g, c in a.items()) for a in path_assignments]
    path = [ParetoPoint(i, switch.bitops(a), _sqnr_db(n)) for i, (a, n) in enumerate(zip(path_assignments, noise))]
    target = reference_score - config.max_drop
    bar = tqdm(desc="mixed precision: scoring", disable=not progress, leave=False)

    def score_point(index: int) -> float:
        switch.apply(path_assignments[index])
        bar.update(1)
        return float(score_fn(sim.model))

    scorer = PathScorer(score_point)
    measured: dict[int, float] = {0: base_noise}

    def measured_noise(index: int) -> float:
        if index not in measured:
            switch.apply(path_assignments[index])
            measured[index] = _noise(reference, model_outputs(sim.model, batches))
        return measured[index]

    last = len(path) - 1
    try:
        for k in range(1, config.curve_points + 1):
            scorer(round(k * last / (config.curve_points + 1)))
        if config.selection == "noise_fit":
            selection = select_by_noise_fit(scorer, noise, measured_noise, reference_score, config.max_drop,
                                            config.fit_window)
            scorer(selection.chosen)  # the chosen point's own score goes in the record
        else:
            selection = select_by_score(scorer, last, target)
    finally:
        bar.close()
    for index, value in scorer.scores.items():
        path[index].score = value
    chosen, met = selection.chosen, selection.met
    switch.apply(path_assignments[chosen])
    uniform = {c.name: switch.bitops({g: c for g in names}) for c in candidates}
    return MixedPrecisionResult(candidates=candidates, reference_score=reference_score, target_score=target, met=met,
                                chosen_index=chosen, chosen=dict(path_assignments[chosen]), path=path,
                                bitops_start=bitops_start, bitops_chosen=model_cost(sim).bitops,
                                bitops_uniform=uniform, sensitivity_sqnr_db=sensitivity, selection=config.selection,
                                fit=selection.fit)


def _run_mixed_precision(context: PTQContext, config: MixedPrecisionConfig) -> dict[str, Any]:
    from .mixed_precision_plots import plot_pareto

    sim = context.require_sim("mixed_precision")
    score_fn = context.require_score_fn("mixed_precision")
    reference_score = float(score_fn(context.fp32_model))
    data = list(context.calibration_data)  # read once per activation bitwidth: decode it once
    result = search_mixed_precision(sim, data, context.input_batches(config.num_samples), score_fn,
                                    reference_score, config, forward_fn=context.forward_fn, progress=context.progress)
    summary = result.to_dict()
    if context.plots_dir is not None:
        path = plot_pareto(result, context.plots_dir / "mixed_precision_pareto.png")
        context.plots.append(path)
        summary["plots"] = [str(path)]
    return summary


STEPS = (
    PTQStep(name="mixed_precision", config_cls=MixedPrecisionConfig, run=_run_mixed_precision, phase="sim",
            description="per-layer bitwidths from candidates meeting a score-drop budget at the fewest bit-ops (PNG Pareto plot)"),
)
