"""The ``digits`` dataset: scikit-learn's ``load_digits()`` (1,797 8x8 images, 0..16).

Split: 1,437 train / 360 test (``eval`` = ``test``), calibration drawn from
train -- see :mod:`evaluators.datasets.arrays`. Images are ``1x8x8``:
``x / 16`` then normalized (default ``(x/16 - 0.5) / 0.5``). ``root`` is
ignored (the data ships with scikit-learn).
"""

from __future__ import annotations

import numpy as np

from evaluators.datasets.arrays import ArrayDataset, ArraySource, build_array_dataset
from evaluators.preprocessing import Preprocessing

__all__ = ["build_digits", "digits_source"]


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: slow import, only this dataset needs it

    bunch = load_digits()
    return bunch.data, bunch.target


def digits_source() -> ArraySource:
    """Description of scikit-learn's digits."""
    return ArraySource(
        kind="digits", n_total=1797, n_train=1437, image_size=(8, 8), scale=16.0,
        default_mean=0.5, default_std=0.5, num_classes=10, load=_load,
    )


def build_digits(
    split: str,
    *,
    root: str | None = None,
    preprocessing: Preprocessing | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Build ``split`` (train/test/eval/calibration) of scikit-learn's digits; ``root`` is ignored."""
    del root
    return build_array_dataset(
        digits_source(), split, preprocessing=preprocessing, num_samples=num_samples, seed=seed
    )
