"""Shared builders of the QAT tests (a digits MLP quantized to few bits), and tests of quantlib.qat.data.

The other ``test_quantlib_qat_*`` modules import the builders from here; everything is seeded
and runs in about a second.
"""

from __future__ import annotations

import copy
import functools

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from quantlib.config import load_config
from quantlib.qat.data import EpochShuffleSampler, cached, training_loader
from quantlib.quantsim import QuantSim


def digits() -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """(train dataset of 1,400 digits, (test inputs, test labels) of the other 397)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    return TensorDataset(x[:1400], y[:1400]), (x[1400:], y[1400:])


def trained_mlp(dropout: float = 0.0, hidden: int = 32) -> nn.Module:
    """A 64-hidden-10 MLP trained full-batch on the digits train split (a fresh copy of the same weights every call)."""
    return copy.deepcopy(_trained_mlp(dropout, hidden))


@functools.lru_cache(maxsize=None)
def _trained_mlp(dropout: float, hidden: int) -> nn.Module:
    train, _ = digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = train.tensors
        for _ in range(100):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def quantized(model: nn.Module, weight_bits: int = 2, activation_bits: int = 3) -> QuantSim:
    """A QuantSim of ``model`` at low bitwidths, calibrated on 256 training digits."""
    train, _ = digits()
    config = load_config("per_channel").with_defaults(weight={"bitwidth": weight_bits}, activation={"bitwidth": activation_bits})
    sim = QuantSim(model, train.tensors[0][:1], config)
    sim.calibrate([train.tensors[0][:256]], progress=False)
    return sim


@torch.no_grad()
def accuracy(model: nn.Module) -> float:
    """Top-1 (%) on the digits test split."""
    _, (x, y) = digits()
    return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def test_epoch_shuffle_is_a_function_of_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and sorted(first) == list(range(50))
    assert second != first and sorted(second) == list(range(50))
    assert list(EpochShuffleSampler(50, seed=3, shuffle=False)) == list(range(50))
    assert list(EpochShuffleSampler(50, seed=4)) != first


def test_training_loader_batches_and_cache():
    train, _ = digits()
    loader = training_loader(cached(train), 128, seed=0)
    batches = list(loader)
    assert len(loader) == 11 and [len(b[0]) for b in batches][-1] == 1400 - 10 * 128
    assert sum(int(b[1].sum()) for b in batches) == int(train.tensors[1].sum())
