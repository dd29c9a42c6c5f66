"""High-bias absorption (Nagel et al. 2019, DFQ, section 4.1.2).

CLE can leave large biases in a layer's output channels, and with them wide activation ranges.
For ``y = W2 relu(W1 x + b1) + b2`` where the pre-activation ``z`` of channel ``i`` is almost
always above ``c_i = max(0, mean_i - k * std_i)`` (the BatchNorm statistics, ``k = 3``),
``relu(z) = relu(z - c) + c`` on those inputs, so ``b1 -= c`` and ``b2 += W2 c`` keep the
function and narrow the activation range by ``c``. The statistics come from BatchNorm captured
before folding (:mod:`quantlib.ptq.bn_stats`).

Pairs joined by ReLU or by a clip with lower bound 0 (ReLU6, or the per-channel clip CLE leaves)
are absorbed. For a clip to ``[0, h]`` the absorbed amount is at most ``h`` and the bound moves
too: ``clip(z, 0, h) = clip(z - c, 0, h - c) + c`` for ``z >= c``, so the activation becomes a
per-channel clip (:func:`quantlib.ptq.cle.set_channel_clip`). The identity is exact for every
input with ``z >= c``; where ``second`` zero-pads its input the border outputs change slightly
(the padded zeros stand for ``-c``), as in DFQ and AIMET.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..batchnorm_fold import fold_batch_norms
from . import channels
from .bn_stats import ChannelGaussian
from .cle import channel_view, set_channel_clip
from .layer_pairs import Activation, LayerPair, find_layer_pairs
from .registry import PTQConfigError, PTQContext, PTQStep


@dataclass(frozen=True)
class HighBiasAbsorptionConfig:
    """Settings of high-bias absorption.

    Attributes:
        num_std: absorb ``max(0, mean - num_std * std)`` per channel (DFQ uses 3).
    """

    num_std: float = 3.0

    def __post_init__(self) -> None:
        if not self.num_std >= 0:
            raise PTQConfigError(f"num_std={self.num_std} must be 0 or more")


@dataclass
class AbsorptionResult:
    """Per first layer of each absorbed pair, the absorbed amount ``c`` (1-D)."""

    absorbed: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped_no_stats: int = 0
    skipped_activation: int = 0

    def summary(self) -> dict[str, Any]:
        total = sum(float(c.sum()) for c in self.absorbed.values())
        return {"pairs": len(self.absorbed), "skipped_no_bn_statistics": self.skipped_no_stats,
                "skipped_activation": self.skipped_activation, "absorbed_total": round(total, 4)}


@torch.no_grad()
def absorb_pair(first: nn.Module, second: nn.Module, amount: torch.Tensor) -> None:
    """``first.bias -= amount``, ``second.bias += W2 @ amount`` (in place; creates second's bias)."""
    groups = getattr(second, "groups", 1)
    delta = channels.in_channel_response(second.weight, groups, amount)
    first.bias.sub_(amount.to(first.bias))
    if second.bias is None:
        second.bias = nn.Parameter(delta.to(second.weight))
    else:
        second.bias.add_(delta.to(second.bias))


def _upper_bound(activation: Activation) -> float | torch.Tensor | None:
    """The clip's upper bound when ``activation`` is ReLU (inf) or a clip whose lower bound is 0; else None."""
    if activation.kind == "relu":
        return float("inf")
    if not activation.is_clip:
        return None
    low = activation.low
    zero_low = bool((low == 0).all()) if isinstance(low, torch.Tensor) else low == 0.0
    return activation.high if zero_low else None


def absorb_high_biases(gm: fx.GraphModule, stats: dict[str, ChannelGaussian],
                       config: HighBiasAbsorptionConfig | None = None,
                       pairs: list[LayerPair] | None = None) -> AbsorptionResult:
    """Absorb high biases across every ReLU/clip-to-[0, h] pair of ``gm`` whose first layer has statistics.

    Mutates the biases of ``gm`` (and the bounds of the clips between absorbed pairs, which
    become per-channel) and updates ``stats`` (the mean of each absorbed layer's output drops
    by ``c``). ``pairs`` defaults to :func:`find_layer_pairs`.
    """
    config = config or HighBiasAbsorptionConfig()
    modules = dict(gm.named_modules())
    result = AbsorptionResult()
    rewired = False
    for pair in pairs if pairs is not None else find_layer_pairs(gm):
        high = _upper_bound(pair.activation)
        if high is None:
            result.skipped_activation += 1
            continue
        first, second = modules[pair.first], modules[pair.second]
        if pair.first not in stats or first.bias is None:
            result.skipped_no_stats += 1
            continue
        dist = stats[pair.first]
        amount = (dist.mean - config.num_std * dist.std).clamp(min=0.0).to(first.weight)
        clipped = pair.activation.kind != "relu"
        if clipped:
            high_t = high.detach().to(amount).reshape(-1) if isinstance(high, torch.Tensor) else torch.full_like(amount, high)
            amount = torch.minimum(amount, high_t)
        if not bool((amount > 0).any()):
            continue
        absorb_pair(first, second, amount)
        if clipped:
            set_channel_clip(gm, pair.activation_node, torch.zeros_like(amount), high_t - amount,
                             channel_view(first, amount.numel()))
            rewired = True
        stats[pair.first] = dist.shifted(-amount.to(dist.mean))
        result.absorbed[pair.first] = amount.detach().cpu()
    if rewired:
        gm.graph.lint()
        gm.recompile()
    return result


def _run_high_bias_absorption(context: PTQContext, config: HighBiasAbsorptionConfig) -> dict[str, Any]:
    folded = fold_batch_norms(context.model)
    result = absorb_high_biases(context.model, context.layer_output_stats, config)
    return {**result.summary(), "folded_batch_norms": len(folded)}


STEPS = (
    PTQStep(name="high_bias_absorption", config_cls=HighBiasAbsorptionConfig, run=_run_high_bias_absorption,
            phase="model", description="absorb high biases of ReLU pairs into the next layer (BN statistics)"),
)
