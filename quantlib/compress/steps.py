"""Compression step configs: one frozen dataclass per method, built from plain dicts with checked keys.

A step is a mapping with a ``method`` key (a recipe's ``compress.steps`` entry); :func:`parse_step`
turns it into the method's config, and an unknown method or key fails with a message naming it and
the valid choices. Ratios are the share *kept*; ``target`` is the share of the model's cost kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .channel_pruning import IMPORTANCE_CRITERIA
from .spaces import COST_METRICS, REFIT_FACTORS

SELECTIONS = ("greedy", "manual")
SCHEDULES = ("one_shot", "polynomial")


class CompressConfigError(ValueError):
    """A compression setting is wrong; the message names the field and the fix."""


def _in(step: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise CompressConfigError(f"{step}.{name}={value!r} is not supported; use one of {', '.join(map(str, choices))}")


def _fraction(step: str, name: str, value: float, *, upper_open: bool = False, lower_open: bool = True) -> None:
    low_ok = value > 0 if lower_open else value >= 0
    high_ok = value < 1 if upper_open else value <= 1
    if not (low_ok and high_ok):
        raise CompressConfigError(f"{step}.{name}={value} must be in {'(' if lower_open else '['}0, 1{')' if upper_open else ']'}")


@dataclass(frozen=True)
class _Common:
    include: tuple[str, ...] = ("*",)  # fnmatch globs on module names
    exclude: tuple[str, ...] = ()
    finetune: bool = False  # fine-tune the FP32 model after this step (compress.finetune settings)

    @property
    def structure(self) -> frozenset[str]:
        """What this step leaves that later fine-tuning must preserve (structure_preserver kinds)."""
        return frozenset()


@dataclass(frozen=True)
class _Selected(_Common):
    selection: str = "greedy"
    target: float = 0.8  # share of the model's cost (metric) kept, for greedy selection
    metric: str = "macs"
    candidates: tuple[float, ...] = (0.25, 0.5, 0.75)
    ratios: dict[str, float] = field(default_factory=dict)  # manual: layer -> ratio kept

    def _validate_selection(self, step: str) -> None:
        _in(step, "selection", self.selection, SELECTIONS)
        _in(step, "metric", self.metric, COST_METRICS)
        _fraction(step, "target", self.target)
        for ratio in self.candidates:
            _fraction(step, "candidates", ratio, upper_open=True)
        if self.selection == "manual" and not self.ratios:
            raise CompressConfigError(f"{step}.selection=manual needs {step}.ratios (layer: ratio kept); or use selection=greedy")
        if self.selection == "greedy" and self.ratios:
            raise CompressConfigError(f"{step}.ratios is only read with selection=manual; drop it or set selection=manual")
        for layer, ratio in self.ratios.items():
            _fraction(step, f"ratios[{layer}]", ratio)


@dataclass(frozen=True)
class SvdStep(_Selected):
    """``weight_svd`` or ``spatial_svd`` (:mod:`quantlib.compress.svd`) with per-layer ratio selection.

    ``refit``: after factorizing, re-fit each factorized layer by least squares on calibration
    data, in graph order (:meth:`quantlib.compress.spaces.SvdSpace.refit`; AIMET's SVD does not):
    ``refit_factors=second`` the second factor given the first, ``both`` both factors by
    reduced-rank regression where the layer is a 1x1 conv or linear (the second factor elsewhere).
    """

    method: str = "weight_svd"
    refit: bool = False
    refit_factors: str = "second"
    positions_per_image: int = 16
    ridge: float = 1e-3
    num_batches: int | None = None

    def __post_init__(self) -> None:
        _in(self.method, "method", self.method, ("weight_svd", "spatial_svd"))
        self._validate_selection(self.method)
        _in(self.method, "refit_factors", self.refit_factors, REFIT_FACTORS)


@dataclass(frozen=True)
class ChannelPruningStep(_Selected):
    """``channel_pruning`` (:mod:`quantlib.compress.channel_pruning`) with per-unit ratio selection."""

    method: str = "channel_pruning"
    importance: str = "contribution"
    refit: bool = True
    multiple_of: int = 1
    positions_per_image: int = 16
    ridge: float = 1e-3
    num_batches: int | None = None  # calibration batches for importance and re-fit (None: all)

    def __post_init__(self) -> None:
        self._validate_selection(self.method)
        _in(self.method, "importance", self.importance, IMPORTANCE_CRITERIA)
        if self.multiple_of < 1 or self.positions_per_image < 1:
            raise CompressConfigError(f"{self.method}.multiple_of and .positions_per_image must be >= 1")


@dataclass(frozen=True)
class SparsityStep(_Common):
    """``magnitude_sparsity``, ``n_m_sparsity`` (2:4 by default) or ``channel_sparsity`` (:mod:`quantlib.compress.sparsity`).

    ``schedule=polynomial`` (magnitude only, needs ``finetune``) prunes gradually during fine-tuning
    from ``initial_sparsity`` to ``sparsity`` between ``begin_fraction`` and ``end_fraction`` of the
    fine-tuning steps, updating every ``frequency`` steps (:mod:`quantlib.compress.schedule`).
    """

    method: str = "magnitude_sparsity"
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    schedule: str = "one_shot"
    initial_sparsity: float = 0.0
    begin_fraction: float = 0.0
    end_fraction: float = 0.7
    frequency: int = 10
    power: float = 3.0

    def __post_init__(self) -> None:
        _in(self.method, "method", self.method, ("magnitude_sparsity", "n_m_sparsity", "channel_sparsity"))
        _in(self.method, "schedule", self.schedule, SCHEDULES)
        _fraction(self.method, "sparsity", self.sparsity, upper_open=True, lower_open=False)
        _fraction(self.method, "initial_sparsity", self.initial_sparsity, upper_open=True, lower_open=False)
        if not 0 <= self.begin_fraction < self.end_fraction <= 1:
            raise CompressConfigError(f"{self.method}: need 0 <= begin_fraction < end_fraction <= 1, "
                                      f"got {self.begin_fraction}, {self.end_fraction}")
        if self.schedule == "polynomial" and (self.method != "magnitude_sparsity" or not self.finetune):
            raise CompressConfigError(f"{self.method}.schedule=polynomial prunes during fine-tuning: use it with "
                                      "method magnitude_sparsity and finetune=true, or schedule=one_shot")
        if not 1 <= self.n < self.m:
            raise CompressConfigError(f"{self.method}: n={self.n}, m={self.m} need 1 <= n < m (2:4 is n=2, m=4)")
        if self.frequency < 1:
            raise CompressConfigError(f"{self.method}.frequency={self.frequency} must be >= 1")

    @property
    def kind(self) -> str:
        """The :func:`quantlib.compress.sparsity.sparsity_mask` method name."""
        return {"magnitude_sparsity": "magnitude", "n_m_sparsity": "n_m", "channel_sparsity": "channel"}[self.method]

    @property
    def structure(self) -> frozenset[str]:
        return frozenset({"sparsity"})


@dataclass(frozen=True)
class ClusteringStep(_Common):
    """``clustering`` (:mod:`quantlib.compress.clustering`): ``clusters`` shared values per layer."""

    method: str = "clustering"
    clusters: int = 16
    preserve_zeros: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clusters < 2:
            raise CompressConfigError(f"clustering.clusters={self.clusters} must be >= 2")

    @property
    def structure(self) -> frozenset[str]:
        return frozenset({"clusters", "sparsity"} if self.preserve_zeros else {"clusters"})


STEP_TYPES: dict[str, type] = {
    "weight_svd": SvdStep, "spatial_svd": SvdStep, "channel_pruning": ChannelPruningStep,
    "magnitude_sparsity": SparsityStep, "n_m_sparsity": SparsityStep, "channel_sparsity": SparsityStep,
    "clustering": ClusteringStep,
}


def _coerce(value: Any, default: Any) -> Any:
    """Lists from YAML become tuples where the field default is a tuple."""
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def parse_step(data: Mapping[str, Any], index: int = 0) -> _Common:
    """The step config for ``data`` (a mapping with ``method``); CompressConfigError naming a bad method or key."""
    if not isinstance(data, Mapping) or "method" not in data:
        raise CompressConfigError(f"compress.steps[{index}] must be a mapping with a method key; methods: {', '.join(STEP_TYPES)}")
    method = data["method"]
    if method not in STEP_TYPES:
        raise CompressConfigError(f"compress.steps[{index}].method={method!r} is not supported; use one of {', '.join(STEP_TYPES)}")
    cls = STEP_TYPES[method]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CompressConfigError(f"compress.steps[{index}] ({method}) has no setting {unknown[0]!r}; "
                                  f"valid settings: {', '.join(sorted(fields))}")
    kwargs = {key: _coerce(value, fields[key].default) for key, value in data.items()}
    if "ratios" in kwargs:
        kwargs["ratios"] = dict(kwargs["ratios"])
    return cls(**kwargs)
