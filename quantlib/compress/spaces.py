"""Compression spaces for :mod:`quantlib.compress.selection`: SVD factorization and channel pruning.

A space holds a traced float model (:func:`quantlib.compress.prepare.prepare_for_compression`,
never mutated), the layers a method may compress (filtered by ``fnmatch`` globs on module names)
and a cost model: the model's MACs or parameters as a function of per-layer ratios, computed from
the per-layer costs :func:`quantlib.compress.cost.layer_costs` measured once, so the greedy search
never builds a model to price it. ``apply`` builds the compressed copy.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from ..batchnorm_fold import set_submodule
from .channel_pruning import ChannelPruningConfig, kept_channels, prune_channels
from .channel_units import ChannelUnit, find_channel_units
from .cost import layer_costs
from .refit import RefitConfig, low_rank_eligible, refit_layer, refit_low_rank
from .layers import weight_layers
from .svd import cost_per_rank, factorize, full_rank, rank_for_ratio, svd_eligible

COST_METRICS = ("macs", "params")
REFIT_FACTORS = ("second", "both")


def _check_metric(metric: str) -> None:
    if metric not in COST_METRICS:
        raise ValueError(f"metric={metric!r} is not supported; use one of {', '.join(COST_METRICS)}")


def matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """True when ``name`` matches an ``include`` glob and no ``exclude`` glob."""
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class SvdSpace:
    """Weight SVD or spatial SVD (:mod:`quantlib.compress.svd`) of the eligible layers of ``model``.

    A layer's ratio is the share of its cost (``metric``) kept; its rank is the largest whose
    factorized cost fits. A ratio at which even rank 1 costs as much as the layer leaves it as it is.
    """

    def __init__(self, model: fx.GraphModule, method: str, example_input: torch.Tensor, *, metric: str = "macs",
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> None:
        _check_metric(metric)
        self.model, self.method, self.metric = model, method, metric
        self.costs = layer_costs(model, example_input)
        modules = weight_layers(model)
        self._layers = [name for name, module in modules.items()
                        if svd_eligible(module, method) and self.costs[name].macs > 0 and matches(name, include, exclude)]
        self._modules = modules
        self._base = sum(c.macs for c in self.costs.values()) if metric == "macs" else _model_params(model)

    def layers(self) -> list[str]:
        return list(self._layers)

    def _layer_base(self, name: str) -> int:
        cost = self.costs[name]
        return cost.macs if self.metric == "macs" else self._modules[name].weight.numel()

    def _per_rank(self, name: str) -> int:
        cost = self.costs[name]
        macs, params = cost_per_rank(self._modules[name], self.method, cost.input_shape, cost.output_shape)
        return macs if self.metric == "macs" else params

    def rank(self, name: str, ratio: float) -> int | None:
        """The rank ``name`` gets at ``ratio``, or None when factorizing would not lower its cost."""
        base, per_rank = self._layer_base(name), self._per_rank(name)
        rank = rank_for_ratio(self._modules[name], self.method, ratio, base, per_rank)
        return rank if rank * per_rank < base else None

    def _check(self, ratios: Mapping[str, float]) -> None:
        unknown = sorted(set(ratios) - set(self._layers))
        if unknown:
            raise KeyError(f"{unknown[0]!r} cannot be factorized by {self.method}; eligible layers: {', '.join(self._layers)}")

    def cost(self, ratios: Mapping[str, float]) -> int:
        self._check(ratios)
        saved = 0
        for name, ratio in ratios.items():
            rank = self.rank(name, ratio)
            if rank is not None:
                saved += self._layer_base(name) - rank * self._per_rank(name)
        return self._base - saved

    def apply(self, ratios: Mapping[str, float]) -> nn.Module:
        self._check(ratios)
        model = copy.deepcopy(self.model)
        for name, ratio in ratios.items():
            rank = self.rank(name, ratio)
            if rank is not None:
                set_submodule(model, name, factorize(self._modules[name], self.method, rank))
        return model

    def refit(self, model: nn.Module, ratios: Mapping[str, float], data: Iterable,
              config: RefitConfig = RefitConfig(), *, factors: str = "second") -> dict[str, dict]:
        """Least-squares re-fit of every factorized layer of ``model`` (an :meth:`apply` result, mutated).

        ``factors="second"`` re-fits the second factor given the first (:func:`~quantlib.compress.refit.refit_layer`);
        ``"both"`` re-fits both factors by reduced-rank regression (:func:`~quantlib.compress.refit.refit_low_rank`)
        where the layer allows it (Linear, 1x1 conv) and the second factor elsewhere. In graph order,
        so each fit sees the error of the layers before it; targets are the uncompressed layers'
        outputs in the space's model. Returns layer -> fit statistics (with ``factors`` re-fit).
        """
        if factors not in REFIT_FACTORS:
            raise ValueError(f"factors={factors!r} is not supported; use one of {', '.join(REFIT_FACTORS)}")
        report = {}
        for name in self._layers:
            if name in ratios and self.rank(name, ratios[name]) is not None:
                if factors == "both" and low_rank_eligible(self._modules[name]):
                    report[name] = {**refit_low_rank(model, self.model, name, data, config), "factors": "both"}
                else:
                    report[name] = {**refit_layer(model, self.model, f"{name}.1", data, config, target_name=name),
                                    "factors": "second"}
        return report

    def describe(self, ratios: Mapping[str, float]) -> dict[str, dict]:
        """Per compressed layer: ratio, rank, full rank and the layer's cost before and after."""
        out = {}
        for name, ratio in ratios.items():
            rank = self.rank(name, ratio)
            if rank is not None:
                out[name] = {"ratio": ratio, "rank": rank, "full_rank": full_rank(self._modules[name], self.method),
                             f"{self.metric}_before": self._layer_base(name),
                             f"{self.metric}_after": rank * self._per_rank(name)}
        return out


