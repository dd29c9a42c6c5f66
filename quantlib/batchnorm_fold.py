"""Fold BatchNorm into the preceding conv/linear layer on an fx graph.

In eval mode BN is an affine map per channel, y = gamma * (x - mean) / sqrt(var + eps) + beta,
so it can be absorbed exactly into the weights and bias of the layer that feeds it (Jacob et al.
2018, section 3.2). Integer backends run the folded layer, so the simulation must quantize the
folded weights. timm's ``BatchNormAct2d`` (BN followed by an activation, one module) is folded
too: the module is replaced by its activation.
"""

from __future__ import annotations

import torch
from torch import fx, nn

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Absorb ``bn`` (its running statistics) into ``layer``'s weight and bias, in place."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} without running statistics cannot be folded")
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d))
    weight = layer.weight
    if transposed:
        groups = layer.groups
        w = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        w = w * factor.reshape(groups, 1, -1, *([1] * (weight.dim() - 2)))
        weight.copy_(w.reshape_as(weight))
    else:
        weight.mul_(factor.reshape(-1, *([1] * (weight.dim() - 1))))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def _activation_of(bn: nn.Module) -> nn.Module:
    """What remains of a BN(+activation) module after folding its BN part."""
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    if act is None:
        return nn.Identity()
    if drop is None or isinstance(drop, nn.Identity):
        return act
    return nn.Sequential(drop, act)


def fold_batch_norms(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Fold every BN whose input is a conv/linear used only by that BN. Mutates ``gm``.

    Returns the (layer, bn) module names that were folded. BNs that follow something else are
    left in place (they are quantized like any other op).
    """
    modules = dict(gm.named_modules())
    folded: list[tuple[str, str]] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _is_batchnorm(modules[node.target]):
            continue
        producer = node.args[0]
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            continue
        layer = modules[producer.target]
        if not isinstance(layer, _FOLDABLE) or len(producer.users) != 1:
            continue
        bn = modules[node.target]
        fold_bn_into(layer, bn)
        remainder = _activation_of(bn)
        if isinstance(remainder, nn.Identity):
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
            _delete_submodule(gm, node.target)
        else:
            set_submodule(gm, node.target, remainder)
        folded.append((producer.target, node.target))
    gm.graph.lint()
    gm.recompile()
    return folded


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``root`` with ``module``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _delete_submodule(root: nn.Module, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    delattr(parent, name)
