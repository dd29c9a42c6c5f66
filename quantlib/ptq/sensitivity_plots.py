"""PNG plots of the per-layer sensitivity analysis (:mod:`quantlib.ptq.sensitivity`).

* :func:`plot_sensitivity`: per-group output SQNR for each mode (weight and activation, weight
  only, activation only) and, where scored, the score drop, in graph order;
* :func:`activation_histograms` + :func:`plot_activation_histograms`: histograms of the values
  that enter the input-activation quantizer of the most sensitive groups, with the calibrated
  clipping range (the encoding's representable min and max) drawn over them.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch) and written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import atomic_output
from ..quantsim import QuantSim
from .quantizer_groups import QuantizerGroup

if TYPE_CHECKING:
    from .sensitivity import SensitivityResult

_MODE_STYLE = {"both": ("tab:red", "weight + activation"), "weight": ("tab:blue", "weight only"),
               "activation": ("tab:green", "activation only")}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def plot_sensitivity(result: SensitivityResult, path: str | Path) -> Path:
    """Per-group SQNR (dB, higher is less sensitive) per mode, and score drop where scored.

    One x position per analysed group in graph order (names on the axis when there are at most
    80). Infinite SQNR (a group whose quantizers change nothing) is drawn at the top of the axis.
    Returns ``path``.
    """
    names = [g.name for g in result.groups]
    position = {name: i for i, name in enumerate(names)}
    scored = [e for e in result.entries if e.drop is not None]
    figure = _figure(max(10.0, 0.16 * len(names)), 7.5 if scored else 4.5)
    axes = figure.subplots(2 if scored else 1, 1, sharex=True, squeeze=False)[:, 0]
    finite = [e.sqnr_db for e in result.entries if math.isfinite(e.sqnr_db)]
    top = (max(finite) + 5.0) if finite else 100.0
    for mode in ("both", "weight", "activation"):
        entries = result.table(mode)
        if not entries:
            continue
        color, label = _MODE_STYLE[mode]
        xs = [position[e.group] for e in entries]
        ys = [e.sqnr_db if math.isfinite(e.sqnr_db) else top for e in entries]
        axes[0].plot(xs, ys, marker="o", markersize=3, linewidth=0.8, color=color, label=label)
    if math.isfinite(result.quantized_sqnr_db):
        axes[0].axhline(result.quantized_sqnr_db, color="grey", linestyle="--", linewidth=0.8,
                        label=f"all quantized ({result.quantized_sqnr_db:.1f} dB)")
    axes[0].set_ylabel("output SQNR (dB)")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"per-layer sensitivity: one group quantized, the rest float ({result.num_samples} samples)", fontsize=10)
    if scored:
        for mode in ("both", "weight", "activation"):
            entries = [e for e in scored if e.mode == mode]
            if entries:
                color, label = _MODE_STYLE[mode]
                axes[1].bar([position[e.group] for e in entries], [e.drop for e in entries], color=color,
                            alpha=0.6, label=label)
        axes[1].axhline(0.0, color="grey", linewidth=0.5)
        axes[1].set_ylabel("score drop vs float")
        axes[1].legend(fontsize=8, loc="upper right")
    if len(names) <= 80:
        axes[-1].set_xticks(range(len(names)))
        axes[-1].set_xticklabels(names, rotation=90, fontsize=6)
    axes[-1].set_xlabel("layer group (graph order)")
    return _save(figure, path)


@dataclass
class ActivationHistogram:
    """Histogram of the values entering one activation quantizer.

    ``edges`` has ``len(counts) + 1`` entries; ``clip_min``/``clip_max`` are the encoding's
    representable range; ``clipped`` is the fraction of values outside it.
    """

    group: str
    quantizer: str
    counts: torch.Tensor
    edges: torch.Tensor
    clip_min: float
    clip_max: float
    clipped: float
    bitwidth: int


def _clip_range(quantizer) -> tuple[float, float]:
    """The smallest and largest value the quantizer's grid represents (over all its channels)."""
    low, high = quantizer.representable_range()
    return float(low.min()), float(high.max())


