"""PNG plot of the Pareto curve a mixed-precision search explored (:mod:`quantlib.ptq.mixed_precision`).

Drawn with matplotlib's object API on an Agg canvas (no pyplot) and written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..io import atomic_output

if TYPE_CHECKING:
    from .mixed_precision import MixedPrecisionResult


def plot_pareto(result: MixedPrecisionResult, path: str | Path) -> Path:
    """Score against bit-ops for every scored point, the estimated SQNR of the whole greedy path
    (second axis), the budget line, the uniform assignments, the chosen point and, for
    ``selection: noise_fit``, the fitted score along the path. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(9, 5.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    giga = 1e9
    evaluated = sorted(result.evaluated, key=lambda p: p.bitops)
    ax.plot([p.bitops / giga for p in evaluated], [p.score for p in evaluated], marker="o", color="tab:blue",
            label="scored points (calibration score)")
    ax.axhline(result.target_score, color="tab:red", linestyle="--", linewidth=1.0,
               label=f"budget: {result.reference_score:.2f} - {result.reference_score - result.target_score:.2f}")
    chosen = result.path[result.chosen_index]
    if chosen.score is not None:
        ax.scatter([chosen.bitops / giga], [chosen.score], s=140, facecolors="none", edgecolors="tab:red", linewidths=2,
                   label=f"chosen ({chosen.bitops / giga:.3g} GBOPs)", zorder=5)
    if result.fit:  # drawn within the scored points' range, which the fit may leave at the noisy end
        low, high = ax.get_ylim()
        slope = result.fit["slope"]
        fitted = [(p.bitops / giga, result.reference_score - slope * 10.0 ** (-p.estimated_sqnr_db / 10.0))
                  for p in result.path if math.isfinite(p.estimated_sqnr_db)]
        ax.plot([x for x, _ in fitted], [y for _, y in fitted], color="tab:purple", linestyle="--", linewidth=1.0,
                label=f"fitted: reference - {slope:.3g} x estimated noise")
        ax.set_ylim(low, high)
    for name, bitops in result.bitops_uniform.items():
        ax.axvline(bitops / giga, color="grey", linestyle=":", linewidth=0.8)
        ax.text(bitops / giga, ax.get_ylim()[0], f" all {name}", rotation=90, fontsize=7, va="bottom", color="grey")
    ax.set_xlabel("bit-operations per inference (GBOPs)")
    ax.set_ylabel("score")
    twin = ax.twinx()
    finite = [(p.bitops / giga, p.estimated_sqnr_db) for p in result.path if math.isfinite(p.estimated_sqnr_db)]
    if finite:
        twin.plot([x for x, _ in finite], [y for _, y in finite], color="tab:green", linewidth=0.8, alpha=0.7,
                  label="greedy path: estimated output SQNR")
        twin.set_ylabel("estimated output SQNR (dB)", color="tab:green")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, fontsize=8, loc="lower right")
    ax.set_title(f"mixed precision Pareto search ({', '.join(c.name for c in result.candidates)}): "
                 f"{len(result.evaluated)} points scored, budget {'met' if result.met else 'NOT met'}"
                 f"{' (by the fitted drop)' if result.fit else ''}", fontsize=10)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
