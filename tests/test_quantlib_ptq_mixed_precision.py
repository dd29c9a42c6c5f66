"""Automatic mixed precision on a tiny MLP with a synthetic score: the budget is met with fewer
bit-ops than all-8-bit, the weight-sensitive layer is kept wide, the binary search stops at the
boundary, bit-ops match quantlib.cost, and AdaRounded layers are handled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlib.config import load_config
from quantlib.cost import model_cost
from quantlib.ptq.adaround import apply_adaround
from quantlib.ptq.budget_selection import PathScorer, noise_ladder, select_by_noise_fit
from quantlib.ptq.mixed_precision import MixedPrecisionConfig, greedy_path, search_mixed_precision
from quantlib.ptq.pass_config import PassConfigError
from quantlib.ptq.pipeline import prepare_quantsim
from quantlib.ptq.precision_formats import Candidate, PrecisionSwitch, parse_candidate, parse_candidates
from quantlib.ptq.quantizer_groups import quantizer_groups
from quantlib.ptq.registry import PTQConfigError
from quantlib.ptq.weight_freeze import is_frozen, weight_codes
from quantlib.quantsim import QuantSim

X = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
DATA = list(X.split(64))


def mlp_with_a_sensitive_layer() -> nn.Module:
    """Linear 0 -> 2 -> 4 -> 6 with ReLUs; every row of layer 2 has one weight 8x its largest, so
    4-bit weights (per channel) round the rest of layer 2 to zero, while 8 bits still resolve them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[2].weight[:, 0] = 8.0 * model[2].weight.abs().max() * torch.sign(torch.randn(32))
    return model


def synthetic_score(model: nn.Module, reference: nn.Module) -> float:
    """100 minus 100x the relative output noise against ``reference`` on fixed data."""
    with torch.no_grad():
        y, r = model(X), reference(X)
    return 100.0 - 100.0 * float((y - r).pow(2).sum() / r.pow(2).sum())


def calibrated(model: nn.Module) -> QuantSim:
    sim = QuantSim(model, X[:1], "per_channel")  # W8A8
    sim.calibrate(DATA, progress=False)
    return sim


def test_candidates_parse_sort_and_reject_bad_pairs():
    assert parse_candidate("w4a8") == Candidate(32, 4, 8) and parse_candidate("w4a8").name == "w4a8"
    assert [c.name for c in parse_candidates(["w16a16", "w4a8", "w8a8", "w4a8"])] == ["w4a8", "w8a8", "w16a16"]
    with pytest.raises(PassConfigError, match=r"candidates\[1\]='8-bit' is not a candidate; write"):
        parse_candidates(["w4a8", "8-bit"])
    with pytest.raises(PassConfigError, match=r"has 32 bits; use 2..16"):
        parse_candidates(["w4a8", "w32a8"])
    with pytest.raises(PassConfigError, match="needs at least two different candidates"):
        parse_candidates(["w8a8", "w8a8"])


def test_greedy_path_narrows_the_cheapest_noise_per_bitop_first():
    low, high = Candidate(32, 4, 8), Candidate(64, 8, 8)
    added = {"a": {low: 1.0, high: 0.0}, "b": {low: 0.1, high: 0.0}, "c": {low: 0.1, high: 0.0}}
    macs = {"a": 10, "b": 10, "c": 20}
    path = greedy_path(["a", "b", "c"], [low, high], added, lambda g, c: macs[g] * c.cost)
    assert [sum(c is low for c in p.values()) for p in path] == [0, 1, 2, 3]
    # c saves twice the bit-ops of b for the same noise, then b, then the noisy a
    assert path[1]["c"] is low and path[2]["b"] is low and path[3]["a"] is low


