"""Per-layer compression ratio selection: AIMET's greedy selection, or ratios given by hand.

Greedy selection (AIMET ``GreedySelectionParameters`` / ``GreedyCompRatioSelectAlgo``):

1. *Sensitivity*: for every layer and every candidate ratio, compress that layer alone and score
   the model with ``eval_fn`` (higher is better, e.g. top-1 on the calibration split).
2. *Selection*: for an accuracy threshold ``t``, give each layer the smallest candidate ratio whose
   score is at least ``t`` (1.0, uncompressed, when none is). Lowering ``t`` can only lower the
   cost, so the highest ``t`` (among the scores in the table) whose per-layer ratios bring the
   model's cost to at most ``target * base cost`` is the answer. AIMET bisects ``t`` on a
   continuous range; every ratio choice changes only where ``t`` crosses a table score, so scanning
   those scores finds the same optimum exactly.
3. *Tie-break*: scores tie often on a small calibration set, so crossing one score can move many
   layers at once; of the layers that move at the chosen threshold, only as many are moved as the
   budget needs (highest score first, then the largest saving).

A ratio is the share kept of what the method removes (a layer's cost for SVD, its channels for
channel pruning); the cost is the model's MACs or parameters, as the :class:`CompressionSpace` counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn
from tqdm.auto import tqdm


class SelectionError(ValueError):
    """The target cannot be met or the ratios are invalid; the message names the setting and the fix."""


class CompressionSpace(Protocol):
    """A model, a compression method and the layers it may compress."""

    def layers(self) -> list[str]:
        """Names of the layers (or prunable units) the method may compress, in graph order."""

    def cost(self, ratios: Mapping[str, float]) -> int:
        """The whole model's cost (MACs or parameters) when each named layer is compressed at its ratio (others: 1.0)."""

    def apply(self, ratios: Mapping[str, float]) -> nn.Module:
        """A new model with each named layer compressed at its ratio; the space's model is not mutated."""


@dataclass(frozen=True)
class Selection:
    """Chosen per-layer ratios and how they were found.

    ``ratios``: layer -> ratio (only compressed layers); ``cost``/``base_cost``: model cost with
    the ratios and uncompressed; ``table``: layer -> {ratio: score} (empty for manual ratios);
    ``baseline_score``: the uncompressed model's score (None for manual ratios); ``threshold``:
    the accuracy threshold the greedy search settled on.
    """

    ratios: dict[str, float]
    cost: int
    base_cost: int
    table: dict[str, dict[float, float]] = field(default_factory=dict)
    baseline_score: float | None = None
    threshold: float | None = None

    @property
    def cost_ratio(self) -> float:
        return self.cost / self.base_cost

    def to_dict(self) -> dict:
        """JSON-able: ratio keys of the table become strings."""
        return {"ratios": dict(self.ratios), "cost": self.cost, "base_cost": self.base_cost,
                "cost_ratio": self.cost_ratio, "baseline_score": self.baseline_score, "threshold": self.threshold,
                "table": {layer: {f"{r:g}": s for r, s in scores.items()} for layer, scores in self.table.items()}}


