"""Training batches whose order is a function of (seed, epoch), so resumed runs see the same data.

:class:`EpochShuffleSampler` is a :class:`torch.utils.data.Sampler` that draws a fresh permutation
per epoch from a private ``torch.Generator`` seeded with ``seed + epoch`` (the global RNG is never
touched); :func:`training_loader` wraps a dataset in a DataLoader with it. The trainer calls
``set_epoch`` at the start of every epoch (:mod:`quantlib.qat.trainer`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset


class EpochShuffleSampler(Sampler[int]):
    """Indices ``0..size-1`` in a permutation fixed by ``(seed, epoch)``; ``shuffle=False`` keeps the order."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def cached(dataset: Dataset) -> TensorDataset:
    """The whole dataset decoded once into memory as (inputs, labels) tensors (for small training sets)."""
    items = [dataset[i] for i in range(len(dataset))]
    inputs = torch.stack([torch.as_tensor(item[0]) for item in items])
    labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)
    return TensorDataset(inputs, labels)


def training_loader(dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                    drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``dataset`` with an :class:`EpochShuffleSampler`."""
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffleSampler(len(dataset), seed, shuffle),
                      drop_last=drop_last, num_workers=num_workers)
