"""Clustering and the PQAT/CQAT/PCQAT structure preserver: exact sparsity and unique values through (Q)AT."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantlib.compress.clustering import cluster_tensor, cluster_weights
from quantlib.compress.preserve import structure_counts, structure_preserver
from quantlib.compress.sparsity import sparsify
from quantlib.qat import TrainConfig, train
from quantlib.quantsim import QuantSim


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def _data(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(128, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16), x


def _pruned_and_clustered(clusters: int = 6) -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    sparsify(model, "magnitude", sparsity=0.5)
    cluster_weights(model, clusters, preserve_zeros=True)
    return model


def test_clustering_keeps_zeros_and_at_most_k_values():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    w[w.abs() < 0.5] = 0
    clustered = cluster_tensor(w, 8, preserve_zeros=True)
    assert torch.unique(clustered).numel() == 8 and torch.equal(clustered == 0, w == 0)
    centroids = torch.unique(clustered[clustered != 0])
    nearest = (w[w != 0][:, None] - centroids[None]).abs().min(1).values
    assert torch.allclose((clustered - w)[w != 0].abs(), nearest)  # every weight went to its nearest centroid
    free = cluster_tensor(w, 8, preserve_zeros=False)
    assert torch.unique(free).numel() == 8


@pytest.mark.parametrize("kinds", [["sparsity"], ["clusters"], ["sparsity", "clusters"]])
def test_preserver_keeps_structure_through_fp32_training_and_without_it_training_breaks_it(kinds):
    data, _ = _data()
    counts = structure_counts(_pruned_and_clustered())
    trained = {}
    for use_hook in (False, True):
        model = _pruned_and_clustered()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        hooks = [structure_preserver(model, kinds)] if use_hook else []
        train(model, data, TrainConfig(epochs=2, optimizer="adam", lr=1e-2), step_hooks=hooks, progress=False)
        trained[use_hook] = structure_counts(model)
        assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items() if k.endswith("weight"))
    for name, before in counts.items():
        if "sparsity" in kinds:
            assert trained[True][name]["zeros"] == before["zeros"]
        if "clusters" in kinds:
            assert trained[True][name]["unique"] == before["unique"]
    if "clusters" in kinds:
        assert any(trained[False][n]["unique"] > counts[n]["unique"] for n in counts)
    else:
        assert any(trained[False][n]["zeros"] < counts[n]["zeros"] for n in counts)


def test_pcqat_on_a_quantsim_preserves_sparsity_and_clusters_exactly():
    data, x = _data()
    model = _pruned_and_clustered(clusters=16)
    before = structure_counts(model)
    sim = QuantSim(model, x[:1], "per_channel")
    sim.calibrate([x[:64]], progress=False)
    hook = structure_preserver(sim.model, ["sparsity", "clusters"])
    start = sim.model.get_submodule("conv2").weight.detach().clone()
    train(sim.model, data, TrainConfig(epochs=2, optimizer="adam", lr=1e-2, freeze_observers_after=4),
          step_hooks=[hook], progress=False)
    after = structure_counts(sim.model)
    assert {n: (c["zeros"], c["unique"]) for n, c in after.items()} == {n: (c["zeros"], c["unique"]) for n, c in before.items()}
    assert before["conv2"]["unique"] == 16 and before["conv2"]["sparsity"] == 0.5
    assert not torch.equal(start, sim.model.get_submodule("conv2").weight)  # the centroids were trained


def test_hook_names_a_missing_layer_and_rejects_unknown_kinds():
    model = _pruned_and_clustered()
    hook = structure_preserver(model, ["sparsity"])
    with pytest.raises(KeyError, match="layer 'conv' is not in Sequential"):
        hook(nn.Sequential(nn.Linear(2, 2)), 1)
    with pytest.raises(ValueError, match="preserve kind 'quantization' is not supported"):
        structure_preserver(model, ["quantization"])
