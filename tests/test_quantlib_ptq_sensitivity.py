"""Per-layer sensitivity: one group quantized at a time finds the layer made weight-sensitive and
the layer made activation-sensitive, scores drops with a synthetic score_fn, writes the plots and
leaves the sim as it was."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantlib.config import load_config
from quantlib.ptq.pipeline import prepare_quantsim
from quantlib.ptq.registry import PTQConfigError
from quantlib.ptq.sensitivity import SensitivityConfig, analyze_sensitivity, sqnr_db
from quantlib.ptq.sensitivity_plots import activation_histograms
from quantlib.quantsim import QuantSim


def sensitive_mlp() -> nn.Module:
    """Linear 0 -> ReLU 1 -> Linear 2 -> ReLU 3 -> Linear 4."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


# 8-bit per-tensor everywhere except two planted weak spots: the 3-bit output of ReLU 1, which
# feeds layer 2 (activation-sensitive), and the 2-bit weights of layer 4 (weight-sensitive)
CONFIG = load_config("per_tensor").with_module_rules([{"pattern": "1", "output": {"bitwidth": 3}},
                                                      {"pattern": "4", "weight": {"bitwidth": 2}}])
X = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))


def synthetic_score(model: nn.Module, reference: nn.Module) -> float:
    """100 minus 100x the relative output noise against ``reference`` on fixed data (higher is better)."""
    with torch.no_grad():
        y, r = model(X), reference(X)
    return 100.0 - 100.0 * float((y - r).pow(2).sum() / r.pow(2).sum())


def calibrated(model: nn.Module) -> QuantSim:
    sim = QuantSim(model, X[:1], CONFIG)
    sim.calibrate(list(X.split(64)), progress=False)
    return sim


def test_sqnr_of_known_signals():
    assert sqnr_db([torch.ones(10)], [torch.full((10,), 1.1)]) == pytest.approx(20.0)
    assert sqnr_db([torch.ones(4)], [torch.ones(4)]) == math.inf


def test_one_layer_at_a_time_finds_the_weight_and_the_activation_sensitive_layers():
    model = sensitive_mlp()
    sim = calibrated(model)
    outputs_before = sim.model(X)
    result = analyze_sensitivity(sim, [(X[:128],)], SensitivityConfig(score_modes=("both", "weight", "activation")),
                                 score_fn=lambda m: synthetic_score(m, model))
    layers = [g.name for g in result.groups if g.kind == "layer"]
    assert layers == ["0", "2", "4"]
    weight = {e.group: e.sqnr_db for e in result.table("weight")}
    activation = {e.group: e.sqnr_db for e in result.table("activation")}
    assert min(weight, key=weight.get) == "4" and weight["4"] < min(weight["0"], weight["2"]) - 10.0
    assert min((g for g in activation if g in layers), key=activation.get) == "2"
    assert activation["2"] < min(activation["0"], activation["4"]) - 10.0
    both = {e.group: e for e in result.table("both")}
    # a group quantized in full is no better than either of its halves alone
    assert all(both[g].sqnr_db <= min(weight[g], activation[g]) + 0.5 for g in layers)
    assert result.float_score == pytest.approx(100.0, abs=1e-3)
    assert all(e.drop == pytest.approx(result.float_score - e.score) for e in result.entries)
    assert result.ranking()[0] in ("2", "4") and both[result.ranking()[0]].drop > 1.0
    assert result.quantized_sqnr_db <= min(e.sqnr_db for e in result.table("both")) + 0.5
    assert torch.equal(sim.model(X), outputs_before)  # every quantizer is back on


def test_activation_only_groups_and_sqnr_only_mode():
    model = sensitive_mlp()
    result = analyze_sensitivity(calibrated(model), [(X[:64],)], SensitivityConfig(score_modes=()))
    kinds = {g.kind for g in result.groups}
    assert kinds == {"layer", "activation"}  # the model output quantizer feeds no layer
    activation_groups = [g.name for g in result.groups if g.kind == "activation"]
    assert {e.mode for e in result.entries if e.group in activation_groups} == {"activation"}
    assert result.float_score is None and all(e.drop is None for e in result.entries)
    only_layers = analyze_sensitivity(calibrated(model), [(X[:64],)], SensitivityConfig(score_modes=(), activation_groups=False,
                                                                                         exclude=("0",)))
    assert [g.name for g in only_layers.groups] == ["2", "4"]


