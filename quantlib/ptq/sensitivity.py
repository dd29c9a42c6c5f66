"""Per-layer quantization sensitivity: quantize one layer group at a time, everything else float.

For every quantizer group of a calibrated QuantSim (:func:`~quantlib.ptq.quantizer_groups.quantizer_groups`:
a weight layer with the activation quantizer feeding it, or an activation quantizer that feeds
no weight layer) and every requested mode, only that group's quantizers are enabled and the rest
of the sim runs in float (AIMET QuantAnalyzer's "per-layer quantization enabled" analysis):

* ``both``: the group's weight and input-activation quantizers;
* ``weight``: its weight quantizers only (weight-only sensitivity);
* ``activation``: its activation quantizer only (activation-only sensitivity).

Each (group, mode) gets the SQNR of the model output against the float model on the first
``num_samples`` calibration samples, ``10 log10(sum(y^2) / sum((y - y_q)^2))`` in dB, and, for
the modes in ``score_modes`` (all groups, or the ``score_top`` with the lowest SQNR), the
caller's ``score_fn`` (e.g. top-1 on the labelled calibration split) and its drop from the
float model's score. The float model is the sim with every
quantizer off (BatchNorm folded), so the drop is the one quantization alone causes.

Plots (:mod:`quantlib.ptq.sensitivity_plots`): per-layer SQNR and score drop (PNG), and histograms
of the values entering the input-activation quantizer of the ``plot_top`` most sensitive groups
with the calibrated clipping range (PNG).

Pipeline step ``sensitivity`` (phase "sim") analyses ``context.sim`` without changing it and
returns the table in its summary. The sim is left exactly as it was (quantizers re-enabled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quantsim import QuantSim
from .pass_config import PassConfigError, check_int
from .quantizer_groups import QuantizerGroup, fp32_reference, only_enabled, quantizer_groups, select
from .registry import PTQContext, PTQStep

MODES = ("both", "weight", "activation")


@dataclass(frozen=True)
class SensitivityConfig:
    """Settings of the per-layer sensitivity analysis.

    Attributes:
        modes: which quantizers of a group are enabled: both, weight, activation.
        score_modes: modes also scored with ``score_fn`` (one full scoring per group and mode;
            ``[]`` gives SQNR only and needs no ``score_fn``).
        score_top: score only the groups with the lowest SQNR in each scored mode, this many
            (None: every group). Scoring is the slow part; SQNR ranks the groups first.
        num_samples: calibration samples for the SQNR and the histograms.
        include, exclude: fnmatch globs over group names (a layer group is named after its first
            weight module, an activation group ``act:<quantizer name>``).
        activation_groups: also analyse activation quantizers that feed no weight layer (residual
            adds, the model output); they have only the ``activation`` mode.
        plot_top: histograms for this many most sensitive groups (0: none).
        histogram_bins: bins per histogram.
    """

    modes: tuple[str, ...] = MODES
    score_modes: tuple[str, ...] = ("both",)
    score_top: int | None = None
    num_samples: int = 64
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    activation_groups: bool = True
    plot_top: int = 6
    histogram_bins: int = 128

    def __post_init__(self) -> None:
        for field_name in ("modes", "score_modes"):
            for mode in getattr(self, field_name):
                if mode not in MODES:
                    raise PassConfigError(f"{field_name}={list(getattr(self, field_name))} has {mode!r}; use {', '.join(MODES)}")
        if not self.modes:
            raise PassConfigError(f"modes=[] analyses nothing; use some of {', '.join(MODES)}")
        missing = [m for m in self.score_modes if m not in self.modes]
        if missing:
            raise PassConfigError(f"score_modes has {missing[0]!r}, which is not in modes={list(self.modes)}; add it to modes")
        check_int("num_samples", self.num_samples, 1)
        if self.score_top is not None:
            check_int("score_top", self.score_top, 1)
        check_int("plot_top", self.plot_top, 0)
        check_int("histogram_bins", self.histogram_bins, 2)


@dataclass
class SensitivityEntry:
    """One (group, mode) measurement: output SQNR in dB, and score/drop when scored (else None)."""

    group: str
    kind: str
    mode: str
    sqnr_db: float
    score: float | None = None
    drop: float | None = None


@dataclass
class SensitivityResult:
    """The analysis: float and fully quantized references, and one entry per (group, mode).

    ``float_score``/``quantized_score`` are None when nothing was scored.
    """

    groups: list[QuantizerGroup]
    entries: list[SensitivityEntry]
    quantized_sqnr_db: float
    float_score: float | None
    quantized_score: float | None
    num_samples: int

    def table(self, mode: str) -> list[SensitivityEntry]:
        """Entries of ``mode`` in graph order."""
        return [e for e in self.entries if e.mode == mode]

    def ranking(self) -> list[str]:
        """Group names, most sensitive first. Each group is judged by its entry in the first scored
        mode (else its first entry): groups with a score drop come first, largest drop first, then
        the rest by SQNR, lowest first."""
        scored = next((e.mode for e in self.entries if e.drop is not None), None)
        primary: dict[str, SensitivityEntry] = {}
        for entry in self.entries:
            if entry.group not in primary or (entry.mode == scored and primary[entry.group].mode != scored):
                primary[entry.group] = entry
        dropped = sorted((g for g, e in primary.items() if e.drop is not None),
                         key=lambda g: (-primary[g].drop, primary[g].sqnr_db))
        return dropped + sorted((g for g, e in primary.items() if e.drop is None), key=lambda g: primary[g].sqnr_db)

    def to_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "quantized_sqnr_db": _round(self.quantized_sqnr_db),
                "float_score": self.float_score, "quantized_score": self.quantized_score,
                "groups": [g.to_dict() for g in self.groups],
                "entries": [{**asdict(e), "sqnr_db": _round(e.sqnr_db)} for e in self.entries],
                "most_sensitive": self.ranking()[:10]}


def _round(value: float) -> float | str:
    return round(value, 3) if math.isfinite(value) else "inf"


def sqnr_db(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """``10 log10(sum(ref^2) / sum((ref - out)^2))`` over all batches; ``inf`` when they are equal."""
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    noise = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(reference, outputs))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """``model(*batch)`` for every batch (inference mode, outputs detached)."""
    model.eval()
    return [model(*batch).detach() for batch in batches]


def group_quantizers(group: QuantizerGroup, mode: str) -> tuple[str, ...]:
    """Names (``sim.quantizers()`` keys) of the quantizers ``mode`` enables in ``group``; empty
    when the mode does not apply (an activation group has only the ``activation`` mode)."""
    if group.kind == "activation":
        return group.activation_quantizers if mode == "activation" else ()
    if mode == "weight":
        return group.weight_quantizers
    if mode == "activation":
        return group.activation_quantizers
    return group.quantizers


def analysed_groups(sim: QuantSim, config: SensitivityConfig) -> list[QuantizerGroup]:
    """The groups the analysis visits: layer groups (and activation groups if asked) matching the globs."""
    groups = [g for g in quantizer_groups(sim) if g.kind == "layer" or config.activation_groups]
    chosen = set(select([g.name for g in groups], config.include, config.exclude))
    return [g for g in groups if g.name in chosen]


def analyze_sensitivity(sim: QuantSim, batches: Sequence[tuple[torch.Tensor, ...]], config: SensitivityConfig | None = None,
                        *, score_fn: Callable[[nn.Module], float] | None = None,
                        progress: bool = False) -> SensitivityResult:
    """Measure every group's sensitivity (see the module docstring); ``sim`` is restored afterwards.

    Args:
        sim: a calibrated QuantSim.
        batches: input tuples for the SQNR (e.g. ``context.input_batches(n)``).
        config: the settings.
        score_fn: ``score_fn(model) -> float``, higher is better; needed when ``config.score_modes``
            is not empty (PassConfigError otherwise).
        progress: show a progress bar over the groups.

    Returns a :class:`SensitivityResult`.
    """
    config = config or SensitivityConfig()
    if config.score_modes and score_fn is None:
        raise PassConfigError(f"score_modes={list(config.score_modes)} needs a score_fn; pass one or set score_modes: []")
    reference = model_outputs(fp32_reference(sim), batches)
    quantized = model_outputs(sim.model, batches)
    float_score = quantized_score = None
    if config.score_modes:
        with only_enabled(sim, ()):
            float_score = float(score_fn(sim.model))
        quantized_score = float(score_fn(sim.model))
    entries: list[SensitivityEntry] = []
    groups = analysed_groups(sim, config)
    by_name = {g.name: g for g in groups}
    for group in tqdm(groups, desc="sensitivity: SQNR", disable=not progress, leave=False):
        for mode in config.modes:
            names = group_quantizers(group, mode)
            if names:
                with only_enabled(sim, names):
                    sqnr = sqnr_db(reference, model_outputs(sim.model, batches))
                entries.append(SensitivityEntry(group.name, group.kind, mode, sqnr))
    to_score = []
    for mode in config.score_modes:
        ranked = sorted((e for e in entries if e.mode == mode), key=lambda e: e.sqnr_db)
        to_score += ranked[: config.score_top] if config.score_top is not None else ranked
    for entry in tqdm(to_score, desc="sensitivity: score", disable=not progress, leave=False):
        with only_enabled(sim, group_quantizers(by_name[entry.group], entry.mode)):
            entry.score = float(score_fn(sim.model))
        entry.drop = float_score - entry.score
    return SensitivityResult(groups=groups, entries=entries, quantized_sqnr_db=sqnr_db(reference, quantized),
                             float_score=float_score, quantized_score=quantized_score,
                             num_samples=sum(b[0].shape[0] for b in batches))


def _run_sensitivity(context: PTQContext, config: SensitivityConfig) -> dict[str, Any]:
    from .sensitivity_plots import activation_histograms, plot_activation_histograms, plot_sensitivity

    sim = context.require_sim("sensitivity")
    score_fn = context.require_score_fn("sensitivity") if config.score_modes else None
    batches = context.input_batches(config.num_samples)
    result = analyze_sensitivity(sim, batches, config, score_fn=score_fn, progress=context.progress)
    summary = result.to_dict()
    if context.plots_dir is not None:
        paths = [plot_sensitivity(result, context.plots_dir / "sensitivity_per_layer.png")]
        by_name = {g.name: g for g in result.groups}
        top = [by_name[name] for name in result.ranking() if by_name[name].activation_quantizers][: config.plot_top]
        if top:
            hists = activation_histograms(sim, top, batches, bins=config.histogram_bins)
            paths.append(plot_activation_histograms(hists, context.plots_dir / "sensitivity_activation_histograms.png"))
        context.plots.extend(paths)
        summary["plots"] = [str(p) for p in paths]
    return summary


STEPS = (
    PTQStep(name="sensitivity", config_cls=SensitivityConfig, run=_run_sensitivity, phase="sim",
            description="per-layer sensitivity: quantize one layer group at a time, SQNR and score drop (PNG plots)"),
)
