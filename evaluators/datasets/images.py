"""A dataset of image files on disk, loaded with PIL and a torchvision transform.

:class:`ImageFileDataset` is the common implementation behind the
``imagenet_sample`` and ``imagefolder`` datasets: the builder lists the files
(deterministically) and assigns labels; this class only loads and hashes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from evaluators.datasets.base import combine_fingerprint, file_digest
from evaluators.preprocessing import Preprocessing, build_transform

__all__ = ["ImageFileDataset", "load_image", "default_image_transform"]


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` with PIL and decode it fully (file handle closed on return).

    The image keeps its stored mode; the transform converts it to RGB/L.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img


def default_image_transform(
    preprocessing: Preprocessing | None,
) -> Callable[[Image.Image], torch.Tensor]:
    """Transform for ``preprocessing``; ``None`` means RGB ``ToTensor`` only (0..1, no resize)."""
    if preprocessing is None:
        preprocessing = Preprocessing(
            resize=None, crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
        )
    return build_transform(preprocessing)


class ImageFileDataset(Dataset):
    """Image files under ``root`` with integer labels.

    Args:
        kind: dataset name mixed into the fingerprint (e.g. ``"imagenet_sample"``).
        root: folder the sample ids are relative to.
        sample_ids: POSIX paths relative to ``root``, in dataset order.
        labels: one int label per sample id.
        class_names: name of each class id (``len == num_classes``).
        transform: PIL image -> float32 tensor.

    Items are ``(transform(image), label)``. Nothing is read until an item or
    the fingerprint is requested; the object is not mutated after construction.
    """

    def __init__(
        self,
        *,
        kind: str,
        root: str | Path,
        sample_ids: Sequence[str],
        labels: Sequence[int],
        class_names: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        if len(sample_ids) != len(labels):
            raise ValueError(
                f"{len(sample_ids)} sample ids but {len(labels)} labels; they must match"
            )
        self.kind = kind
        self.root = Path(root)
        self.sample_ids: list[str] = list(sample_ids)
        self.labels: list[int] = [int(label) for label in labels]
        self.class_names: list[str] = list(class_names)
        self.num_classes: int = len(self.class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sample_ids)

    def path(self, index: int) -> Path:
        """Absolute path of sample ``index``."""
        return self.root / self.sample_ids[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.transform(load_image(self.path(index)))
        return image, self.labels[index]

    def fingerprint(self) -> str:
        """sha256 hex over sorted ids, file bytes and labels (reads every file once)."""
        return combine_fingerprint(
            self.kind,
            (
                (sid, label, file_digest(self.root / sid))
                for sid, label in zip(self.sample_ids, self.labels)
            ),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, root={str(self.root)!r}, "
            f"num_samples={len(self)}, num_classes={self.num_classes})"
        )
