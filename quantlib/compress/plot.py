"""The per-layer compression-sensitivity figure: a heatmap of scores per layer and ratio, one panel per step.

Input is what :func:`quantlib.compress.selection.sensitivity_table` measures (layer -> {ratio:
score}); the chosen ratio of each layer is outlined, and the uncompressed score is in the title.
matplotlib runs with the non-interactive Agg backend; the PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_output


@dataclass(frozen=True)
class SensitivityPanel:
    """One step's table: ``title``, ``table`` (layer -> {ratio: score}), ``chosen`` (layer -> ratio), ``baseline``."""

    title: str
    table: Mapping[str, Mapping[float, float]]
    chosen: Mapping[str, float]
    baseline: float | None = None


def save_sensitivity_plot(panels: Sequence[SensitivityPanel], path: str | Path, *, score_name: str = "score") -> Path:
    """Draw ``panels`` side by side into the PNG at ``path`` (created or replaced); returns the path.

    ValueError when there is no panel with at least one layer.
    """
    panels = [p for p in panels if p.table]
    if not panels:
        raise ValueError("no sensitivity table to plot; run a step with selection=greedy or compress.sensitivity=true")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = max(len(p.table) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 0.28 * rows + 2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        layers = list(panel.table)
        ratios = sorted({r for row in panel.table.values() for r in row})
        grid = [[panel.table[layer].get(r, float("nan")) for r in ratios] for layer in layers]
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_xlabel("ratio kept")
        for row, layer in enumerate(layers):
            if layer in panel.chosen and panel.chosen[layer] in ratios:
                col = ratios.index(panel.chosen[layer])
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        title = panel.title if panel.baseline is None else f"{panel.title}\nuncompressed {score_name} {panel.baseline:.2f}"
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label=score_name)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
