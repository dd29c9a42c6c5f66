"""Low-rank factorization of conv and linear layers by truncated SVD (AIMET weight SVD and spatial SVD).

* Weight SVD (Zhang et al., "Accelerating Very Deep Convolutional Networks for Classification and
  Detection", TPAMI 2016; AIMET ``WeightSvd``): a conv with weight ``W[n, m, h, w]`` is the product
  of a 1x1 conv ``A[k, m]`` (m -> k channels) and an hxw conv ``B[n, k, h, w]`` (k -> n, with the
  original stride, padding, dilation and bias), where ``B A`` is the rank-k truncated SVD of
  ``W`` reshaped to ``[(n h w), m]``. A Linear ``W[n, m]`` becomes Linear(m -> k) then Linear(k -> n).
* Spatial SVD (Jaderberg et al., "Speeding up Convolutional Neural Networks with Low Rank
  Expansions", BMVC 2014; AIMET ``SpatialSvd``, AMCT tensor decomposition): an hxw conv becomes an
  hx1 conv (m -> k, vertical stride/padding/dilation) then a 1xw conv (k -> n, horizontal ones and
  the bias), from the rank-k SVD of ``W`` reshaped to ``[(m h), (n w)]``. For a 1x1 kernel this is
  the same factorization as weight SVD.

At full rank (``min`` of the reshaped matrix's dimensions) both reproduce the layer's outputs up to
float rounding; zero padding stays exact because the first factor has no bias. Only ungrouped
``nn.Conv2d`` with integer padding and ``padding_mode="zeros"``, and ``nn.Linear``, are factorized
(:func:`svd_eligible`; exact types, since subclasses such as timm's ``Conv2dSame`` change the forward).
The factor weights are split as ``U sqrt(S)`` and ``sqrt(S) V^T``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SVD_METHODS = ("weight_svd", "spatial_svd")


class SvdError(ValueError):
    """A layer cannot be factorized as asked; the message names the layer type and the fix."""


def _check_method(method: str) -> None:
    if method not in SVD_METHODS:
        raise SvdError(f"method={method!r} is not an SVD method; use one of {', '.join(SVD_METHODS)}")


def svd_eligible(module: nn.Module, method: str) -> bool:
    """True when ``module`` can be factorized by ``method`` (``weight_svd`` or ``spatial_svd``)."""
    _check_method(method)
    if type(module) is nn.Linear:  # exact types: subclasses (e.g. timm's Conv2dSame) change the forward
        return method == "weight_svd"
    return type(module) is nn.Conv2d and module.groups == 1 and not isinstance(module.padding, str) \
        and module.padding_mode == "zeros"


def _matrix(module: nn.Module, method: str) -> torch.Tensor:
    w = module.weight.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        return w  # [n, m]
    n, m, h, kw = w.shape
    if method == "weight_svd":
        return w.permute(0, 2, 3, 1).reshape(n * h * kw, m)  # rows (n, h, w), columns m
    return w.permute(1, 2, 0, 3).reshape(m * h, n * kw)  # rows (m, h), columns (n, w)


def full_rank(module: nn.Module, method: str) -> int:
    """The rank at which ``method`` reproduces ``module`` exactly: min of the reshaped weight's dimensions."""
    if not svd_eligible(module, method):
        raise SvdError(f"{type(module).__name__} cannot be factorized by {method}; only ungrouped Conv2d with integer "
                       "zero padding (and Linear for weight_svd) can")
    rows, cols = _matrix(module, method).shape
    return min(rows, cols)


def _split(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left [rows, rank], right [rank, cols]) with left @ right the rank-``rank`` truncated SVD."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _bias_copy(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().clone()


def _like(tensor: torch.Tensor, reference: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.to(dtype=reference.dtype, device=reference.device).contiguous())


def factorize(module: nn.Module, method: str, rank: int) -> nn.Sequential:
    """A new ``nn.Sequential(first, second)`` computing the rank-``rank`` factorization of ``module`` (not mutated).

    ``rank`` must be in ``1..full_rank(module, method)``; SvdError otherwise.
    """
    top = full_rank(module, method)
    if not 1 <= rank <= top:
        raise SvdError(f"rank={rank} is out of range for this layer; use 1..{top}")
    left, right = _split(_matrix(module, method), rank)
    weight, bias = module.weight, _bias_copy(module)
    if isinstance(module, nn.Linear):
        n, m = weight.shape
        first, second = nn.Linear(m, rank, bias=False), nn.Linear(rank, n, bias=bias is not None)
        first.weight, second.weight = _like(right, weight), _like(left, weight)
    elif method == "weight_svd":
        n, m, h, kw = weight.shape
        first = nn.Conv2d(m, rank, 1, bias=False)
        second = nn.Conv2d(rank, n, (h, kw), stride=module.stride, padding=module.padding,
                           dilation=module.dilation, bias=bias is not None)
        first.weight = _like(right.reshape(rank, m, 1, 1), weight)
        second.weight = _like(left.reshape(n, h, kw, rank).permute(0, 3, 1, 2), weight)
    else:
        n, m, h, kw = weight.shape
        first = nn.Conv2d(m, rank, (h, 1), stride=(module.stride[0], 1), padding=(module.padding[0], 0),
                          dilation=(module.dilation[0], 1), bias=False)
        second = nn.Conv2d(rank, n, (1, kw), stride=(1, module.stride[1]), padding=(0, module.padding[1]),
                           dilation=(1, module.dilation[1]), bias=bias is not None)
        first.weight = _like(left.reshape(m, h, rank).permute(2, 0, 1).unsqueeze(-1), weight)
        second.weight = _like(right.reshape(rank, n, kw).permute(1, 0, 2).unsqueeze(2), weight)
    if bias is not None:
        second.bias = _like(bias, weight)
    return nn.Sequential(first, second).train(module.training)


def cost_per_rank(module: nn.Module, method: str, input_shape: tuple[int, ...],
                  output_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, weight parameters) that one unit of rank costs in the factorized layer (both are linear in rank).

    ``input_shape``/``output_shape``: the layer's input and output shapes in one forward pass (batch
    included, as in :class:`quantlib.compress.cost.FloatLayerCost`).
    """
    full_rank(module, method)
    weight = module.weight
    if isinstance(module, nn.Linear):
        n, m = weight.shape
        rows = math.prod(output_shape[:-1])
        return rows * (m + n), m + n
    n, m, h, kw = weight.shape
    batch, _, in_h, in_w = input_shape
    _, _, out_h, out_w = output_shape
    if method == "weight_svd":
        return batch * (in_h * in_w * m + out_h * out_w * n * h * kw), m + n * h * kw
    return batch * out_h * (in_w * m * h + out_w * n * kw), m * h + n * kw


def rank_for_ratio(module: nn.Module, method: str, ratio: float, base_cost: int, cost_of_rank: int) -> int:
    """The largest rank whose cost is at most ``ratio * base_cost`` (at least 1, at most full rank)."""
    if not 0 < ratio <= 1:
        raise SvdError(f"ratio={ratio} must be in (0, 1]; it is the share of the layer's cost that is kept")
    return max(1, min(full_rank(module, method), math.floor(ratio * base_cost / cost_of_rank)))
