"""The preprocessing part of a model card: how an image becomes the input tensor.

:class:`PreprocessingSpec` has the same fields and semantics as
``evaluators.Preprocessing`` (``zoo`` does not import ``evaluators``; the CLI
passes :meth:`PreprocessingSpec.as_kwargs` across). It validates itself on
construction and raises :class:`zoo.card_fields.CardError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zoo.card_fields import check_choice, check_int, fail, float_tuple, jsonable, set_field

__all__ = ["INTERPOLATIONS", "PreprocessingSpec"]

INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class PreprocessingSpec:
    """How an image becomes the model input (same semantics as ``evaluators.Preprocessing``).

    ``resize``: short-side size or ``None``; ``crop``: center-crop side or
    ``None``; ``interpolation``: bilinear / bicubic / nearest; ``mean`` /
    ``std``: one value per channel; ``in_chans``: 1 or 3.
    """

    resize: int | None
    crop: int | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int

    def __post_init__(self) -> None:
        self._validate("preprocessing")

    def _validate(self, where: str) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None:
                check_int(f"{where}.{name}", value, minimum=1)
        check_choice(f"{where}.interpolation", self.interpolation, INTERPOLATIONS)
        if self.in_chans not in (1, 3) or isinstance(self.in_chans, bool):
            fail(f"{where}.in_chans", f"must be 1 or 3, got {self.in_chans!r}")
        mean = float_tuple(f"{where}.mean", self.mean)
        std = float_tuple(f"{where}.std", self.std)
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            fail(
                f"{where}.mean/std",
                f"must have in_chans={self.in_chans} entries each, got {len(mean)} and {len(std)}",
            )
        if any(s <= 0 for s in std):
            fail(f"{where}.std", f"entries must be > 0, got {list(std)}")
        set_field(self, "mean", mean)
        set_field(self, "std", std)

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``evaluators.Preprocessing(**spec.as_kwargs())``."""
        return {
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
            "in_chans": self.in_chans,
        }

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.as_kwargs())
