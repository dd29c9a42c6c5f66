"""Quantizer specifications: what a single quantizer does, as plain frozen dataclasses.

A :class:`QuantizerSpec` fully describes the fixed-point format of one tensor (bitwidth,
symmetry, signedness, narrow range, granularity, scale type, rounding) plus the observer that
calibrates its range. Specs are immutable and validated on construction, so a bad value fails
where it is written with a message that names the field and the accepted values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

DTYPES = ("int", "float16", "bfloat16")
GRANULARITIES = ("per_tensor", "per_channel", "per_block")
SCALE_TYPES = ("float", "power_of_two")
ROUNDING_MODES = ("half_even", "half_up", "half_down", "stochastic")
OBSERVERS = ("minmax", "moving_average_minmax", "percentile", "entropy", "mse")
COMBINES = ("max", "mean", "median", "mode")
MIN_BITWIDTH, MAX_BITWIDTH = 2, 16


class QuantSpecError(ValueError):
    """A quantizer or observer setting is invalid. The message names the field and the fix."""


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise QuantSpecError(f"{field_name}={value!r} is not supported; use one of {', '.join(choices)}")


@dataclass(frozen=True)
class ObserverSpec:
    """How a quantizer's range is calibrated.

    Attributes:
        name: minmax | moving_average_minmax | percentile | entropy | mse.
        combine: how per-batch ranges combine into one: max (the union of the ranges),
            mean, median or mode. moving_average_minmax always uses its exponential average.
        momentum: weight of the running value in moving_average_minmax.
        percentile: upper percentile kept by the percentile observer (the lower one is 100 - p).
        num_bins: histogram bins used by the entropy and mse observers on activations.
        num_candidates: clipping candidates searched by the mse observer.
    """

    name: str = "minmax"
    combine: str = "max"
    momentum: float = 0.9
    percentile: float = 99.99
    num_bins: int = 2048
    num_candidates: int = 100

    def __post_init__(self) -> None:
        _check_choice("observer.name", self.name, OBSERVERS)
        _check_choice("observer.combine", self.combine, COMBINES)
        if not 0.0 <= self.momentum < 1.0:
            raise QuantSpecError(f"observer.momentum={self.momentum} must be in [0, 1)")
        if not 50.0 < self.percentile <= 100.0:
            raise QuantSpecError(f"observer.percentile={self.percentile} must be in (50, 100]")
        if self.num_bins < 16:
            raise QuantSpecError(f"observer.num_bins={self.num_bins} must be at least 16")
        if self.num_candidates < 2:
            raise QuantSpecError(f"observer.num_candidates={self.num_candidates} must be at least 2")


@dataclass(frozen=True)
class QuantizerSpec:
    """The fixed-point format of one tensor.

    Attributes:
        bitwidth: integer bits, 2..16 (ignored for float16/bfloat16).
        dtype: "int" for fixed point, or "float16"/"bfloat16" for a float round-trip passthrough.
        symmetric: zero maps to the integer zero (signed) or to qmin (unsigned).
        signed: integer grid [-2^(b-1), 2^(b-1)-1] if True, else [0, 2^b-1].
        narrow_range: drop the lowest code, e.g. [-127, 127] for signed 8-bit.
        granularity: per_tensor, per_channel (one scale per index of ``axis``) or per_block
            (one scale per ``axis`` index and per ``block_size`` consecutive input channels).
        axis: the channel axis for per_channel and per_block (0 for conv/linear weights).
        block_size: input channels per block, required for per_block.
        scale_type: float, or power_of_two (scales rounded up to 2^k, as fixed-point DPUs need).
        rounding: half_even (the ONNX/torch default), half_up, half_down or stochastic.
        enabled: a disabled quantizer passes its tensor through unchanged.
        observer: how the range is calibrated.
    """

    bitwidth: int = 8
    dtype: str = "int"
    symmetric: bool = False
    signed: bool = False
    narrow_range: bool = False
    granularity: str = "per_tensor"
    axis: int = 0
    block_size: int | None = None
    scale_type: str = "float"
    rounding: str = "half_even"
    enabled: bool = True
    observer: ObserverSpec = field(default_factory=ObserverSpec)

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        if isinstance(self.bitwidth, bool) or not isinstance(self.bitwidth, int):
            raise QuantSpecError(f"bitwidth={self.bitwidth!r} must be an integer in {MIN_BITWIDTH}..{MAX_BITWIDTH}")
        if self.dtype == "int" and not MIN_BITWIDTH <= self.bitwidth <= MAX_BITWIDTH:
            raise QuantSpecError(
                f"bitwidth={self.bitwidth} is not supported; use {MIN_BITWIDTH}..{MAX_BITWIDTH}, "
                "or dtype float16/bfloat16 for a float passthrough"
            )
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("scale_type", self.scale_type, SCALE_TYPES)
        _check_choice("rounding", self.rounding, ROUNDING_MODES)
        if self.granularity == "per_block":
            if self.block_size is None or self.block_size < 1:
                raise QuantSpecError("granularity=per_block needs block_size >= 1, e.g. block_size: 32")
        if self.symmetric is False and self.scale_type == "power_of_two" and self.signed is False:
            pass  # allowed: power-of-two asymmetric unsigned is what some DPUs run
        if not isinstance(self.observer, ObserverSpec):
            raise QuantSpecError("observer must be an ObserverSpec; build specs with spec_from_dict for dicts")

    @property
    def is_float(self) -> bool:
        """True for the float16/bfloat16 passthrough formats."""
        return self.dtype != "int"

    @property
    def quant_min(self) -> int:
        """Smallest integer code of the grid."""
        low = -(2 ** (self.bitwidth - 1)) if self.signed else 0
        return low + 1 if self.narrow_range else low

    @property
    def quant_max(self) -> int:
        """Largest integer code of the grid."""
        return 2 ** (self.bitwidth - 1) - 1 if self.signed else 2**self.bitwidth - 1

    def replace(self, **changes: Any) -> "QuantizerSpec":
        """Return a copy with ``changes`` applied (nested ``observer`` dicts are merged)."""
        if isinstance(changes.get("observer"), Mapping):
            changes["observer"] = dataclasses.replace(self.observer, **changes["observer"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict that :func:`spec_from_dict` reads back."""
        return dataclasses.asdict(self)


