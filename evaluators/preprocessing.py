"""Image preprocessing description and the torchvision transform built from it.

:class:`Preprocessing` is an immutable, validated description of how a PIL image
becomes a normalized float tensor. :func:`build_transform` turns it into a
callable that follows the standard torchvision semantics exactly:

1. convert the image to ``RGB`` (``in_chans == 3``) or ``L`` (``in_chans == 1``);
2. ``Resize(resize, interpolation, antialias=True)`` -- an ``int`` resizes the
   *short* side to ``resize`` and keeps the aspect ratio (skipped when ``None``);
3. ``CenterCrop(crop)`` (skipped when ``None``);
4. ``ToTensor()`` -- ``uint8`` HWC in 0..255 to ``float32`` CHW in 0..1;
5. ``Normalize(mean, std)``.

Nothing here has side effects; the transform holds no mutable state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from evaluators.errors import EvaluatorConfigError

__all__ = ["Preprocessing", "build_transform", "interpolation_mode", "INTERPOLATIONS"]

#: Interpolation names accepted by :class:`Preprocessing`, in sorted order.
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest")

_PIL_MODES: Mapping[int, str] = MappingProxyType({1: "L", 3: "RGB"})  # read-only


def interpolation_mode(name: str) -> InterpolationMode:
    """Return the torchvision :class:`InterpolationMode` for ``name``.

    Raises :class:`EvaluatorConfigError` naming ``preprocessing.interpolation``
    when ``name`` is not one of :data:`INTERPOLATIONS`.
    """
    if name not in INTERPOLATIONS:
        raise EvaluatorConfigError(
            f"preprocessing.interpolation={name!r} is not supported; "
            f"use one of {list(INTERPOLATIONS)}"
        )
    return InterpolationMode(name)


def _as_float_tuple(field: str, values: Sequence[float] | float) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise EvaluatorConfigError(
            f"preprocessing.{field}={values!r} must be a sequence of numbers, "
            f"e.g. [0.5, 0.5, 0.5]"
        ) from exc


def _check_size(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise EvaluatorConfigError(
            f"preprocessing.{field}={value!r} must be a positive integer or null"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How a PIL image is turned into a normalized ``float32`` CHW tensor.

    Fields (keyword-only):
        resize: short-side target of ``Resize`` in pixels, or ``None`` to skip.
        crop: side of the square ``CenterCrop`` in pixels, or ``None`` to skip.
        interpolation: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"``.
        mean, std: per-channel normalization; any sequence of numbers is accepted
            (e.g. a Hydra ``ListConfig``) and stored as a tuple of floats.
        in_chans: 3 (RGB, default) or 1 (grayscale).

    Validation happens in ``__post_init__``: ``len(mean) == len(std) == in_chans``,
    positive sizes, ``std`` entries non-zero, known interpolation. Invalid values
    raise :class:`EvaluatorConfigError` naming the ``preprocessing.<field>``.
    """

    resize: int | None
    crop: int | None
    interpolation: str = "bilinear"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3

    def __post_init__(self) -> None:
        _check_size("resize", self.resize)
        _check_size("crop", self.crop)
        interpolation_mode(self.interpolation)
        if self.in_chans not in _PIL_MODES:
            raise EvaluatorConfigError(
                f"preprocessing.in_chans={self.in_chans!r} is not supported; use 1 or 3"
            )
        mean = _as_float_tuple("mean", self.mean)
        std = _as_float_tuple("std", self.std)
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise EvaluatorConfigError(
                f"preprocessing.mean (len {len(mean)}) and preprocessing.std (len {len(std)}) "
                f"must both have in_chans={self.in_chans} entries"
            )
        if any(s == 0.0 for s in std):
            raise EvaluatorConfigError(
                f"preprocessing.std={list(std)} must not contain zeros"
            )
        # frozen dataclass: normalise the stored types once, at construction.
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def pil_mode(self) -> str:
        """PIL mode images are converted to before resizing (``"RGB"`` or ``"L"``)."""
        return _PIL_MODES[self.in_chans]


class _ConvertMode:
    """Picklable ``img.convert(mode)`` step (lambdas break DataLoader workers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def build_transform(pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Build the torchvision transform described by ``pre``.

    Input: a PIL image of any mode. Output: a ``float32`` tensor of shape
    ``(in_chans, H, W)``. The returned ``transforms.Compose`` is stateless and
    picklable (safe with ``DataLoader(num_workers > 0)``).
    """
    if not isinstance(pre, Preprocessing):
        raise TypeError(f"build_transform expects a Preprocessing, got {type(pre).__name__}")
    steps: list[Callable] = [_ConvertMode(pre.pil_mode)]
    if pre.resize is not None:
        steps.append(
            transforms.Resize(
                pre.resize, interpolation=interpolation_mode(pre.interpolation), antialias=True
            )
        )
    if pre.crop is not None:
        steps.append(transforms.CenterCrop(pre.crop))
    steps.append(transforms.ToTensor())
    steps.append(transforms.Normalize(mean=list(pre.mean), std=list(pre.std)))
    return transforms.Compose(steps)
