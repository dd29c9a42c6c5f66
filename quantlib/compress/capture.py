"""Read one layer's input or output on calibration data, stopping the forward pass right after it.

Channel pruning needs a consumer layer's input in the compressed model and its output in the
original model, batch by batch; running the rest of the network would be wasted work, so the hook
raises :class:`_Captured` once it has the tensor and the caller catches it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Captured(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


def batch_inputs(batch: Any) -> torch.Tensor:
    """The input tensor of a batch that is a tensor or an ``(input, label, ...)`` pair."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def layer_tensor(model: nn.Module, layer: str, inputs: torch.Tensor, *, which: str) -> torch.Tensor:
    """``layer``'s input (``which="input"``, its first argument) or output (``"output"``) when ``model`` (eval mode) runs ``inputs``."""
    if which not in ("input", "output"):
        raise ValueError(f"which={which!r} is not valid; use 'input' or 'output'")
    module = model.get_submodule(layer)

    def hook(mod, args, output=None):
        raise _Captured((args[0] if which == "input" else output).detach())

    handle = (module.register_forward_pre_hook(hook) if which == "input" else module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        model(inputs.to(device))
    except _Captured as captured:
        return captured.value
    finally:
        handle.remove()
    raise RuntimeError(f"layer {layer!r} was not called in the forward pass; it cannot be pruned or re-fit")

