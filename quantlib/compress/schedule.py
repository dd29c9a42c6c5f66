"""Gradual magnitude pruning during fine-tuning, on TFMOT's polynomial-decay sparsity schedule.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression"
(2017), as TFMOT's ``PolynomialDecay``: the target sparsity at step ``t`` is

    s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** power,   t clipped to [t_0, t_end],

updated every ``frequency`` steps from ``t_0`` (and always at ``t_end``). At an update, each layer's
mask becomes the magnitude mask at ``s(t)`` of its current (already masked) weights; after every
step the mask is re-applied, so pruned weights stay zero while their neighbours train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import layer_by_name
from .sparsity import magnitude_mask, sparsity_layers


@dataclass(frozen=True)
class PolynomialDecay:
    """The schedule above; steps are the trainer's global steps (1 after the first optimizer step)."""

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    power: float = 3.0
    frequency: int = 1

    def __post_init__(self) -> None:
        for name in ("initial_sparsity", "final_sparsity"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.end_step <= self.begin_step or self.begin_step < 0:
            raise ValueError(f"begin_step={self.begin_step}, end_step={self.end_step}: need 0 <= begin_step < end_step")
        if self.frequency < 1:
            raise ValueError(f"frequency={self.frequency} must be >= 1")

    def sparsity(self, step: int) -> float:
        """s(step)."""
        t = min(max(step, self.begin_step), self.end_step)
        progress = (t - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** self.power

    def updates_at(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``."""
        if step == self.end_step:
            return True
        return self.begin_step <= step < self.end_step and (step - self.begin_step) % self.frequency == 0


class GradualPruningHook:
    """``hook(model, global_step)`` for the trainer's ``step_hooks``: prune the matching layers on ``schedule``.

    Layers are chosen once from ``model`` by globs and found again by name in the model the hook
    is called with. The hook mutates those layers' weights; ``history`` records (step, sparsity)
    at every mask update.
    """

    def __init__(self, model: nn.Module, schedule: PolynomialDecay, *, include: Sequence[str] = ("*",),
                 exclude: Sequence[str] = ()) -> None:
        self.schedule = schedule
        self.layers = list(sparsity_layers(model, include, exclude))
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[tuple[int, float]] = []

    @torch.no_grad()
    def update_masks(self, model: nn.Module, sparsity: float) -> None:
        """Recompute every layer's mask at ``sparsity`` from its current weights and apply it (``model`` mutated)."""
        for name in self.layers:
            weight = layer_by_name(model, name).weight
            self.masks[name] = magnitude_mask(weight, sparsity)
            weight.mul_(self.masks[name].to(weight.dtype))

    @torch.no_grad()
    def __call__(self, model: nn.Module, global_step: int) -> None:
        if self.schedule.updates_at(global_step):
            target = self.schedule.sparsity(global_step)
            self.update_masks(model, target)
            self.history.append((global_step, target))
            return
        for name, mask in self.masks.items():
            weight = layer_by_name(model, name).weight
            weight.mul_(mask.to(weight.dtype))
