"""BatchNorm re-estimation: recompute BN running statistics on calibration data.

After QAT, pruning, SVD or weight equalization, the running mean/variance a BN layer stored
during training no longer describe its input. Re-estimation resets them and averages the batch
statistics over calibration data with every weight frozen: BN layers run in train mode (so they
normalize with batch statistics, as in training), everything else in eval mode (no dropout), no
gradient is taken, and the BN affine parameters are not touched. Optionally the re-estimated BN
is then folded into the preceding layer (:mod:`quantlib.batchnorm_fold`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..batchnorm_fold import fold_batch_norms
from .registry import PTQConfigError, PTQContext, PTQStep, default_forward, model_device


def batch_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (timm's BatchNormAct2d included) of ``model`` that tracks running stats."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def reestimate_bn_stats(model: nn.Module, data: Iterable, *, num_batches: int | None = None,
                        forward_fn: Callable[[nn.Module, Any, torch.device], Any] | None = None,
                        progress: bool = False) -> int:
    """Reset and re-estimate the running statistics of every BN of ``model``; returns batches used.

    ``data`` yields tensors or (inputs, labels) pairs. The running mean/variance become the
    average of the per-batch statistics (cumulative average, ``momentum=None``). ``model`` is
    mutated (BN buffers only); its train/eval modes and BN momenta are restored afterwards.
    Raises ValueError on empty data. A model without BN is left as it is (returns 0).
    """
    bns = batch_norms(model)
    if not bns:
        return 0
    forward_fn = forward_fn or default_forward
    device = model_device(model)
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns.values()}
    used = 0
    try:
        model.eval()
        for bn in bns.values():
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        batches = itertools.islice(data, num_batches) if num_batches else data
        total = num_batches or (len(data) if hasattr(data, "__len__") else None)
        for batch in tqdm(batches, total=total, desc="bn re-estimation", disable=not progress, leave=False):
            forward_fn(model, batch, device)
            used += 1
    finally:
        for module, mode in modes.items():
            module.training = mode
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    if used == 0:
        raise ValueError("BN re-estimation data is empty; give at least one batch")
    return used


@dataclass(frozen=True)
class BNReestimationConfig:
    """Settings of BN re-estimation.

    Attributes:
        num_batches: calibration batches to use (None: all).
        fold: fold the re-estimated BN into the preceding conv/linear afterwards.
    """

    num_batches: int | None = None
    fold: bool = False

    def __post_init__(self) -> None:
        if self.num_batches is not None and self.num_batches < 1:
            raise PTQConfigError(f"num_batches={self.num_batches} must be at least 1, or null for all")


def _run_bn_reestimation(context: PTQContext, config: BNReestimationConfig) -> dict[str, Any]:
    count = len(batch_norms(context.model))
    used = reestimate_bn_stats(context.model, context.calibration_data, num_batches=config.num_batches,
                               forward_fn=context.forward_fn, progress=context.progress)
    summary: dict[str, Any] = {"batch_norms": count, "batches": used}
    if config.fold and isinstance(context.model, fx.GraphModule):
        summary["folded_batch_norms"] = len(fold_batch_norms(context.model))
    return summary


STEPS = (
    PTQStep(name="bn_reestimation", config_cls=BNReestimationConfig, run=_run_bn_reestimation, phase="model",
            description="reset BatchNorm running statistics and re-estimate them on calibration data",
            must_precede=("bn_fold", "cle", "high_bias_absorption")),
)
