"""The ``bn_fold`` pipeline step: fold BatchNorm into the preceding conv/linear of the FP32 model.

The folding itself is :func:`quantlib.batchnorm_fold.fold_batch_norms` (Jacob et al. 2018). As a
model-level step it runs before CLE and high-bias absorption, which need folded weights. The
BN statistics those passes use were captured by the pipeline before any step ran
(:mod:`quantlib.ptq.bn_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..batchnorm_fold import fold_batch_norms
from .registry import PTQContext, PTQStep


@dataclass(frozen=True)
class BNFoldConfig:
    """``bn_fold`` takes no settings."""


def _run_bn_fold(context: PTQContext, config: BNFoldConfig) -> dict[str, Any]:
    folded = fold_batch_norms(context.model)
    return {"folded_batch_norms": len(folded)}


STEPS = (
    PTQStep(name="bn_fold", config_cls=BNFoldConfig, run=_run_bn_fold, phase="model",
            description="fold BatchNorm into the preceding conv/linear layer"),
)