def spec_from_dict(values: Mapping[str, Any], base: QuantizerSpec | None = None, where: str = "quantizer") -> QuantizerSpec:
    """Build a :class:`QuantizerSpec` from a (possibly partial) mapping on top of ``base``.

    Unknown keys raise :class:`QuantSpecError` naming ``where.key`` and the valid keys.
    """
    base = base or QuantizerSpec()
    valid = {f.name for f in dataclasses.fields(QuantizerSpec)}
    observer_valid = {f.name for f in dataclasses.fields(ObserverSpec)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in valid:
            raise QuantSpecError(f"{where}.{key} is not a quantizer setting; valid keys: {', '.join(sorted(valid))}")
        if key == "observer":
            if isinstance(value, str):
                value = {"name": value}
            if not isinstance(value, Mapping):
                raise QuantSpecError(f"{where}.observer must be a name or a mapping, got {value!r}")
            bad = set(value) - observer_valid
            if bad:
                raise QuantSpecError(
                    f"{where}.observer.{sorted(bad)[0]} is not an observer setting; valid keys: {', '.join(sorted(observer_valid))}"
                )
            try:
                value = dataclasses.replace(base.observer, **dict(value))
            except QuantSpecError as err:
                raise QuantSpecError(f"{where}.{err}") from None
        changes[key] = value
    try:
        return dataclasses.replace(base, **changes)
    except QuantSpecError as err:
        raise QuantSpecError(f"{where}.{err}") from None