class ChannelPruningSpace:
    """Channel pruning (:mod:`quantlib.compress.channel_pruning`) of the prunable units of ``model``.

    A unit's ratio is the share of its channels kept. ``data`` (a re-iterable of calibration
    batches) drives the importance and the least-squares re-fit. Units are selected by globs on
    their name (the consumer layer).
    """

    def __init__(self, model: fx.GraphModule, example_input: torch.Tensor, data: Iterable,
                 config: ChannelPruningConfig = ChannelPruningConfig(), *, metric: str = "macs",
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> None:
        _check_metric(metric)
        self.model, self.data, self.config, self.metric = model, data, config, metric
        self.costs = layer_costs(model, example_input)
        self.units: list[ChannelUnit] = [u for u in find_channel_units(model) if matches(u.name, include, exclude)]
        self._modules = weight_layers(model)
        self._base = self.cost({})
        self.last_report: dict[str, dict] = {}

    def layers(self) -> list[str]:
        return [u.name for u in self.units]

    def _fractions(self, ratios: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        by_name = {u.name: u for u in self.units}
        unknown = sorted(set(ratios) - set(by_name))
        if unknown:
            raise KeyError(f"{unknown[0]!r} is not a prunable layer; prunable layers: {', '.join(by_name)}")
        out_frac: dict[str, float] = {}
        in_frac: dict[str, float] = {}
        for name, ratio in ratios.items():
            unit = by_name[name]
            kept = kept_channels(unit.channels, ratio, self.config.multiple_of) / unit.channels
            for layer in (unit.producer, *unit.between):
                out_frac[layer] = out_frac.get(layer, 1.0) * kept
            in_frac[unit.consumer] = in_frac.get(unit.consumer, 1.0) * kept
        return out_frac, in_frac

    def cost(self, ratios: Mapping[str, float]) -> int:
        out_frac, in_frac = self._fractions(ratios)
        total = 0.0
        for name, module in self._modules.items():
            scale = out_frac.get(name, 1.0) * in_frac.get(name, 1.0)
            if self.metric == "macs":
                total += self.costs[name].macs * scale
            else:
                bias = module.bias.numel() if module.bias is not None else 0
                total += module.weight.numel() * scale + bias * out_frac.get(name, 1.0)
        if self.metric == "params":
            total += _model_params(self.model) - sum(c.params for c in self.costs.values())
        return round(total)

    def apply(self, ratios: Mapping[str, float]) -> nn.Module:
        model = copy.deepcopy(self.model)
        self.last_report = prune_channels(model, self.model, self.units, ratios, self.data, self.config)
        return model
