"""Shared by the QuantSim and export tests: a residual-block model and seeded builders.

``build`` gives an eval-mode model with non-trivial BN statistics, ``randn`` a seeded input,
``calibrated`` a QuantSim calibrated on two seeded batches, ``rel_error`` the relative L2 error.
"""

from __future__ import annotations

import torch
from torch import nn

from quantlib.quantsim import QuantSim


class ResBlockNet(nn.Module):
    """Conv-BN-ReLU -> Conv-BN -> residual Add -> ReLU -> pool -> flatten -> Linear-ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        self.fcrelu = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)  # 15 weights: an odd count for int4 packing

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        y = self.relu2(z + y)
        y = torch.flatten(self.pool(y), 1)
        return self.fc2(self.fcrelu(self.fc(y)))


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh BNs fold to the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def build(cls, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(cls(**kwargs), seed + 1).eval()


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


IMG = (2, 3, 8, 8)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def calibrated(model, example, config="per_channel", batches=None) -> QuantSim:
    sim = QuantSim(model, example, config)
    sim.calibrate(batches if batches is not None else [randn(*example.shape, seed=s) for s in (10, 11)], progress=False)
    return sim
