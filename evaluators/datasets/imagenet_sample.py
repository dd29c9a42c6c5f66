"""The ``imagenet_sample`` dataset: a flat folder of ``<wnid>_<name>.JPEG`` files.

Layout (e.g. ``imagenet-sample-1k``, 1,000 images, one per ImageNet class)::

    <root>/n01440764_tench.JPEG
    <root>/n01443537_goldfish.JPEG
    ...

Rules (fixed, so results are comparable across runs and machines):

* files are taken in sorted file-name order;
* index ``i`` of that listing with ``i % 4 == 0`` belongs to the ``calibration``
  split, every other index to the ``eval`` split (250 / 750 for 1,000 files);
* label = position of the file's wnid in the sorted list of distinct wnids found
  in the folder (the standard ImageNet-1k order for the full sample);
* ``class_names[label]`` is the name part of the first file with that wnid.

When ``root`` is ``None`` the folder ``$QUANTZOO_DATA_DIR/imagenet-sample-1k`` is used.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from evaluators.datasets.base import take_first
from evaluators.datasets.images import ImageFileDataset, default_image_transform
from evaluators.errors import EvaluatorConfigError
from evaluators.preprocessing import Preprocessing

__all__ = ["build_imagenet_sample", "list_imagenet_sample", "resolve_root", "SPLITS", "FOLDER_NAME", "DATA_DIR_ENV"]

SPLITS: tuple[str, ...] = ("calibration", "eval")
FOLDER_NAME = "imagenet-sample-1k"
DATA_DIR_ENV = "QUANTZOO_DATA_DIR"
_CALIBRATION_EVERY = 4


def _fix_hint() -> str:
    return (
        f"set data.root to the {FOLDER_NAME} folder, or {DATA_DIR_ENV} to the folder "
        f"holding {FOLDER_NAME}"
    )


def resolve_root(root: str | os.PathLike | None) -> Path:
    """Return the dataset folder: ``root``, or ``$QUANTZOO_DATA_DIR/imagenet-sample-1k``.

    Raises :class:`EvaluatorConfigError` naming ``data.root`` and
    ``QUANTZOO_DATA_DIR`` when neither is set or the folder does not exist.
    """
    if root is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
        if not data_dir:
            raise EvaluatorConfigError(f"data.root is not set and {DATA_DIR_ENV} is empty; {_fix_hint()}")
        root = Path(data_dir) / FOLDER_NAME
    path = Path(root).expanduser()
    if not path.is_dir():
        raise EvaluatorConfigError(f"data.root={path} does not exist or is not a folder; {_fix_hint()}")
    return path


def list_imagenet_sample(root: Path) -> list[tuple[str, str, str]]:
    """List ``(file_name, wnid, class_name)`` for the images in ``root``, sorted by file name.

    Hidden files and non-image files are skipped. Raises
    :class:`EvaluatorConfigError` if no image is found or a file name does not
    follow ``<wnid>_<name>.<ext>``.
    """
    entries = []
    for name in sorted(os.listdir(root)):
        if name.startswith(".") or not name.lower().endswith(IMG_EXTENSIONS):
            continue
        if not (root / name).is_file():
            continue
        stem = name.rsplit(".", 1)[0]
        wnid, sep, class_name = stem.partition("_")
        if not sep or not wnid or not class_name:
            raise EvaluatorConfigError(
                f"data.root={root} holds {name!r}, which does not follow '<wnid>_<name>.JPEG'; "
                f"point data.root at an {FOLDER_NAME}-style folder"
            )
        entries.append((name, wnid, class_name))
    if not entries:
        hint = ""
        if (root / FOLDER_NAME).is_dir():
            hint = f" (it has a {FOLDER_NAME} subfolder: did you mean data.root={root / FOLDER_NAME}?)"
        raise EvaluatorConfigError(f"data.root={root} holds no images{hint}; {_fix_hint()}")
    return entries


def build_imagenet_sample(
    split: str,
    *,
    root: str | os.PathLike | None,
    preprocessing: Preprocessing | None,
    num_samples: int | None = None,
    seed: int = 0,
) -> ImageFileDataset:
    """Build split ``"calibration"`` or ``"eval"`` of the ImageNet sample.

    ``num_samples`` keeps the first n of the split (in sorted order); ``seed``
    is accepted for a uniform signature and ignored (the split is fixed).
    ``preprocessing=None`` gives un-resized RGB tensors in 0..1.
    """
    del seed  # the split is fixed by file order, never random
    if split not in SPLITS:
        raise EvaluatorConfigError(f"data.split={split!r} is not valid for imagenet_sample; use one of {list(SPLITS)}")
    path = resolve_root(root)
    entries = list_imagenet_sample(path)
    wnids = sorted({wnid for _, wnid, _ in entries})
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    first_name: dict[str, str] = {}
    for _, wnid, class_name in entries:
        first_name.setdefault(wnid, class_name)

    want_calibration = split == "calibration"
    chosen = [e for i, e in enumerate(entries) if (i % _CALIBRATION_EVERY == 0) == want_calibration]
    chosen = take_first(chosen, num_samples, what=f"imagenet_sample/{split} ({path})")
    return ImageFileDataset(
        kind="imagenet_sample",
        root=path,
        sample_ids=[name for name, _, _ in chosen],
        labels=[label_of[wnid] for _, wnid, _ in chosen],
        class_names=[first_name[w] for w in wnids],
        transform=default_image_transform(preprocessing),
    )