def test_search_meets_the_budget_with_fewer_bitops_than_all_8_bit():
    model = mlp_with_a_sensitive_layer()
    sim = calibrated(model)
    start_bitops = model_cost(sim).bitops
    result = search_mixed_precision(sim, DATA, [(X[:64],)], lambda m: synthetic_score(m, model), 100.0,
                                    MixedPrecisionConfig(max_drop=0.5, curve_points=2))
    assert result.met and result.target_score == 99.5
    assert result.chosen_score >= 99.5
    assert result.bitops_start == start_bitops == result.bitops_uniform["w8a8"]
    assert result.bitops_chosen < result.bitops_uniform["w8a8"]
    assert result.bitops_chosen == model_cost(sim).bitops  # the sim now holds the chosen formats
    assert result.chosen["2"].name != "w4a8"  # the layer with the planted outliers stays wide
    assert any(c.name == "w4a8" for c in result.chosen.values())
    assert synthetic_score(sim.model, model) == pytest.approx(result.chosen_score)
    # binary search stops at the boundary: the next point on the path was scored and missed the budget
    following = result.path[result.chosen_index + 1]
    assert following.score is not None and following.score < 99.5
    assert len(result.evaluated) <= 2 + 2 + 4  # curve points, both ends, log2 of the path
    bitops = [p.bitops for p in result.path]
    assert bitops == sorted(bitops, reverse=True) and bitops[0] == result.bitops_uniform["w16a16"]
    assert bitops[-1] == result.bitops_uniform["w4a8"]
    summary = result.to_dict()
    assert summary["groups_per_candidate"] == {name: list(summary["chosen"].values()).count(name)
                                               for name in set(summary["chosen"].values())}


def test_unreachable_budget_leaves_the_widest_assignment():
    model = mlp_with_a_sensitive_layer()
    sim = calibrated(model)
    result = search_mixed_precision(sim, DATA, [(X[:64],)], lambda m: synthetic_score(m, model), 200.0,
                                    MixedPrecisionConfig(max_drop=0.5))
    assert not result.met and result.chosen_index == 0
    assert all(c.name == "w16a16" for c in result.chosen.values())
    assert [p.index for p in result.evaluated] == [0]


def test_noise_ladder_scores_half_octaves_of_estimated_noise_and_the_last_point():
    noise = [1.0, 1.1, 1.5, 1.6, 2.05, 2.1, 9.0, 9.5]
    assert noise_ladder(noise) == [0, 2, 4, 6, 7]  # 1.5 >= 1.41, 2.05 >= 2, then 9.0 >= 2.83 (past 4 .. 8)
    assert noise_ladder([0.0, 0.0, 0.5, 0.6]) == [0, 2, 3]  # a noiseless start: the ladder begins at the first noise
    assert noise_ladder([0.0]) == [0]
    assert noise_ladder([0.1, 0.2, float("inf"), float("inf")]) == [0, 1, 2]  # infinite noise ends the ladder


def test_noise_fit_never_chooses_at_or_past_a_cliff_and_misses_an_unreachable_budget():
    noise = [0.01 * (i + 1) for i in range(12)]
    flat_then_cliff = PathScorer(lambda i: 99.0 if i < 11 else 93.0)  # no drop measured, then 6 points down
    selection = select_by_noise_fit(flat_then_cliff, noise, lambda i: noise[i], 99.0, 0.5, 10.0)
    assert selection.met and selection.fit["slope"] == 0.0 and selection.fit["cliff_index"] == 11
    assert selection.chosen < 11
    lucky_start = PathScorer(lambda i: 100.3 if i == 0 else 85.0)  # the widest point above the reference
    selection = select_by_noise_fit(lucky_start, noise, lambda i: noise[i], 100.0, 0.5, 10.0)
    assert selection.chosen == 0 and selection.fit["cliff_index"] == 1
    far_below = PathScorer(lambda i: 90.0)  # even the widest point drops past the window
    selection = select_by_noise_fit(far_below, noise, lambda i: noise[i], 100.0, 0.5, 10.0)
    assert not selection.met and selection.chosen == 0 and selection.fit["fit_indices"] == []


def test_noise_fit_leaves_the_widest_assignment_when_the_budget_is_unreachable():
    model = mlp_with_a_sensitive_layer()
    result = search_mixed_precision(calibrated(model), DATA, [(X[:64],)], lambda m: synthetic_score(m, model), 200.0,
                                    MixedPrecisionConfig(max_drop=0.5, selection="noise_fit"))
    assert not result.met and result.chosen_index == 0
    assert all(c.name == "w16a16" for c in result.chosen.values())


