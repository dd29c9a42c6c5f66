"""Channel pruning: unit discovery, least-squares re-fit beating plain pruning, cost model equal to measured MACs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantlib.compress.channel_pruning import ChannelPruningConfig, kept_channels, prune_channels
from quantlib.compress.channel_units import find_channel_units
from quantlib.compress.cost import total_cost
from quantlib.compress.prepare import prepare_for_compression
from quantlib.compress.spaces import ChannelPruningSpace


class _Blocks(nn.Module):
    """conv -> BN -> ReLU -> conv (unit); inverted residual with a depthwise conv (unit); residual add (no unit)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 48, 1)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.project = nn.Conv2d(48, 16, 1)
        self.head = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
        x = torch.relu(self.head(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    net = _Blocks()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    example = torch.randn(1, 3, 12, 12)
    model = prepare_for_compression(net.eval(), example)
    calibration = [torch.randn(32, 3, 12, 12) for _ in range(4)]
    held_out = torch.randn(64, 3, 12, 12)
    return model, example, calibration, held_out


def test_units_follow_channelwise_chains_and_skip_residual_outputs():
    model, *_ = _model_and_data()
    units = {u.name: u for u in find_channel_units(model)}
    assert set(units) == {"project", "fc"}
    assert units["project"].producer == "expand" and units["project"].between == ("dw",)
    assert units["fc"].producer == "head" and units["fc"].channels == 32
    # stem feeds a residual add and project's output joins it: neither is a producer
    assert all(u.producer not in ("stem", "project") for u in units.values())


def _layer_error(model, original, name, x):
    captured = {}

    def grab(key):
        return lambda mod, args, out: captured.__setitem__(key, out)

    h1 = model.get_submodule(name).register_forward_hook(grab("pruned"))
    h2 = original.get_submodule(name).register_forward_hook(grab("original"))
    with torch.no_grad():
        model(x), original(x)
    h1.remove(), h2.remove()
    return float((captured["pruned"] - captured["original"]).norm() / captured["original"].norm())


@pytest.mark.parametrize("importance", ["contribution", "l1"])
def test_least_squares_refit_beats_plain_pruning_on_layer_output_error(importance):
    model, _, calibration, held_out = _model_and_data()
    units = find_channel_units(model)
    errors = {}
    for refit in (False, True):
        pruned = copy.deepcopy(model)
        config = ChannelPruningConfig(importance=importance, refit=refit)
        report = prune_channels(pruned, model, units, {"project": 0.5, "fc": 0.5}, calibration, config)
        assert report["project"]["kept"] == 24 and pruned.get_submodule("dw").groups == 24
        errors[refit] = {name: _layer_error(pruned, model, name, held_out) for name in ("project", "fc")}
        if refit:
            assert report["project"]["relative_error_after"] < report["project"]["relative_error_before"]
    for name in ("project", "fc"):
        assert errors[True][name] < 0.8 * errors[False][name], (name, errors)


def test_cost_model_equals_measured_macs_and_params():
    model, example, calibration, _ = _model_and_data()
    ratios = {"project": 0.25, "fc": 0.5}
    for metric in ("macs", "params"):
        space = ChannelPruningSpace(model, example, calibration, metric=metric)
        pruned = space.apply(ratios)
        assert space.cost(ratios) == total_cost(pruned, example)[metric] < total_cost(model, example)[metric]
        assert space.cost({}) == total_cost(model, example)[metric]
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 12, 12)).shape == (2, 10)


def test_kept_channels_rounding_and_errors():
    assert kept_channels(48, 0.5) == 24 and kept_channels(48, 0.01) == 1 and kept_channels(48, 0.3, multiple_of=8) == 16
    with pytest.raises(ValueError, match="ratio=0 must be in"):
        kept_channels(48, 0)
    model, _, calibration, _ = _model_and_data()
    with pytest.raises(KeyError, match="'stem' is not a prunable layer"):
        prune_channels(copy.deepcopy(model), model, find_channel_units(model), {"stem": 0.5}, calibration)
