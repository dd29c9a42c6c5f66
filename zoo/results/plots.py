"""Accuracy-vs-size and accuracy-vs-bit-ops charts (PNG bytes), one of each per dataset.

Each point is one row: simulated top-1 with its 95% interval as an error bar, labelled with the
recipe; one colour and marker per model, and a dashed line at the model's FP32 top-1. Size is the
exported integer-weight file (``artifacts.weights.bytes``); bit-ops come from the record's ``cost``
block, and rows without it are left out of that chart (it says so when none has it).

Rendering is deterministic: matplotlib's object API on an Agg canvas (no pyplot global state), a
fixed size and dpi, sorted series, and PNG metadata holding only the matplotlib version (no
timestamps), so the same rows give byte-identical files with the same matplotlib.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .rows import ResultRow, fp32_reference

FIGSIZE = (6.4, 4.2)
DPI = 100
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def png_metadata() -> dict[str, str]:
    """PNG text chunks: the matplotlib version only (it decides the pixels); no time stamps."""
    return {"Software": f"matplotlib {matplotlib.__version__}"}


def _render(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=DPI, metadata=png_metadata())
    return buffer.getvalue()


def _chart(rows: Sequence[ResultRow], *, title: str, xlabel: str, x_of: Callable[[ResultRow], float | None],
           empty_note: str, log_x: bool) -> bytes:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    models = sorted({r.model for r in rows})
    plotted = 0
    for index, model in enumerate(models):
        color, marker = _COLORS[index % len(_COLORS)], _MARKERS[index % len(_MARKERS)]
        points = sorted(((x_of(r), r) for r in rows if r.model == model and x_of(r) is not None),
                        key=lambda point: (point[0], point[1].recipe))
        if not points:
            continue
        xs = [x for x, _ in points]
        ys = [r.sim_top1 for _, r in points]
        errors = [[r.sim_top1 - r.sim_top1_ci95[0] if r.sim_top1_ci95 else 0.0 for _, r in points],
                  [r.sim_top1_ci95[1] - r.sim_top1 if r.sim_top1_ci95 else 0.0 for _, r in points]]
        ax.errorbar(xs, ys, yerr=errors, fmt=marker, color=color, capsize=3, label=f"{model} (simulated)")
        for x, row in points:
            ax.annotate(row.recipe, (x, row.sim_top1), textcoords="offset points", xytext=(5, 4), fontsize=7)
        fp32 = fp32_reference(rows, model)
        ax.axhline(fp32, color=color, linestyle="--", linewidth=1, label=f"{model} FP32 {fp32:.2f}")
        plotted += len(points)
    if plotted:
        if log_x:
            ax.set_xscale("log")
        ax.margins(x=0.2)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%), 95% interval")
    ax.grid(True, linewidth=0.3)
    fig.tight_layout()
    return _render(fig)


def accuracy_vs_size(rows: Sequence[ResultRow], dataset: str) -> bytes:
    """PNG: simulated top-1 against the integer-weight file size (MB)."""
    return _chart(rows, title=f"{dataset}: accuracy vs model size", xlabel="integer weights file (MB)",
                  x_of=lambda r: None if r.size_bytes is None else r.size_bytes / 1e6,
                  empty_note="no run record lists artifacts.weights.bytes", log_x=False)


def accuracy_vs_bitops(rows: Sequence[ResultRow], dataset: str) -> bytes:
    """PNG: simulated top-1 against bit-operations per inference (GBOPs, log scale)."""
    return _chart(rows, title=f"{dataset}: accuracy vs bit-operations", xlabel="bit-operations per inference (GBOPs)",
                  x_of=lambda r: None if r.bitops is None else r.bitops / 1e9,
                  empty_note="no run record has a cost block yet (cost.bitops);\n"
                             "records written by a quantzoo run that stores cost will appear here",
                  log_x=True)