def test_histograms_count_every_value_and_measure_the_clipped_fraction():
    model = sensitive_mlp()
    sim = calibrated(model)
    groups = [g for g in analyze_sensitivity(sim, [(X[:64],)], SensitivityConfig(score_modes=())).groups if g.name == "2"]
    (hist,) = activation_histograms(sim, groups, [(X[:64],), (X[64:128],)], bins=32)
    assert int(hist.counts.sum()) == 128 * 16  # every value of the 16-wide input, both batches
    assert len(hist.edges) == 33 and hist.clip_min <= 0.0 < hist.clip_max
    assert hist.clipped < 0.002  # minmax on these samples: at most the extreme value, after zero-point nudging
    assert hist.bitwidth == 3 and hist.quantizer == "_1"
    # narrow the clipping range to [0, 0.5]: the clipped fraction is the share of ReLU outputs above 0.5
    sim.activation_quantizers()["_1"].set_qparams(torch.tensor([0.5 / 7]), torch.tensor([0]))
    (narrow,) = activation_histograms(sim, groups, [(X[:128],)], bins=32)
    with torch.no_grad():
        expected = float((torch.relu(model[0](X[:128])) > 0.5).float().mean())
    assert narrow.clip_max == pytest.approx(0.5) and narrow.clipped == pytest.approx(expected, abs=0.01)
    assert 0.1 < narrow.clipped < 0.6


def test_pipeline_step_writes_plots_and_needs_score_fn(tmp_path):
    model = sensitive_mlp()
    data = [(b, torch.zeros(len(b), dtype=torch.long)) for b in X.split(64)]
    sim, report = prepare_quantsim(model, X[:1], CONFIG, [{"name": "sensitivity", "num_samples": 64, "plot_top": 2}],
                                   data, progress=False, plots_dir=tmp_path, score_fn=lambda m: synthetic_score(m, model))
    summary = report.steps[0].summary
    assert summary["num_samples"] == 64 and summary["most_sensitive"][0] in ("2", "4")
    assert len(summary["entries"]) == 3 * 3 + 1  # three layer groups x three modes + the output quantizer
    for name in ("sensitivity_per_layer.png", "sensitivity_activation_histograms.png"):
        data_bytes = (tmp_path / name).read_bytes()
        assert data_bytes[:8] == b"\x89PNG\r\n\x1a\n" and len(data_bytes) > 10_000
    assert sorted(report.plots) == sorted(str(tmp_path / n) for n in ("sensitivity_per_layer.png",
                                                                        "sensitivity_activation_histograms.png"))
    with pytest.raises(PTQConfigError, match="needs score_fn"):
        prepare_quantsim(model, X[:1], CONFIG, ["sensitivity"], data, progress=False)
    with pytest.raises(PTQConfigError, match=r"ptq.steps\[0\].score_modes has 'weight', which is not in modes"):
        prepare_quantsim(model, X[:1], CONFIG, [{"name": "sensitivity", "modes": ["both"], "score_modes": ["weight"]}],
                         data, progress=False)


def test_score_top_scores_only_the_lowest_sqnr_groups():
    model = sensitive_mlp()
    calls = []

    def counting_score(m):
        calls.append(1)
        return synthetic_score(m, model)

    result = analyze_sensitivity(calibrated(model), [(X[:128],)], SensitivityConfig(score_modes=("both",), score_top=2),
                                 score_fn=counting_score)
    scored = [e.group for e in result.table("both") if e.drop is not None]
    assert sorted(scored) == ["2", "4"]  # the two planted weak spots have the lowest SQNR
    assert len(calls) == 2 + 2  # float and fully quantized references, then the two groups
    assert result.ranking()[:2] == ["4", "2"] and set(result.ranking()) == {g.name for g in result.groups}
