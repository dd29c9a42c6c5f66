"""MACs and parameters of every conv/linear call of a float model, measured with forward hooks.

:mod:`quantlib.cost` counts a QuantSim's graph; compression works on float models that change
shape (SVD splits a layer in two, pruning narrows it), so this counter runs one forward pass on an
example input with hooks on every Conv/ConvTranspose/Linear and reads the real shapes. A module
called twice is counted twice. Counts are per forward pass on ``example_input``: give a one-sample
input for the cost per inference. The model is run in eval mode under ``torch.no_grad`` and its
training flag is restored; nothing else is mutated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import weight_layers


@dataclass(frozen=True)
class FloatLayerCost:
    """One conv/linear module: ``macs`` per forward pass (all its calls), ``params`` (weight + bias), and the
    input and output shapes of its first call (``()`` when the pass does not reach it)."""

    name: str
    macs: int
    params: int
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()


def _macs(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    weight = module.weight
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        # weight [in, out/groups, *k]: each input element is scattered into out/groups * prod(k) outputs
        return inputs.numel() * math.prod(weight.shape[1:])
    # Conv: weight [out, in/groups, *k]; Linear: [out, in]: each output element sums prod(weight.shape[1:]) products
    return output.numel() * math.prod(weight.shape[1:])


def _params(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return module.weight.numel() + (bias.numel() if bias is not None else 0)


def layer_costs(model: nn.Module, example_input: torch.Tensor) -> dict[str, FloatLayerCost]:
    """Qualified name -> :class:`FloatLayerCost` of every conv/linear module of ``model``.

    Modules the forward pass does not reach get ``macs=0``. ``example_input`` is moved to the
    model's device.
    """
    layers = weight_layers(model)
    macs = dict.fromkeys(layers, 0)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for name, module in layers.items():
        def hook(mod, args, output, name=name):
            macs[name] += _macs(mod, args[0], output)
            shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(example_input.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: FloatLayerCost(name, macs[name], _params(module), *shapes.get(name, ((), ())))
            for name, module in layers.items()}


def total_cost(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """``{"macs", "params"}`` summed over the conv/linear modules (``params`` counts every parameter of the model)."""
    costs = layer_costs(model, example_input)
    return {"macs": sum(c.macs for c in costs.values()),
            "params": sum(p.numel() for p in model.parameters())}
