"""Shared inputs and settings of the layer-wise reconstruction tests (AdaRound, AdaQuant, QDrop, blocks)."""

from __future__ import annotations

import torch
from torch import nn

from quantlib.config import load_config
from quantlib.quantsim import QuantSim


def correlated_inputs(samples: int, features: int = 24, rank: int = 4, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are strongly correlated (a rank-4 signal plus a little noise): the
    case where choosing each weight's rounding jointly beats rounding each to nearest."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(rank, features, generator=g)
    return torch.randn(samples, rank, generator=g) @ mixing + 0.05 * torch.randn(samples, features, generator=g)


def w4_a16_config():
    """4-bit per-channel weights, 16-bit activations: the weight rounding is the error that matters."""
    return load_config("per_channel").with_defaults(weight={"bitwidth": 4}, activation={"bitwidth": 16})


def calibrated_sim(model: nn.Module, x: torch.Tensor, weight_bits: int, activation_bits: int) -> QuantSim:
    """``model`` under per-channel QuantSim at the given bitwidths, calibrated on ``x``."""
    config = load_config("per_channel").with_defaults(weight={"bitwidth": weight_bits},
                                                      activation={"bitwidth": activation_bits})
    sim = QuantSim(model, x[:1], config)
    sim.calibrate([x], progress=False)
    return sim


def output_mse(model: nn.Module, sim: QuantSim, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sim.model(x) - model(x)).pow(2).mean())


FAST = {"num_iterations": 400, "learning_rate": 0.01, "reg_weight": 0.1, "batch_size": 64, "num_samples": 512}