@torch.no_grad()
def activation_histograms(sim: QuantSim, groups: Sequence[QuantizerGroup], batches: Sequence[tuple[torch.Tensor, ...]],
                          *, bins: int = 128) -> list[ActivationHistogram]:
    """Histograms of the inputs of each group's first activation quantizer over ``batches``.

    Groups whose quantizer is disabled, a float passthrough or not calibrated are left out.

    Two passes through ``sim.model`` (as it is, quantizers on): one for the value range, one to
    count. The histogram range covers both the values and the clipping range. ``sim`` is not changed.
    """
    quantizers = sim.activation_quantizers()
    chosen = [(g.name, g.activation_quantizers[0]) for g in groups if g.activation_quantizers]
    chosen = [(group, name) for group, name in chosen  # integer grids only: a float16 passthrough clips nothing
              if quantizers[name].spec.enabled and not quantizers[name].spec.is_float and quantizers[name].has_encoding]
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    counts: dict[str, torch.Tensor] = {}
    outside: dict[str, int] = {}
    totals: dict[str, int] = {}
    ranges = {name: _clip_range(quantizers[name]) for _, name in chosen}

    def observe(name: str, counting: bool):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            if not counting:
                lows[name] = min(lows.get(name, math.inf), float(x.min()))
                highs[name] = max(highs.get(name, -math.inf), float(x.max()))
                return
            lo, hi = min(lows[name], ranges[name][0]), max(highs[name], ranges[name][1])
            counts[name] = counts.get(name, 0) + torch.histc(x.cpu(), bins=bins, min=lo, max=hi if hi > lo else lo + 1.0)
            clip_lo, clip_hi = ranges[name]
            outside[name] = outside.get(name, 0) + int(((x < clip_lo) | (x > clip_hi)).sum())
            totals[name] = totals.get(name, 0) + x.numel()
        return hook

    for counting in (False, True):
        handles = [quantizers[name].register_forward_hook(observe(name, counting)) for _, name in chosen]
        try:
            sim.model.eval()
            for batch in batches:
                sim.model(*batch)
        finally:
            for handle in handles:
                handle.remove()
    result = []
    for group, name in chosen:
        if name not in counts:
            continue  # the quantizer is not on the path of these inputs
        lo, hi = min(lows[name], ranges[name][0]), max(highs[name], ranges[name][1])
        hi = hi if hi > lo else lo + 1.0
        result.append(ActivationHistogram(group=group, quantizer=name, counts=counts[name],
                                          edges=torch.linspace(lo, hi, bins + 1), clip_min=ranges[name][0],
                                          clip_max=ranges[name][1], clipped=outside[name] / max(totals[name], 1),
                                          bitwidth=quantizers[name].spec.bitwidth))
    return result


def plot_activation_histograms(histograms: Sequence[ActivationHistogram], path: str | Path) -> Path:
    """A grid of histograms (log counts), each with its clipping range as dashed lines. Returns ``path``."""
    if not histograms:
        raise ValueError("no histograms to plot; give at least one group with an activation quantizer")
    columns = min(3, len(histograms))
    rows = math.ceil(len(histograms) / columns)
    figure = _figure(4.2 * columns, 3.2 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax, hist in zip(axes, histograms):
        edges = hist.edges.numpy()
        ax.stairs(hist.counts.numpy(), edges, fill=True, color="tab:blue", alpha=0.7)
        ax.set_yscale("log")
        for value in (hist.clip_min, hist.clip_max):
            ax.axvline(value, color="tab:red", linestyle="--", linewidth=1.0)
        ax.set_title(f"{hist.group}\ninput {hist.quantizer} (int{hist.bitwidth}), clipped {100 * hist.clipped:.3f}%",
                     fontsize=8)
        ax.set_xlabel("value (dashed: clipping range)", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes[len(histograms):]:
        ax.set_visible(False)
    figure.suptitle("activation histograms of the most sensitive layer groups", fontsize=10)
    return _save(figure, path)
