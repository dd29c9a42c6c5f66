"""Weight sparsity masks: unstructured magnitude, N:M structured (2:4) and output-channel sparsity.

* ``magnitude``: zero the ``round(sparsity * numel)`` smallest-magnitude weights of a layer (Zhu &
  Gupta, "To prune, or not to prune", 2017; TFMOT ``prune_low_magnitude``).
* ``n_m``: in every group of ``m`` consecutive weights along the input-channel axis (axis 1 of a
  conv/linear weight, at each output channel and kernel position), keep the ``n`` largest
  magnitudes (NVIDIA's 2:4 structured sparsity, Mishra et al., "Accelerating Sparse Deep Neural
  Networks", 2021). A last group shorter than ``m`` also keeps at most ``n``.
* ``channel``: zero the ``round(sparsity * out_channels)`` output channels with the smallest L2
  norm (the channels stay in the tensor; channel pruning removes them instead).

Masks are boolean tensors shaped like the weight, True where the weight is kept. Ties are broken by
position (stable sort), so masks are deterministic. :func:`sparsify` applies a method to the
matching layers of a model; :func:`quantlib.compress.preserve.structure_preserver` then keeps the
zeros through fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import weight_layers
from .spaces import matches

SPARSITY_METHODS = ("magnitude", "n_m", "channel")


def _check_fraction(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1); it is the share of weights set to zero")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``round(sparsity * numel)`` smallest ``|weight|`` entries."""
    _check_fraction(sparsity)
    flat = weight.detach().abs().reshape(-1)
    drop = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        keep[torch.sort(flat, stable=True).indices[:drop]] = False
    return keep.view(weight.shape)


def n_m_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest ``|weight|`` of every ``m`` consecutive input channels (axis 1)."""
    if not 1 <= n < m:
        raise ValueError(f"n={n}, m={m}: need 1 <= n < m (2:4 is n=2, m=4)")
    if weight.dim() < 2:
        raise ValueError(f"n:m sparsity needs a weight with an input-channel axis; got shape {tuple(weight.shape)}")
    w = weight.detach().abs().movedim(1, -1)  # [..., in]
    channels = w.shape[-1]
    pad = (-channels) % m
    padded = torch.cat([w, w.new_full((*w.shape[:-1], pad), -1.0)], -1) if pad else w  # -1 < any |w|: never kept first
    groups = padded.reshape(*padded.shape[:-1], -1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    keep = keep.reshape(padded.shape)[..., :channels]
    return keep.movedim(-1, 1).contiguous()


def channel_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``round(sparsity * out_channels)`` output channels (axis 0) with the smallest L2 norm."""
    _check_fraction(sparsity)
    norms = weight.detach().reshape(weight.shape[0], -1).norm(dim=1)
    drop = round(sparsity * weight.shape[0])
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    if drop:
        keep[torch.sort(norms, stable=True).indices[:drop]] = False
    return keep.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).contiguous()


def sparsity_mask(weight: torch.Tensor, method: str, *, sparsity: float = 0.5, n: int = 2, m: int = 4) -> torch.Tensor:
    """The mask of ``method`` (``magnitude``, ``n_m`` or ``channel``) for ``weight``."""
    if method == "magnitude":
        return magnitude_mask(weight, sparsity)
    if method == "n_m":
        return n_m_mask(weight, n, m)
    if method == "channel":
        return channel_mask(weight, sparsity)
    raise ValueError(f"sparsity method {method!r} is not supported; use one of {', '.join(SPARSITY_METHODS)}")


def sparsity_layers(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The conv/linear layers of ``model`` whose names match ``include`` and not ``exclude`` globs."""
    return {name: module for name, module in weight_layers(model).items() if matches(name, include, exclude)}


@torch.no_grad()
def sparsify(model: nn.Module, method: str, *, sparsity: float = 0.5, n: int = 2, m: int = 4,
             include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> dict[str, float]:
    """Zero weights of the matching layers of ``model`` (mutated) by ``method``; returns layer -> sparsity reached."""
    reached = {}
    for name, module in sparsity_layers(model, include, exclude).items():
        mask = sparsity_mask(module.weight, method, sparsity=sparsity, n=n, m=m)
        module.weight.mul_(mask.to(module.weight.dtype))
        reached[name] = float((module.weight == 0).sum()) / module.weight.numel()
    return reached
