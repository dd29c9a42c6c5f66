"""High-bias absorption (Nagel et al. 2019, DFQ, section 4.1.2).

CLE can leave large biases in a layer's output channels, and with them wide activation ranges.
For ``y = W2 relu(W1 x + b1) + b2`` where the pre-activation ``z`` of channel ``i`` is almost
always above ``c_i = max(0, mean_i - k * std_i)`` (the BatchNorm statistics, ``k = 3``),
``relu(z) = relu(z - c) + c`` on those inputs, so ``b1 -= c`` and ``b2 += W2 c`` keep the
function and narrow the activation range by ``c``. The statistics come from BatchNorm captured
before folding (:mod:`quantlib.ptq.bn_stats`).

Only ReLU pairs are absorbed (convert ReLU6 first with CLE's ``relu6_to_relu``). The identity is
exact for every input with ``z >= c``; where ``second`` zero-pads its input the border outputs
change slightly (the padded zeros stand for ``-c``), as in DFQ and AIMET.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..batchnorm_fold import fold_batch_norms
from . import channels
from .bn_stats import ChannelGaussian
from .layer_pairs import LayerPair, find_layer_pairs
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
                "skipped_not_relu": self.skipped_activation, "absorbed_total": round(total, 4)}


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


def absorb_high_biases(gm: fx.GraphModule, stats: dict[str, ChannelGaussian],
                       config: HighBiasAbsorptionConfig | None = None,
                       pairs: list[LayerPair] | None = None) -> AbsorptionResult:
    """Absorb high biases across every ReLU pair of ``gm`` whose first layer has statistics.

    Mutates the biases of ``gm`` and updates ``stats`` (the mean of each absorbed layer's output
    drops by ``c``). ``pairs`` defaults to :func:`find_layer_pairs`.
    """
    config = config or HighBiasAbsorptionConfig()
    modules = dict(gm.named_modules())
    result = AbsorptionResult()
    for pair in pairs if pairs is not None else find_layer_pairs(gm):
        if pair.activation.kind != "relu":
            result.skipped_activation += 1
            continue
        first, second = modules[pair.first], modules[pair.second]
        if pair.first not in stats or first.bias is None:
            result.skipped_no_stats += 1
            continue
        dist = stats[pair.first]
        amount = (dist.mean - config.num_std * dist.std).clamp(min=0.0).to(first.weight)
        if not bool((amount > 0).any()):
            continue
        absorb_pair(first, second, amount)
        stats[pair.first] = dist.shifted(-amount.to(dist.mean))
        result.absorbed[pair.first] = amount.detach().cpu()
    return result


def _run_high_bias_absorption(context: PTQContext, config: HighBiasAbsorptionConfig) -> dict[str, Any]:
    folded = fold_batch_norms(context.model)
    result = absorb_high_biases(context.model, context.layer_output_stats, config)
    return {**result.summary(), "folded_batch_norms": len(folded)}


STEPS = (
    PTQStep(name="high_bias_absorption", config_cls=HighBiasAbsorptionConfig, run=_run_high_bias_absorption,
            phase="model", description="absorb high biases of ReLU pairs into the next layer (BN statistics)"),
)
