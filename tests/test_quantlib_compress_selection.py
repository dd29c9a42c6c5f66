"""Greedy per-layer ratio selection (AIMET GreedySelection) and manual ratios, on a priced toy space and on a real model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlib.compress.cost import total_cost
from quantlib.compress.prepare import prepare_for_compression
from quantlib.compress.selection import SelectionError, greedy_selection, manual_selection, select_from_table
from quantlib.compress.spaces import SvdSpace


class _Space:
    """Three layers of 100 MACs each; a layer at ratio r costs 100 * r."""

    costs = {"a": 100, "b": 100, "c": 100}

    def layers(self):
        return list(self.costs)

    def cost(self, ratios):
        return round(sum(v * ratios.get(k, 1.0) for k, v in self.costs.items()))

    def apply(self, ratios):
        raise AssertionError("select_from_table must price ratios without building models")


TABLE = {"a": {0.5: 90.0, 0.75: 99.0}, "b": {0.5: 99.0, 0.75: 99.5}, "c": {0.5: 80.0, 0.75: 97.0}}


def test_highest_threshold_that_meets_the_target_wins():
    selection = select_from_table(_Space(), TABLE, 0.85)
    # threshold 99.5 (b:0.75, cost 275) misses 255; at 99 one more 25-MAC step is enough
    assert selection.threshold == 99.0 and selection.cost == 250
    assert all(TABLE[layer][ratio] >= 99.0 for layer, ratio in selection.ratios.items())
    selection = select_from_table(_Space(), TABLE, 0.7)
    # threshold 99 gives a:0.75, b:0.5 (cost 225 > 210); 97 adds c:0.75 (cost 200)
    assert selection.ratios == {"a": 0.75, "b": 0.5, "c": 0.75} and selection.threshold == 97.0
    assert selection.cost_ratio == pytest.approx(200 / 300)


def test_ties_move_only_as_many_layers_as_the_budget_needs():
    tied = {"a": {0.5: 99.0}, "b": {0.5: 99.0}, "c": {0.5: 99.0}}
    selection = select_from_table(_Space(), tied, 0.85)
    assert len(selection.ratios) == 1 and selection.cost == 250


def test_unreachable_target_names_the_reachable_share():
    with pytest.raises(SelectionError, match=r"target=0.3 cannot be met: .* keeps 0.500 of the cost"):
        select_from_table(_Space(), TABLE, 0.3)


def test_manual_ratios_are_checked():
    assert manual_selection(_Space(), {"a": 0.5, "b": 1.0}).ratios == {"a": 0.5}
    with pytest.raises(SelectionError, match="layer 'z' cannot be compressed"):
        manual_selection(_Space(), {"z": 0.5})
    with pytest.raises(SelectionError, match="ratio 1.5 for layer 'a' must be in"):
        manual_selection(_Space(), {"a": 1.5})


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_greedy_selection_meets_the_mac_target_on_a_real_model():
    torch.manual_seed(0)
    net = _Mlp().eval()
    x = torch.randn(256, 32)
    with torch.no_grad():
        labels = net(x).argmax(1)

    def agreement(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == labels).float().mean() * 100)

    model = prepare_for_compression(net, x[:1])
    space = SvdSpace(model, "weight_svd", x[:1])
    selection = greedy_selection(space, agreement, 0.7, [0.25, 0.5, 0.75], baseline_model=model, progress=False)
    compressed = space.apply(selection.ratios)
    measured = total_cost(compressed, x[:1])["macs"] / total_cost(model, x[:1])["macs"]
    assert measured == pytest.approx(selection.cost_ratio) and measured <= 0.7
    assert selection.baseline_score == 100.0 and set(selection.table) == {"fc1", "fc2", "fc3"}
    assert all(set(row) == {0.25, 0.5, 0.75} for row in selection.table.values())
    chosen = {layer: selection.table[layer][ratio] for layer, ratio in selection.ratios.items()}
    assert all(score >= selection.threshold for score in chosen.values())
