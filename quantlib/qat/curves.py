"""The training-curve PNG of a QAT run: loss and accuracy per epoch.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch) and
written atomically, like :mod:`quantlib.ptq.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_output

_LOSSES = (("loss", "total loss"), ("task_loss", "task (cross-entropy)"), ("distill_loss", "distillation (KL)"))
_RATES = (("top1", "training-batch top-1"), ("teacher_agreement", "agreement with teacher"))


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path, *, title: str,
                         baselines: dict[str, float] | None = None) -> Path:
    """Write a two-panel PNG of ``history`` (the trainer's per-epoch dicts); returns ``path``.

    Top panel: the losses per epoch. Bottom panel: training-batch top-1 and teacher agreement (%),
    with each of ``baselines`` (label -> %) drawn as a dashed horizontal line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("plot_training_curves needs at least one epoch of history")
    path = Path(path)
    figure = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(figure)
    loss_ax, rate_ax = figure.subplots(2, 1, sharex=True)
    epochs = [row["epoch"] for row in history]
    for key, label in _LOSSES:
        if all(key in row for row in history):
            loss_ax.plot(epochs, [row[key] for row in history], marker="o", label=label)
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=8)
    for key, label in _RATES:
        if all(key in row for row in history):
            rate_ax.plot(epochs, [row[key] for row in history], marker="o", label=label)
    for label, value in sorted((baselines or {}).items()):
        rate_ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        rate_ax.annotate(f"{label} {value:.2f}", (epochs[0], value), fontsize=7, va="bottom")
    rate_ax.set_ylabel("%")
    rate_ax.set_xlabel("epoch")
    rate_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    if rate_ax.get_legend_handles_labels()[0]:
        rate_ax.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
