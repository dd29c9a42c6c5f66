"""Small models shared by the quantlib tests: each exercises a family of layers or functional ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalNet(nn.Module):
    """Functional add / mul / cat / matmul / mean / adaptive pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a = self.conv(x)
        b = torch.add(a, x.mean(dim=1, keepdim=True))
        c = b * a
        d = torch.cat([c, a], dim=1)
        e = torch.matmul(d, d.transpose(-1, -2))
        p = F.adaptive_avg_pool2d(e, 1).flatten(1)
        m = e.mean(dim=(2, 3))
        return self.fc(torch.cat([p, m], dim=1))


class TransposedNet(nn.Module):
    """Conv -> ConvTranspose2d-BN-ReLU -> 1x1 Conv."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.relu(self.bn(self.up(self.conv(x)))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv1d(6, 4, 3)

    def forward(self, x):
        return self.c2(self.relu(self.bn(self.c1(x))))


class DepthwiseNet(nn.Module):
    """Pointwise -> depthwise-BN-ReLU6 -> grouped conv-ReLU -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.gc = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.act(self.bn(self.dw(self.pw(x))))
        y = self.relu(self.gc(y))
        return self.fc(y.mean((2, 3)))
