"""PNG plots of per-channel weight ranges, before and after a pass (AIMET's CLE visualization).

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch) and
written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_output


def plot_channel_ranges(before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor],
                        path: str | Path, *, title: str) -> Path:
    """Write a two-panel PNG: the (min, max) weight range of every output channel, before and after.

    ``before``/``after`` are ``(mins, maxs)`` 1-D tensors of equal length. Each panel scales its
    own y axis to the layer's largest |w| (the per-tensor grid), so what shows is how much of
    that grid each channel uses; the titles give the largest |w|. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(10, 5.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 1, sharex=True)
    for ax, (label, (low, high)) in zip(axes, (("before", before), ("after", after))):
        low, high = low.detach().cpu().float().numpy(), high.detach().cpu().float().numpy()
        index = range(len(low))
        ax.vlines(index, low, high, color="tab:blue", linewidth=1.5)
        ax.scatter(index, high, s=4, color="tab:red", label="max")
        ax.scatter(index, low, s=4, color="tab:green", label="min")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        spread = max(abs(float(low.min())), abs(float(high.max())))
        if spread > 0:
            ax.set_ylim(-1.05 * spread, 1.05 * spread)
        ax.set_ylabel(f"{label}\nweight value")
        ax.set_title(f"{label}: largest |w| {spread:.3g}", fontsize=9)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("output channel")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