def jittered_search(selection: str, seed: int, model: nn.Module) -> float:
    """Run a search (budget 1 point) whose score is the synthetic score plus N(0, 1) points, as noisy
    as a 250-image top-1 against its budget; return the chosen point's true (unjittered) drop."""
    sim = calibrated(model)
    generator = torch.Generator().manual_seed(seed)
    search_mixed_precision(sim, DATA, [(X[:64],)],
                           lambda m: synthetic_score(m, model) + float(torch.randn(1, generator=generator)), 100.0,
                           MixedPrecisionConfig(max_drop=1.0, selection=selection))
    return 100.0 - synthetic_score(sim.model, model)


def test_noise_fit_finds_the_budgets_best_point_through_score_noise_the_binary_search_cannot_resolve():
    model = mlp_with_a_sensitive_layer()
    exact = search_mixed_precision(calibrated(model), DATA, [(X[:64],)], lambda m: synthetic_score(m, model), 100.0,
                                   MixedPrecisionConfig(max_drop=1.0))
    best_drop = 100.0 - exact.chosen_score  # the fewest bit-ops within the budget, judged on exact scores
    assert 0.5 < best_drop <= 1.0
    fit = [jittered_search("noise_fit", seed, model) for seed in range(12)]
    binary = [jittered_search("score", seed, model) for seed in range(12)]
    hits = lambda drops: sum(d == pytest.approx(best_drop) for d in drops)  # noqa: E731
    assert hits(fit) >= 9 and hits(binary) <= 5  # measured: 10 of 12 and 3 of 12
    assert sum(d > 1.0 for d in fit) <= 1


def test_noise_fit_records_its_fit_and_needs_a_budget():
    model = mlp_with_a_sensitive_layer()
    sim = calibrated(model)
    result = search_mixed_precision(sim, DATA, [(X[:64],)], lambda m: synthetic_score(m, model), 100.0,
                                    MixedPrecisionConfig(max_drop=1.0, selection="noise_fit"))
    fit = result.to_dict()["fit"]
    assert result.to_dict()["selection"] == "noise_fit" and fit["fit_indices"][0] == 0
    assert fit["slope"] == pytest.approx(100.0, rel=0.2)  # the synthetic score is 100 x the noise
    assert fit["predicted_drop_chosen"] <= 1.0 and result.chosen_score is not None
    assert "fit" not in search_mixed_precision(calibrated(model), DATA, [(X[:64],)], lambda m: 100.0, 100.0).to_dict()
    with pytest.raises(PassConfigError, match=r"max_drop=0.*selection: score"):
        MixedPrecisionConfig(max_drop=0.0, selection="noise_fit")
    with pytest.raises(PassConfigError, match=r"selection='fit' is not supported; use one of score, noise_fit"):
        MixedPrecisionConfig(selection="fit")
    with pytest.raises(PassConfigError, match=r"fit_window=0.5 must be >= 1"):
        MixedPrecisionConfig(selection="noise_fit", fit_window=0.5)


def test_switching_formats_is_reversible():
    model = mlp_with_a_sensitive_layer()
    sim = calibrated(model)
    groups = [g for g in quantizer_groups(sim) if g.kind == "layer"]
    switch = PrecisionSwitch(sim, groups, parse_candidates(["w4a8", "w8a8"]), DATA)
    widest = sim.model(X)
    narrow = {g.name: Candidate(32, 4, 8) for g in groups}
    switch.apply(narrow)
    assert all(m.weight_quantizer.spec.bitwidth == 4 for m in sim.weight_modules().values())
    assert switch.bitops(narrow) == model_cost(sim).bitops
    narrowed = sim.model(X)
    switch.apply({g.name: Candidate(64, 8, 8) for g in groups})
    assert torch.equal(sim.model(X), widest)
    switch.apply(narrow)
    assert torch.equal(sim.model(X), narrowed)


