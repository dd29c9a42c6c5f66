"""Per-channel views of conv/linear weights, grouped and depthwise convolutions included.

A weight of a Conv1d/Conv2d is ``[out, in / groups, *kernel]`` and a Linear weight is
``[out, in]`` (one group). Output channel ``o`` is row ``o``. Input channel ``i`` belongs to group
``g = i // (in / groups)`` and is column ``i % (in / groups)`` of the rows of that group only; for a
depthwise conv (groups == in == out) input channel ``i`` is row ``i``. These helpers hide that
layout so cross-layer equalization, high-bias absorption and bias correction are written once.
"""

from __future__ import annotations

import torch


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[groups, out / groups, in / groups, prod(kernel)]`` view of a conv/linear weight."""
    out, in_per_group = weight.shape[0], weight.shape[1]
    if out % groups:
        raise ValueError(f"weight with {out} output channels cannot have groups={groups}")
    return weight.reshape(groups, out // groups, in_per_group, -1)


def in_channels(weight: torch.Tensor, groups: int) -> int:
    """Number of input channels of a conv/linear weight."""
    return weight.shape[1] * groups


def out_channel_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max |w| of every output channel (row), shape ``[out]``."""
    return weight.detach().abs().flatten(1).amax(dim=1)


def in_channel_absmax(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """max |w| over the weights that read each input channel, shape ``[in]``."""
    return _grouped(weight.detach().abs(), groups).amax(dim=(1, 3)).reshape(-1)


@torch.no_grad()
def scale_out_channels_(weight: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply output channel ``o`` of ``weight`` by ``factor[o]``, in place."""
    weight.mul_(factor.to(weight).reshape(-1, *([1] * (weight.dim() - 1))))


@torch.no_grad()
def scale_in_channels_(weight: torch.Tensor, groups: int, factor: torch.Tensor) -> None:
    """Multiply every weight that reads input channel ``i`` by ``factor[i]``, in place."""
    grouped = _grouped(weight, groups)
    scaled = grouped * factor.to(weight).reshape(groups, 1, -1, 1)
    weight.copy_(scaled.reshape(weight.shape))


def in_channel_response(weight: torch.Tensor, groups: int, per_channel: torch.Tensor) -> torch.Tensor:
    """Output of the layer (without bias) for an input that is constant per channel, ``[out]``.

    ``per_channel[i]`` is the value of input channel ``i`` at every position. Zero padding at the
    borders is ignored: this is the response in the interior of the feature map (DFQ, eq. 8).
    """
    grouped = _grouped(weight, groups).sum(dim=3)  # [g, out/g, in/g]
    values = per_channel.to(grouped).reshape(groups, -1)  # [g, in/g]
    return torch.einsum("goi,gi->go", grouped, values).reshape(-1)


def pair_precision(first_ranges: torch.Tensor, second_ranges: torch.Tensor) -> float:
    """DFQ's objective for a layer pair, ``mean_i p1_i * p2_i`` with ``p = range_i / max range`` (section 4.1).

    ``first_ranges`` are the output-channel ranges of the first layer, ``second_ranges`` the
    input-channel ranges of the second. CLE's scales maximize it; 1.0 means every channel of
    both layers uses the whole per-tensor grid.
    """
    top1, top2 = float(first_ranges.max()), float(second_ranges.max())
    if top1 <= 0 or top2 <= 0:
        return 0.0
    return float((first_ranges / top1 * second_ranges / top2).mean())


def precision(ranges: torch.Tensor) -> float:
    """Mean per-channel range relative to the largest one, in [0, 1] (DFQ, section 4.1).

    With a per-tensor grid a channel whose range is a fraction p of the tensor's range uses only a
    fraction p of the grid's levels; 1.0 means every channel uses the whole grid.
    """
    top = float(ranges.max()) if ranges.numel() else 0.0
    return float(ranges.mean()) / top if top > 0 else 0.0
