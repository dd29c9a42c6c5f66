"""Optimizer and per-step learning-rate schedule of :func:`quantlib.qat.trainer.train`.

Parameter groups (torch.optim param groups):
    * ``decay``: weights with two or more dimensions (conv kernels, linear matrices), at ``lr``
      with ``weight_decay``;
    * ``no_decay``: biases and other 1-D parameters (norm scales), at ``lr``, no decay;
    * ``quantizer``: learnable quantizer ranges (parameters of a
      :class:`~quantlib.quantizer.FakeQuantizer`, e.g. LSQ scales), at ``quantizer_lr``, no decay.
Empty groups are left out. Parameters with ``requires_grad=False`` are not optimized.

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` stepped after every optimizer step:
linear warm-up over ``warmup_steps``, then constant, cosine or linear decay to 0 at ``total_steps``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quantizer import FakeQuantizer
from .config import TrainConfig


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The param groups described in the module docstring (names kept under ``"names"``)."""
    quantizer_params = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer)
                        for p in m.parameters(recurse=False)}
    groups: dict[str, dict] = {
        "decay": {"params": [], "names": [], "weight_decay": config.weight_decay, "lr": config.lr},
        "no_decay": {"params": [], "names": [], "weight_decay": 0.0, "lr": config.lr},
        "quantizer": {"params": [], "names": [], "weight_decay": 0.0,
                      "lr": config.lr if config.quantizer_lr is None else config.quantizer_lr},
    }
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        kind = "quantizer" if id(param) in quantizer_params else ("decay" if param.dim() >= 2 else "no_decay")
        groups[kind]["params"].append(param)
        groups[kind]["names"].append(name)
    return [dict(group, group=kind) for kind, group in groups.items() if group["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` over :func:`parameter_groups`; raises ValueError when nothing is trainable."""
    groups = parameter_groups(model, config)
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True; nothing to train")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Multiplier of the peak LR for the optimizer step with index ``step`` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(total_steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """A LambdaLR applying :func:`lr_factor` to every param group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