def _check_ratio(name: str, ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise SelectionError(f"ratio {ratio} for layer {name!r} must be in (0, 1]; it is the share kept")


def manual_selection(space: CompressionSpace, ratios: Mapping[str, float]) -> Selection:
    """Use the given layer -> ratio mapping as it is; SelectionError naming an unknown layer or bad ratio."""
    layers = set(space.layers())
    for name, ratio in ratios.items():
        if name not in layers:
            raise SelectionError(f"layer {name!r} cannot be compressed by this method; compressible layers: {', '.join(sorted(layers))}")
        _check_ratio(name, ratio)
    kept = {name: float(r) for name, r in ratios.items() if r < 1}
    return Selection(kept, space.cost(kept), space.cost({}))


def sensitivity_table(space: CompressionSpace, eval_fn: Callable[[nn.Module], float], candidates: Sequence[float],
                      *, progress: bool = True) -> dict[str, dict[float, float]]:
    """layer -> {candidate ratio: eval_fn score with only that layer compressed} (one eval per entry)."""
    table: dict[str, dict[float, float]] = {}
    jobs = [(layer, ratio) for layer in space.layers() for ratio in candidates]
    for layer, ratio in tqdm(jobs, desc="sensitivity", disable=not progress, leave=False):
        table.setdefault(layer, {})[ratio] = float(eval_fn(space.apply({layer: ratio})))
    return table


def _ratios_at(table: Mapping[str, Mapping[float, float]], threshold: float) -> dict[str, float]:
    chosen = {}
    for layer, scores in table.items():
        passing = [ratio for ratio, score in scores.items() if score >= threshold and ratio < 1]
        if passing:
            chosen[layer] = min(passing)
    return chosen


def _effective(space: CompressionSpace, table: Mapping[str, Mapping[float, float]]) -> dict[str, dict[float, float]]:
    """The table without entries that leave the cost unchanged (e.g. an SVD rank that would not save anything)."""
    base = space.cost({})
    return {layer: {r: s for r, s in scores.items() if space.cost({layer: r}) < base} for layer, scores in table.items()}


def _refine(space: CompressionSpace, table: Mapping[str, Mapping[float, float]], above: dict[str, float],
            below: dict[str, float], budget: float) -> dict[str, float]:
    """Step from ``above`` (misses the budget) towards ``below`` (meets it) one layer at a time.

    Scores tie often on a small calibration set, so one threshold step can move many layers at once
    and overshoot the target; taking the moves in order of highest score (then largest saving) and
    stopping as soon as the budget is met keeps the cost close to the target.
    """
    ratios = dict(above)
    moves = [layer for layer in below if below[layer] != above.get(layer)]
    base = space.cost(ratios)

    def key(layer: str) -> tuple[float, float]:
        trial = {**ratios, layer: below[layer]}
        return (-table[layer][below[layer]], space.cost(trial) - base)

    for layer in sorted(moves, key=key):
        ratios[layer] = below[layer]
        if space.cost(ratios) <= budget:
            return ratios
    return dict(below)


def select_from_table(space: CompressionSpace, table: Mapping[str, Mapping[float, float]], target: float) -> Selection:
    """The greedy choice (module docstring, step 2) for a cost ``target`` in (0, 1] from a sensitivity ``table``.

    Among the layers whose ratio changes at the chosen threshold, only as many as the budget needs
    are moved (highest score first), see :func:`_refine`.
    """
    if not 0 < target <= 1:
        raise SelectionError(f"target={target} must be in (0, 1]; it is the share of the model's cost kept")
    base = space.cost({})
    effective = _effective(space, table)
    scores = sorted({s for row in effective.values() for s in row.values()}, reverse=True)
    above: dict[str, float] = {}
    for threshold in scores:
        ratios = _ratios_at(effective, threshold)
        if space.cost(ratios) <= target * base:
            ratios = _refine(space, effective, above, ratios, target * base)
            return Selection(ratios, space.cost(ratios), base, {k: dict(v) for k, v in table.items()}, threshold=threshold)
        above = ratios
    smallest = _ratios_at(effective, float("-inf"))
    reachable = space.cost(smallest) / base
    raise SelectionError(f"target={target} cannot be met: compressing every layer at its smallest candidate ratio keeps "
                         f"{reachable:.3f} of the cost; raise target, add smaller candidates or allow more layers")


def greedy_selection(space: CompressionSpace, eval_fn: Callable[[nn.Module], float], target: float,
                     candidates: Sequence[float], *, baseline_model: nn.Module | None = None,
                     progress: bool = True) -> Selection:
    """Measure the sensitivity table, then pick per-layer ratios meeting ``target`` at the highest threshold.

    ``candidates``: ratios in (0, 1) to try per layer. ``baseline_model``: scored once for the
    record's ``baseline_score`` when given.
    """
    if not candidates:
        raise SelectionError("candidates is empty; give ratios in (0, 1) such as [0.25, 0.5, 0.75]")
    for ratio in candidates:
        if not 0 < ratio < 1:
            raise SelectionError(f"candidate ratio {ratio} must be in (0, 1)")
    table = sensitivity_table(space, eval_fn, sorted(set(candidates)), progress=progress)
    selection = select_from_table(space, table, target)
    baseline = float(eval_fn(baseline_model)) if baseline_model is not None else None
    return Selection(selection.ratios, selection.cost, selection.base_cost, selection.table, baseline, selection.threshold)
