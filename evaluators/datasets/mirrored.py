"""A labelled image dataset followed by its own samples mirrored left-right.

:func:`with_mirrored` doubles a labelled calibration split for scoring (the searching PTQ and
compression steps score on it): for an image classifier a left-right mirror keeps the label, so
every calibration image gives a second labelled sample and the score moves in half-size steps.
The evaluation split is never mirrored.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import ConcatDataset, Dataset


class MirroredImages(Dataset):
    """``dataset`` with every image flipped along its last (width) axis; labels unchanged."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.dataset[index]
        return image.flip(-1), label


def with_mirrored(dataset: Dataset) -> Dataset:
    """The samples of ``dataset``, then the same samples mirrored (twice the length)."""
    return ConcatDataset([dataset, MirroredImages(dataset)])
