"""In-memory image arrays (MNIST, digits) and their fixed train/test split scheme.

Split scheme (shared by ``mnist`` and ``digits``):

* ``perm = numpy.random.default_rng(0).permutation(n_total)`` -- always seed 0,
  so the train/test split never changes;
* ``train = perm[:n_train]``, ``test = perm[n_train:]`` (kept in permuted order,
  so "the first n" of a split is a class-balanced-ish random subset);
* ``eval`` is an alias of ``test``;
* ``calibration`` is drawn from ``train`` only: the first ``num_samples``
  (default 512) of ``default_rng(seed).permutation(len(train))``, then sorted by
  original index.

Sample ids are ``"<kind>:<original row index>"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from evaluators.datasets.base import check_num_samples, combine_fingerprint, take_first
from evaluators.errors import EvaluatorConfigError
from evaluators.preprocessing import Preprocessing, interpolation_mode

__all__ = ["ArrayDataset", "ArraySource", "build_array_dataset", "check_grayscale", "split_indices", "ARRAY_SPLITS", "DEFAULT_CALIBRATION_SIZE"]

ARRAY_SPLITS: tuple[str, ...] = ("calibration", "eval", "test", "train")
DEFAULT_CALIBRATION_SIZE = 512
_SPLIT_SEED = 0


def split_indices(
    n_total: int,
    n_train: int,
    split: str,
    *,
    num_samples: int | None,
    seed: int,
    kind: str,
) -> np.ndarray:
    """Original row indices of ``split`` under the scheme in the module docstring.

    Returns a new ``int64`` array; raises :class:`EvaluatorConfigError` for an
    unknown split or a ``num_samples`` larger than the split.
    """
    if split not in ARRAY_SPLITS:
        raise EvaluatorConfigError(f"data.split={split!r} is not valid for {kind}; use one of {list(ARRAY_SPLITS)}")
    check_num_samples(num_samples)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n_total)
    train, test = perm[:n_train], perm[n_train:]
    if split == "calibration":
        n = min(DEFAULT_CALIBRATION_SIZE, len(train)) if num_samples is None else num_samples
        order = np.random.default_rng(seed).permutation(len(train))
        chosen = take_first(train[order], n, what=f"{kind}/calibration (drawn from the {len(train)} train samples)")
        return np.sort(np.asarray(chosen, dtype=np.int64))
    pool = train if split == "train" else test
    return np.asarray(take_first(pool, num_samples, what=f"{kind}/{split}"), dtype=np.int64)


def check_grayscale(preprocessing: Preprocessing | None, kind: str) -> None:
    """Raise :class:`EvaluatorConfigError` unless ``preprocessing`` is ``None`` or 1-channel."""
    if preprocessing is not None and preprocessing.in_chans != 1:
        raise EvaluatorConfigError(
            f"preprocessing.in_chans={preprocessing.in_chans} is not valid for {kind} "
            f"(grayscale); set preprocessing.in_chans=1 with one mean/std value"
        )


def _tensor_transform(pre: Preprocessing) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize/CenterCrop/Normalize on a batch ``(N, 1, H, W)`` of 0..1 tensors."""
    steps: list[Callable] = []
    if pre.resize is not None:
        steps.append(transforms.Resize(pre.resize, interpolation=interpolation_mode(pre.interpolation), antialias=True))
    if pre.crop is not None:
        steps.append(transforms.CenterCrop(pre.crop))
    steps.append(transforms.Normalize(mean=list(pre.mean), std=list(pre.std)))
    return transforms.Compose(steps)


class ArrayDataset(Dataset):
    """Grayscale images held in memory as flat rows.

    Args:
        kind: dataset name, used in sample ids and the fingerprint.
        images: ``(N_total, H*W)`` array of raw pixel values (not mutated; the
            selected rows are copied).
        labels: ``(N_total,)`` integer labels.
        indices: original row indices to keep, in dataset order.
        image_size: ``(H, W)``.
        scale: raw pixel value mapped to 1.0 (255 for MNIST, 16 for digits).
        preprocessing: ``in_chans`` must be 1; resize/crop are applied if set.
        num_classes: number of classes.

    All tensors are computed once at construction; items are
    ``(float32 tensor (1, H', W'), int label)``.
    """

    def __init__(
        self,
        *,
        kind: str,
        images: np.ndarray,
        labels: np.ndarray,
        indices: np.ndarray,
        image_size: tuple[int, int],
        scale: float,
        preprocessing: Preprocessing,
        num_classes: int,
    ) -> None:
        check_grayscale(preprocessing, kind)
        indices = np.asarray(indices, dtype=np.int64)
        self.kind = kind
        self.indices = indices
        self.raw = np.ascontiguousarray(images[indices])
        self.labels: list[int] = [int(v) for v in np.asarray(labels)[indices]]
        self.sample_ids: list[str] = [f"{kind}:{int(i)}" for i in indices]
        self.num_classes: int = int(num_classes)
        self.preprocessing = preprocessing
        pixels = torch.from_numpy(self.raw.astype(np.float32) / np.float32(scale))
        pixels = pixels.reshape(len(indices), 1, *image_size)
        self.images: torch.Tensor = _tensor_transform(preprocessing)(pixels).contiguous()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]

    def fingerprint(self) -> str:
        """sha256 hex over sorted ids, raw row bytes and labels."""
        return combine_fingerprint(
            self.kind,
            (
                (sid, label, hashlib.sha256(row.tobytes()).digest())
                for sid, label, row in zip(self.sample_ids, self.labels, self.raw)
            ),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, num_samples={len(self)}, num_classes={self.num_classes})"


@dataclass(frozen=True)
class ArraySource:
    """Where an array dataset comes from and how its pixels are scaled.

    ``load()`` returns ``(images (n_total, H*W), labels (n_total,))``; it is
    only called after the split and preprocessing have been validated.
    """

    kind: str
    n_total: int
    n_train: int
    image_size: tuple[int, int]
    scale: float
    default_mean: float
    default_std: float
    num_classes: int
    load: Callable[[], tuple[np.ndarray, np.ndarray]]

    def default_preprocessing(self) -> Preprocessing:
        """Normalization used when ``preprocessing`` is ``None``."""
        return Preprocessing(
            resize=None, crop=None, mean=(self.default_mean,), std=(self.default_std,), in_chans=1
        )


def build_array_dataset(
    source: ArraySource,
    split: str,
    *,
    preprocessing: Preprocessing | None,
    num_samples: int | None,
    seed: int,
) -> ArrayDataset:
    """Build ``split`` of ``source`` under the module's split scheme.

    Config errors (split, ``num_samples``, ``in_chans``) are raised before the
    possibly slow ``source.load()``.
    """
    check_grayscale(preprocessing, source.kind)
    indices = split_indices(
        source.n_total, source.n_train, split, num_samples=num_samples, seed=seed, kind=source.kind
    )
    images, labels = source.load()
    if len(images) != source.n_total or len(labels) != source.n_total:
        raise RuntimeError(
            f"{source.kind}: expected {source.n_total} samples from the installed package, "
            f"found {len(images)} images and {len(labels)} labels"
        )
    return ArrayDataset(
        kind=source.kind,
        images=images,
        labels=labels,
        indices=indices,
        image_size=source.image_size,
        scale=source.scale,
        preprocessing=preprocessing or source.default_preprocessing(),
        num_classes=source.num_classes,
    )
