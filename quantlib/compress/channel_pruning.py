"""Channel pruning with least-squares re-fit of the next layer (He et al. 2017; AIMET ``ChannelPruning``).

For each :class:`~quantlib.compress.channel_units.ChannelUnit` given a keep ratio, in graph order:

1. rank the unit's channels by importance on calibration data:
   ``contribution``: ``||W_consumer[:, c]|| * rms(x_c)``, the size of channel c's share of the
   consumer's output (He et al., "Channel Pruning for Accelerating Very Deep Neural Networks",
   ICCV 2017, use the same reconstruction view); ``l1``: the L1 norm of the producer's filter c
   (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017; needs no data);
2. keep the ``max(1, round(ratio * C))`` most important channels (rounded up to ``multiple_of``):
   slice the producer's output channels, the depthwise convs/BatchNorms in between, and the
   consumer's input channels;
3. re-fit the consumer's weight and bias by least squares so that, on calibration data, its output
   computed from the *compressed* model's input matches the *original* model's output (AIMET's
   weight reconstruction, :func:`quantlib.compress.refit.refit_layer`).

Mutates the traced model (:func:`quantlib.compress.prepare.prepare_for_compression`) it is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..batchnorm_fold import set_submodule
from .capture import batch_inputs, layer_tensor
from .channel_units import ChannelUnit
from .refit import RefitConfig, refit_layer

IMPORTANCE_CRITERIA = ("contribution", "l1")


@dataclass(frozen=True)
class ChannelPruningConfig:
    """How channels are chosen and how the consumer is re-fit (see the module docstring).

    ``num_batches``: calibration batches used for importance and re-fit (None: all).
    """

    importance: str = "contribution"
    refit: bool = True
    multiple_of: int = 1
    positions_per_image: int = 16
    ridge: float = 1e-3
    num_batches: int | None = None
    seed: int = 0

    def refit_config(self) -> RefitConfig:
        return RefitConfig(self.positions_per_image, self.ridge, self.num_batches, self.seed)

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_CRITERIA:
            raise ValueError(f"importance={self.importance!r} is not supported; use one of {', '.join(IMPORTANCE_CRITERIA)}")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of={self.multiple_of} must be >= 1")
        self.refit_config()  # validates positions_per_image and ridge


def kept_channels(channels: int, ratio: float, multiple_of: int = 1) -> int:
    """How many of ``channels`` a keep ``ratio`` in (0, 1] keeps: ``round(ratio * channels)`` up to ``multiple_of``, >= 1."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio} must be in (0, 1]; it is the share of channels kept")
    count = max(1, round(ratio * channels))
    return min(channels, math.ceil(count / multiple_of) * multiple_of)


def _batches(data: Iterable, num_batches: int | None):
    for index, batch in enumerate(data):
        if num_batches is not None and index >= num_batches:
            return
        yield batch_inputs(batch)


def _consumer_weight_by_input(consumer: nn.Module) -> torch.Tensor:
    """[C_in, rest]: the consumer's weights grouped by input channel."""
    w = consumer.weight.detach()
    return w.transpose(0, 1).reshape(w.shape[1], -1)


@torch.no_grad()
def channel_importance(gm: fx.GraphModule, unit: ChannelUnit, data: Iterable, config: ChannelPruningConfig) -> torch.Tensor:
    """Importance of each of ``unit.channels`` channels (higher: keep), by ``config.importance``."""
    if config.importance == "l1":
        w = gm.get_submodule(unit.producer).weight.detach()
        return w.abs().reshape(w.shape[0], -1).sum(1)
    squares = torch.zeros(unit.channels, dtype=torch.float64)
    count = 0
    for inputs in _batches(data, config.num_batches):
        x = layer_tensor(gm, unit.consumer, inputs, which="input").to(torch.float64)
        x = x.transpose(0, 1).reshape(unit.channels, -1)
        squares += x.pow(2).sum(1).cpu()
        count += x.shape[1]
    if count == 0:
        raise ValueError("calibration data is empty; channel importance needs at least one batch")
    rms = (squares / count).sqrt()
    return _consumer_weight_by_input(gm.get_submodule(unit.consumer)).cpu().to(torch.float64).norm(dim=1) * rms


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous())