def test_weight_observers_set_the_weight_range_per_candidate_bitwidth():
    model = mlp_with_a_sensitive_layer()
    config = load_config("per_channel").with_defaults(weight={"observer": {"name": "mse"}})
    sim = QuantSim(model, X[:1], config)
    sim.calibrate(DATA, progress=False)
    module = sim.weight_modules()["2"]
    assert module.weight_quantizer.spec.observer.name == "mse"
    groups = [g for g in quantizer_groups(sim) if g.kind == "layer"]
    switch = PrecisionSwitch(sim, groups, parse_candidates(["w4a8", "w8a8"]), DATA, weight_observers={8: "minmax"})
    float_weight = model[2].weight.detach()
    peak = float_weight.abs().amax(1, keepdim=True)
    quantizer = module.weight_quantizer  # all-8-bit after construction: minmax ranges replace the MSE ones
    assert quantizer.spec.bitwidth == 8 and quantizer.spec.observer.name == "minmax"
    assert torch.allclose(quantizer.scale.reshape(-1, 1), peak / 127, rtol=1e-6)
    switch.apply({"2": Candidate(32, 4, 8)})
    quantizer = module.weight_quantizer  # 4 bits keep the layer's MSE observer, which clips the outlier
    assert quantizer.spec.bitwidth == 4 and quantizer.spec.observer.name == "mse"
    assert bool((quantizer.scale.reshape(-1, 1) < peak / 7).all())
    with pytest.raises(PassConfigError, match=r"weight_observers key '16' is not a candidate weight bitwidth; use one of \[4, 8\]"):
        MixedPrecisionConfig(candidates=("w4a8", "w8a8"), weight_observers={"16": "mse"})
    assert MixedPrecisionConfig(candidates=("w4a8", "w8a8"), weight_observers={"8": "minmax"}).weight_observers == {8: "minmax"}


def test_adarounded_layers_keep_their_codes_at_their_bitwidth_and_requantize_the_float_weight_otherwise():
    model = mlp_with_a_sensitive_layer()
    sim = QuantSim(model, X[:1], "per_channel")
    sim.calibrate(DATA, progress=False)
    apply_adaround(sim, DATA, {"num_iterations": 20, "batch_size": 64, "num_samples": 256, "include": ["4"]},
                   progress=False)
    module = sim.weight_modules()["4"]
    adarounded = weight_codes(module)
    groups = [g for g in quantizer_groups(sim) if g.kind == "layer"]
    switch = PrecisionSwitch(sim, groups, parse_candidates(["w4a8", "w8a8"]), DATA)
    switch.apply({"4": Candidate(32, 4, 8)})
    assert not is_frozen(module.weight_quantizer) and module.weight_quantizer.spec.bitwidth == 4
    float_weight = model[4].weight.detach()
    scale = float_weight.abs().amax(1, keepdim=True) / 7  # symmetric signed 4-bit, per channel, minmax
    assert torch.allclose(module.weight_quantizer(module.weight), torch.round(float_weight / scale).clamp(-8, 7) * scale,
                          atol=1e-6)
    switch.apply({"4": Candidate(64, 8, 8)})
    assert is_frozen(module.weight_quantizer) and torch.equal(weight_codes(module), adarounded)


def test_pipeline_step_writes_the_pareto_plot(tmp_path):
    model = mlp_with_a_sensitive_layer()
    data = [(b, torch.zeros(len(b), dtype=torch.long)) for b in DATA]
    sim, report = prepare_quantsim(model, X[:1], "per_channel",
                                   [{"name": "mixed_precision", "candidates": ["w4a8", "w8a8", "w16a16"], "max_drop": 0.5,
                                     "num_samples": 64}],
                                   data, progress=False, plots_dir=tmp_path, score_fn=lambda m: synthetic_score(m, model))
    summary = report.steps[0].summary
    assert summary["met"] and summary["reference_score"] == pytest.approx(100.0)
    assert summary["bitops_chosen"] < summary["bitops_uniform"]["w8a8"]
    png = (tmp_path / "mixed_precision_pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(PTQConfigError, match=r"ptq.steps\[0\].candidates=\['w8a8'\] needs at least two"):
        prepare_quantsim(model, X[:1], "per_channel", [{"name": "mixed_precision", "candidates": ["w8a8"]}], data,
                         progress=False)
