"""Observers that keep re-estimating a quantized model's encodings during the first steps of QAT.

PyTorch's eager QAT and AIMET both let observers run for a while after training starts and then
freeze them, so that the ranges follow the weights and activations as they move. Here, while the
global step is below ``freeze_after``:

* every enabled integer activation quantizer observes the tensor it receives in each training
  forward pass (a forward pre-hook; evaluation passes are ignored) and sets its encoding from an
  exponential moving average of the per-batch min/max (``momentum`` weighs the running value;
  the average starts from the PTQ encoding's representable range); under DDP the per-batch
  min/max are reduced across ranks first, so every rank holds the same encoding;
* after every optimizer step every weight quantizer is recalibrated from the current weights with
  its own observer (:meth:`~quantlib.qmodules.QuantizedWeightMixin.calibrate_weight`).

At ``freeze_after`` the hooks are removed and the encodings stay as they are (learnable ranges, if
any, keep training through the optimizer). ``freeze_after=0`` never observes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..affine import compute_qparams, group_view
from ..qmodules import QuantizedWeightMixin
from ..quantizer import FakeQuantizer
from .distributed import DistContext


def weight_modules(model: nn.Module) -> dict[str, QuantizedWeightMixin]:
    """Module name -> weight-quantized module."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedWeightMixin)}


def activation_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Module name -> every FakeQuantizer of ``model`` that is not a weight quantizer."""
    weight_quantizers = {id(m.weight_quantizer) for m in weight_modules(model).values()}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, FakeQuantizer) and id(m) not in weight_quantizers}


def _observable(quantizer: FakeQuantizer) -> bool:
    spec = quantizer.spec
    return spec.enabled and not spec.is_float and quantizer.has_encoding


class ObserverTracker:
    """Re-estimates the encodings of ``model`` (mutated) until step ``freeze_after``; see the module docstring."""

    def __init__(self, model: nn.Module, freeze_after: int, momentum: float, dist: DistContext | None = None) -> None:
        self.freeze_after = freeze_after
        self.momentum = momentum
        self.dist = dist or DistContext()
        self.activations = {n: q for n, q in activation_quantizers(model).items() if _observable(q)}
        self.weights = weight_modules(model)
        self.running: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []
        self.step = 0

    @property
    def observing(self) -> bool:
        return self.step < self.freeze_after

    def attach(self, step: int) -> None:
        """Start observing at global step ``step`` (hooks only while ``step < freeze_after``)."""
        self.step = step
        if self.observing and not self._handles:
            for name, quantizer in self.activations.items():
                self._handles.append(quantizer.register_forward_pre_hook(self._hook(name)))

    def detach(self) -> None:
        """Remove the hooks (encodings stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def observe(quantizer: FakeQuantizer, args: tuple) -> None:
            if quantizer.training and not quantizer.calibrating and self.observing:
                self._update(name, quantizer, args[0])
        return observe

    @torch.no_grad()
    def _update(self, name: str, quantizer: FakeQuantizer, x: torch.Tensor) -> None:
        grouped = group_view(x.detach().float(), quantizer.spec)
        batch_min, batch_max = grouped.amin(dim=1), grouped.amax(dim=1)
        self.dist.all_reduce(batch_min, "min")
        self.dist.all_reduce(batch_max, "max")
        if name not in self.running:
            low, high = quantizer.representable_range()
            self.running[name] = (low.detach().clone().reshape(-1), high.detach().clone().reshape(-1))
        low, high = self.running[name]
        m = self.momentum
        low, high = m * low + (1 - m) * batch_min, m * high + (1 - m) * batch_max
        self.running[name] = (low, high)
        quantizer.set_qparams(*compute_qparams(low, high, quantizer.spec))

    def after_step(self, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based): recalibrate weights, freeze at the limit."""
        if self.observing:
            for module in self.weights.values():
                module.calibrate_weight()
        self.step = step
        if not self.observing:
            self.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"running": {n: (lo.clone(), hi.clone()) for n, (lo, hi) in self.running.items()}, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running = {n: (lo.clone(), hi.clone()) for n, (lo, hi) in state["running"].items()}
        self.step = int(state["step"])