def _slice_out(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a conv/linear/BatchNorm/depthwise conv keeping output channels ``keep``."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = type(module)(len(keep), eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=module.track_running_stats)
        new.load_state_dict({k: (v[keep] if v.dim() == 1 else v) for k, v in module.state_dict().items()})
        return new.to(module.weight.device if module.affine else module.running_mean.device).train(module.training)
    device = module.weight.device
    if isinstance(module, nn.Linear):
        new = nn.Linear(module.in_features, len(keep), bias=module.bias is not None)
    else:
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        new = nn.Conv2d(len(keep) if depthwise else module.in_channels, len(keep), module.kernel_size,
                        stride=module.stride, padding=module.padding, dilation=module.dilation,
                        groups=len(keep) if depthwise else 1, bias=module.bias is not None, padding_mode=module.padding_mode)
    new.weight = _param(module.weight[keep])
    if module.bias is not None:
        new.bias = _param(module.bias[keep])
    return new.to(device).train(module.training)


def _slice_in(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of an ungrouped conv/linear keeping input channels ``keep``."""
    if isinstance(module, nn.Linear):
        new = nn.Linear(len(keep), module.out_features, bias=module.bias is not None)
    else:
        new = nn.Conv2d(len(keep), module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
                        dilation=module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode)
    new.weight = _param(module.weight[:, keep])
    if module.bias is not None:
        new.bias = _param(module.bias)
    return new.to(module.weight.device).train(module.training)


def prune_unit(gm: fx.GraphModule, unit: ChannelUnit, keep: torch.Tensor) -> None:
    """Slice ``unit``'s modules in ``gm`` (mutated) to the sorted channel indices ``keep``; no re-fit."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    for name in (unit.producer, *unit.between):
        set_submodule(gm, name, _slice_out(gm.get_submodule(name), keep.to(gm.get_submodule(name).weight.device)))
    consumer = gm.get_submodule(unit.consumer)
    set_submodule(gm, unit.consumer, _slice_in(consumer, keep.to(consumer.weight.device)))


def prune_channels(gm: fx.GraphModule, original: nn.Module, units: list[ChannelUnit], ratios: Mapping[str, float],
                   data: Iterable, config: ChannelPruningConfig = ChannelPruningConfig()) -> dict[str, dict]:
    """Prune every unit named in ``ratios`` (unit name -> keep ratio) in ``gm`` (mutated), in ``units`` order.

    ``original``: the unpruned model (not mutated) the re-fit matches. ``data``: a re-iterable of
    calibration batches. Returns unit name -> ``{"channels", "kept", "ratio", "producer", ...fit stats}``.
    A name in ``ratios`` that is no unit raises KeyError listing the valid names.
    """
    by_name = {unit.name: unit for unit in units}
    unknown = sorted(set(ratios) - set(by_name))
    if unknown:
        raise KeyError(f"{unknown[0]!r} is not a prunable layer; prunable layers: {', '.join(by_name)}")
    report: dict[str, dict] = {}
    for unit in units:
        ratio = ratios.get(unit.name, 1.0)
        count = kept_channels(unit.channels, ratio, config.multiple_of)
        if count >= unit.channels:
            continue
        importance = channel_importance(gm, unit, data, config)
        keep = torch.topk(importance, count).indices
        prune_unit(gm, unit, keep)
        entry = {"producer": unit.producer, "channels": unit.channels, "kept": count, "ratio": ratio}
        if config.refit:
            entry.update(refit_layer(gm, original, unit.consumer, data, config.refit_config()))
        report[unit.name] = entry
    return report
