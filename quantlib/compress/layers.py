"""Which modules the compression passes act on, found by qualified name.

Conv (1d/2d/3d, grouped and depthwise included), ConvTranspose and Linear modules, including
QuantSim's weight-quantized subclasses of them, so the same names address an FP32 model and the
QuantSim built from it (``sim.model`` keeps the FP32 module paths).
"""

from __future__ import annotations

from torch import nn

WEIGHT_LAYER_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear,
)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> conv/linear module of ``model`` (not mutated), in ``named_modules`` order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, WEIGHT_LAYER_TYPES)}


def layer_by_name(model: nn.Module, name: str) -> nn.Module:
    """The conv/linear module at ``name``; KeyError naming the layer when it is missing or of another type."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"layer {name!r} is not in {type(model).__name__}; the hook was recorded on another model") from None
    if not isinstance(module, WEIGHT_LAYER_TYPES):
        raise KeyError(f"layer {name!r} is a {type(module).__name__}, not a conv/linear; the hook was recorded on another model")
    return module
