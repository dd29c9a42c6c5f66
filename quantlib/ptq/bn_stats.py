"""Per-channel Gaussian statistics of layer outputs, read from BatchNorm before it is folded.

After BatchNorm, a layer's pre-activation output in channel ``c`` is modelled as
``N(beta_c, gamma_c^2)`` (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 4.2). Folding BN into the layer erases ``beta``/``gamma``, so the
statistics are captured *before* folding, keyed by the name of the layer the BN follows, and
kept up to date by passes that rescale or shift that layer's output (CLE, high-bias absorption).
They feed high-bias absorption and analytical (data-free) bias correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..batchnorm_fold import _FOLDABLE
from .layer_pairs import Activation


@dataclass(frozen=True)
class ChannelGaussian:
    """Per-channel normal distribution ``N(mean, std^2)`` of a layer's output (1-D tensors)."""

    mean: torch.Tensor
    std: torch.Tensor

    def scaled(self, factor: torch.Tensor) -> "ChannelGaussian":
        """The distribution of ``x * factor`` (per channel)."""
        factor = factor.to(self.mean)
        return ChannelGaussian(self.mean * factor, self.std * factor.abs())

    def shifted(self, delta: torch.Tensor) -> "ChannelGaussian":
        """The distribution of ``x + delta`` (per channel)."""
        return ChannelGaussian(self.mean + delta.to(self.mean), self.std)


def collect_bn_output_stats(gm: fx.GraphModule) -> dict[str, ChannelGaussian]:
    """``{layer name: N(beta, gamma^2)}`` for every BN that :func:`fold_batch_norms` would fold.

    Same matching rule as the fold (a BN whose input is a conv/linear used by that BN only), so
    the keys are exactly the layers that end up with BN folded in. ``gm`` is not mutated.
    """
    modules = dict(gm.named_modules())
    stats: dict[str, ChannelGaussian] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        producer = node.args[0] if node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            continue
        if not isinstance(modules[producer.target], _FOLDABLE) or len(producer.users) != 1:
            continue
        bn = modules[node.target]
        channels = bn.num_features
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones(channels)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros(channels)
        stats[producer.target] = ChannelGaussian(beta.clone().float(), gamma.abs().clone().float())
    return stats


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _Phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _bound_tensor(bound: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(bound, torch.Tensor):
        return bound.detach().to(like).reshape(-1).expand_as(like)
    return torch.full_like(like, float(bound))


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, low: float | torch.Tensor,
                        high: float | torch.Tensor) -> torch.Tensor:
    """``E[clip(z, low, high)]`` for ``z ~ N(mean, std^2)`` per channel.

    ``low``/``high`` are floats or per-channel 1-D tensors and may be infinite. With
    a = (low - mean)/std and b = (high - mean)/std:
    E = low*Phi(a) + mean*(Phi(b) - Phi(a)) + std*(phi(a) - phi(b)) + high*(1 - Phi(b)),
    where an infinite bound's terms vanish; a zero std gives clip(mean).
    """
    mean, std = mean.double(), std.double()
    low_t, high_t = _bound_tensor(low, mean), _bound_tensor(high, mean)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    zeros, ones = torch.zeros_like(mean), torch.ones_like(mean)
    has_low, has_high = torch.isfinite(low_t), torch.isfinite(high_t)
    low_f, high_f = torch.where(has_low, low_t, zeros), torch.where(has_high, high_t, zeros)
    a, b = (low_f - mean) / safe, (high_f - mean) / safe
    cdf_a, pdf_a = torch.where(has_low, _Phi(a), zeros), torch.where(has_low, _phi(a), zeros)
    cdf_b, pdf_b = torch.where(has_high, _Phi(b), ones), torch.where(has_high, _phi(b), zeros)
    result = low_f * cdf_a + mean * (cdf_b - cdf_a) + safe * (pdf_a - pdf_b) + high_f * (1.0 - cdf_b)
    degenerate = torch.minimum(torch.maximum(mean, low_t), high_t)
    return torch.where(std > 0, result, degenerate).float()


def expected_activation(stats: ChannelGaussian, activation: Activation) -> torch.Tensor:
    """``E[activation(z)]`` per channel for ``z ~ stats``."""
    if activation.kind == "leaky_relu":
        positive = clipped_normal_mean(stats.mean, stats.std, 0.0, float("inf"))
        return positive + activation.slope * (stats.mean - positive)
    return clipped_normal_mean(stats.mean, stats.std, activation.low, activation.high)
