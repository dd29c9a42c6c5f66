"""The ``imagefolder`` dataset: the standard ``<root>/<split_dir>/<class>/<image>`` layout.

Splits ``calibration`` and ``eval`` map to sub-folders of ``root`` through
``split_dirs`` (default ``{"calibration": "train", "eval": "val"}``). Files are
listed with :class:`torchvision.datasets.ImageFolder` (sorted by class, then
path). Class ids come from the sorted class-folder names, taken over *all*
configured split folders that exist, so the calibration and eval splits always
agree on label ids even when a class is missing from one of them.

Sample ids are POSIX paths relative to ``root`` (e.g. ``"val/cat/001.jpg"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torchvision.datasets import ImageFolder

from evaluators.datasets.base import take_first
from evaluators.datasets.images import ImageFileDataset, default_image_transform, load_image
from evaluators.errors import EvaluatorConfigError
from evaluators.preprocessing import Preprocessing

__all__ = ["build_imagefolder", "default_split_dirs", "SPLITS"]

SPLITS: tuple[str, ...] = ("calibration", "eval")


def default_split_dirs() -> dict[str, str]:
    """A fresh copy of the default split -> sub-folder mapping."""
    return {"calibration": "train", "eval": "val"}


def _class_folders(folder: Path) -> set[str]:
    return {e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}


class _FixedClassesImageFolder(ImageFolder):
    """ImageFolder whose class list is given instead of read from one folder."""

    def __init__(self, root: str, classes: list[str]) -> None:
        self._fixed_classes = classes
        super().__init__(root, loader=load_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}


def build_imagefolder(
    split: str,
    *,
    root: str | os.PathLike | None,
    preprocessing: Preprocessing | None,
    num_samples: int | None = None,
    seed: int = 0,
    split_dirs: Mapping[str, str] | None = None,
) -> ImageFileDataset:
    """Build ``split`` of an ImageFolder tree rooted at ``root``.

    ``num_samples`` keeps the first n files of the split in ImageFolder order
    (sorted by class, then path); ``seed`` is ignored (nothing is random).
    """
    del seed
    dirs = dict(default_split_dirs() if split_dirs is None else split_dirs)
    unknown = sorted(set(dirs) - set(SPLITS))
    if unknown:
        raise EvaluatorConfigError(
            f"data.split_dirs has unknown keys {unknown}; use only {list(SPLITS)}"
        )
    if split not in SPLITS:
        raise EvaluatorConfigError(f"data.split={split!r} is not valid for imagefolder; use one of {list(SPLITS)}")
    if split not in dirs:
        raise EvaluatorConfigError(
            f"data.split_dirs={dirs} has no entry for split {split!r}; add e.g. {split}: val"
        )
    if root is None:
        raise EvaluatorConfigError("data.root is not set; set data.root to the folder holding the split folders")
    base = Path(root).expanduser()
    folder = base / dirs[split]
    if not folder.is_dir():
        raise EvaluatorConfigError(
            f"data.root={base}: split folder {folder} does not exist; "
            f"fix data.root or data.split_dirs ({split}: {dirs[split]})"
        )
    classes = sorted(
        set().union(*(_class_folders(base / d) for d in dirs.values() if (base / d).is_dir()))
    )
    if not classes:
        raise EvaluatorConfigError(f"data.root={base}: {folder} has no class sub-folders; expected <split>/<class>/<image>")
    listing = _FixedClassesImageFolder(str(folder), classes)
    if not listing.samples:
        raise EvaluatorConfigError(f"data.root={base}: {folder} holds no images")
    samples = take_first(listing.samples, num_samples, what=f"imagefolder/{split} ({folder})")
    return ImageFileDataset(
        kind="imagefolder",
        root=base,
        sample_ids=[Path(p).relative_to(base).as_posix() for p, _ in samples],
        labels=[label for _, label in samples],
        class_names=classes,
        transform=default_image_transform(preprocessing),
    )
