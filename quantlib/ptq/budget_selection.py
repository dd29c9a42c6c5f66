"""Choosing the point of a mixed-precision Pareto path that meets a score-drop budget.

A path (:func:`quantlib.ptq.mixed_precision.greedy_path`) runs from the widest assignment to the
narrowest; its estimated output noise (relative to the float model) grows along it.
A :class:`PathScorer` scores a point (e.g. top-1 on the labelled calibration split) once, on demand.
Two selectors pick the point with the fewest bit-ops that meets ``reference - max_drop``:

- :func:`select_by_score` trusts each score: a binary search for the last point scoring at least
  the target. Right when one score resolves the budget.
- :func:`select_by_noise_fit` trusts a model fitted to several scores: the drop below the
  reference is taken as proportional to the relative output noise, ``drop = slope * noise`` (the
  second-order view of HAWQ and BRECQ, where the loss increase is linear in the output noise
  power). It scores points spaced at half-octaves of estimated noise from the widest point until
  the drop passes ``fit_window`` budgets, fits the slope over the scored points within that
  window, and chooses the last point whose predicted drop is within the budget. One image of a
  250-image top-1 is 0.4 points, so a single score cannot resolve a 0.5-point budget; the fit
  pools every scored point, so one lucky or unlucky score no longer decides.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class PathScorer:
    """Scores path points on demand, each at most once; ``scores`` maps index -> score."""

    def __init__(self, score_point: Callable[[int], float]) -> None:
        self._score_point = score_point
        self.scores: dict[int, float] = {}

    def __call__(self, index: int) -> float:
        if index not in self.scores:
            self.scores[index] = float(self._score_point(index))
        return self.scores[index]


@dataclass(frozen=True)
class Selection:
    """The chosen path index, whether the budget is met (by the scores, or by the fit for
    :func:`select_by_noise_fit`), and the fit if one was made."""

    chosen: int
    met: bool
    fit: dict[str, Any] = field(default_factory=dict)


def select_by_score(score: PathScorer, last: int, target: float) -> Selection:
    """Binary search for the last path index whose score is at least ``target``.

    Points already scored (for a plot) narrow the search; scores are assumed to fall along the path.
    """
    if score(0) < target:
        return Selection(0, False)
    if score(last) >= target:
        return Selection(last, True)
    ok = max(i for i, s in score.scores.items() if s >= target)
    bad = min(i for i, s in score.scores.items() if s < target and i > ok)
    while bad - ok > 1:
        middle = (ok + bad) // 2
        if score(middle) >= target:
            ok = middle
        else:
            bad = middle
    return Selection(ok, True)


def noise_ladder(noise: Sequence[float], step: float = math.sqrt(2.0)) -> list[int]:
    """Path indices where the noise first reaches ``noise[0] * step**j`` (j = 0, 1, ...), then the
    last index; duplicates dropped. The first index whose noise is not finite ends the ladder."""
    indices, level = [0], noise[0] * step
    if noise[0] <= 0:
        positive = [i for i, n in enumerate(noise) if n > 0]
        if not positive:
            return [0] if len(noise) == 1 else [0, len(noise) - 1]
        indices.append(positive[0])
        level = noise[positive[0]] * step
    for index, value in enumerate(noise):
        if index <= indices[-1]:
            continue
        if not math.isfinite(value):
            indices.append(index)
            return indices
        if value >= level:
            indices.append(index)
            while level <= value:
                level *= step
    if indices[-1] != len(noise) - 1:
        indices.append(len(noise) - 1)
    return indices


def select_by_noise_fit(score: PathScorer, estimated_noise: Sequence[float], measured_noise: Callable[[int], float],
                        reference: float, max_drop: float, fit_window: float) -> Selection:
    """Fit ``drop = slope * noise`` to scored points and choose the last point predicted within the budget.

    Args:
        score: scores path points; every point it has scored (also before this call) enters the fit.
        estimated_noise: the path's additive noise estimate at every point. It may dip where a
            narrower candidate measured less noise than a wider one, so its running maximum is used.
        measured_noise: ``measured_noise(index)``, the relative output noise of that point
            measured with its formats applied (cached by the caller).
        reference: the score the drop is measured from (the float model's).
        max_drop: the budget, > 0.
        fit_window: points are scored up the ladder of estimated noise until one drops more than
            ``fit_window * max_drop`` (the cliff); the fit uses every scored point within that drop.

    The fit pairs each score with the noise measured at its point. The slope is the ratio
    estimator ``sum(drop) / sum(noise)``: the least-squares slope through the origin when a
    score's variance grows with the noise, as the count of changed predictions does. A slope of
    zero or less (no drop measured) predicts no drop short of the cliff. The estimate picks the
    candidate point, never at or past the cliff; its measured noise then confirms it, stepping
    back along the path while the prediction from the measured noise exceeds the budget (noise of
    layer groups does not add exactly).

    ``met`` is the fit's verdict on the widest point: false when its predicted drop exceeds the
    budget, when the widest point itself drops past the window, or when no scored point lies
    within the window; the widest point is chosen then. A chosen point's own score may sit below
    the target: the fit, not that single score, judges the budget.
    """
    window = fit_window * max_drop
    envelope = list(itertools.accumulate(estimated_noise, max))
    cliff = len(envelope)
    for index in noise_ladder(envelope):
        if reference - score(index) > window:
            cliff = index
            break
    used = sorted(i for i, s in score.scores.items() if reference - s <= window and i < cliff)
    total_noise = sum(measured_noise(i) for i in used)
    slope = sum(reference - score.scores[i] for i in used) / total_noise if total_noise > 0 else 0.0
    met = bool(used) and cliff > 0 and slope * measured_noise(0) <= max_drop
    chosen = 0
    if met:
        chosen = max(i for i in range(cliff) if slope * envelope[i] <= max_drop or i == 0)
        while chosen > 0 and slope * measured_noise(chosen) > max_drop:
            chosen -= 1
    fit = {"model": "drop = slope * measured_noise", "slope": slope, "window": window, "fit_indices": used,
           "fit_noise": [measured_noise(i) for i in used], "cliff_index": cliff if cliff < len(envelope) else None,
           "predicted_drop_widest": slope * measured_noise(0), "predicted_drop_chosen": slope * measured_noise(chosen)}
    return Selection(chosen, met, fit)
