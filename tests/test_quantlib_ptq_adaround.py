"""AdaRound and AdaQuant (layer-wise reconstruction): they lower the layer output error against
round-to-nearest, write on-grid weights with frozen encodings, bound the activation cache, and run
as pipeline steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from quantlib.ptq.adaquant import apply_adaquant
from quantlib.ptq.adaround import (
    AdaRoundConfig,
    apply_adaround,
    beta_at,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
)
from quantlib.ptq.pass_config import PassConfigError
from quantlib.ptq.pipeline import prepare_quantsim
from quantlib.ptq.registry import PTQConfigError
from quantlib.ptq.weight_freeze import is_frozen, unfreeze_weight, weight_codes
from quantlib.quantsim import QuantSim
from quantlib_reconstruction_helpers import FAST, correlated_inputs, output_mse, w4_a16_config


def linear_sim(seed: int = 0) -> tuple[nn.Module, QuantSim, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 32)).eval()
    x = correlated_inputs(512, seed=seed)
    batches = list(x.split(64))
    sim = QuantSim(model, x[:1], w4_a16_config())
    sim.calibrate(batches, progress=False)
    return model, sim, batches


def test_adaround_lowers_layer_output_mse_against_nearest_rounding():
    model, sim, batches = linear_sim()
    held_out = correlated_inputs(1024, seed=0)[512:]  # same distribution, not used for optimizing
    before = output_mse(model, sim, held_out)
    result = apply_adaround(sim, batches, {**FAST, "keep_nearest_if_worse": False}, progress=False)
    after = output_mse(model, sim, held_out)
    (layer,) = result.layers
    assert layer.name == "0" and layer.bitwidth == 4 and layer.num_weights == 24 * 32
    assert layer.mse_adaround < 0.5 * layer.mse_nearest  # on the cached chunk
    assert after < 0.5 * before  # and on held-out inputs of the same distribution
    assert 0.0 < layer.flipped < 0.5  # some weights round the other way, most do not
    assert not layer.kept_nearest


def test_adaround_writes_grid_weights_and_freezes_the_encoding():
    model, sim, batches = linear_sim()
    module = sim.weight_modules()["0"]
    float_weight = module.weight.detach().clone()
    apply_adaround(sim, batches, FAST, progress=False)
    quantizer = module.weight_quantizer
    assert is_frozen(quantizer) and quantizer.frozen_by == "adaround"
    codes = weight_codes(module)
    scale = quantizer.scale.reshape(-1, 1)
    assert torch.equal(module.weight, codes.float() * scale)  # the weight is exactly on the grid
    assert (codes - torch.round(float_weight / scale)).abs().max() <= 1  # one step at most from the float weight
    encoding = sim.encodings()["param_encodings"]["0.weight"]
    sim.calibrate(batches, progress=False)  # recalibrating must not move the frozen encoding
    assert sim.encodings()["param_encodings"]["0.weight"] == encoding
    assert torch.equal(weight_codes(module), codes)
    assert "float_weight" not in sim.model.state_dict()  # checkpoints are unchanged
    unfreeze_weight(module)
    assert not is_frozen(module.weight_quantizer) and torch.equal(module.weight, float_weight)


def test_undecided_counts_the_soft_roundings_a_schedule_left_unsettled():
    """A full schedule settles h(V) on 0 or 1 for (almost) every weight; one cut short leaves most
    weights in between, where the hard rounding is not what the optimization saw."""
    _, sim, batches = linear_sim()
    settled = apply_adaround(sim, batches, FAST, progress=False).layers[0]
    _, sim, batches = linear_sim()
    cut_short = apply_adaround(sim, batches, {**FAST, "num_iterations": 20}, progress=False)
    assert settled.undecided < 0.02
    assert cut_short.layers[0].undecided > 0.8
    assert cut_short.summary()["per_layer"][0]["undecided"] == round(cut_short.layers[0].undecided, 5)


def test_adaround_keeps_nearest_rounding_where_it_does_not_help():
    """Independent inputs make nearest rounding optimal; a zero-iteration run ends on nearest."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    x = torch.randn(256, 16)
    sim = QuantSim(model, x[:1], w4_a16_config())
    sim.calibrate([x], progress=False)
    nearest = weight_codes(sim.weight_modules()["0"])
    result = apply_adaround(sim, [x], {"num_iterations": 0, "num_samples": 256, "batch_size": 64}, progress=False)
    assert torch.equal(weight_codes(sim.weight_modules()["0"]), nearest)
    assert result.layers[0].mse_adaround == result.layers[0].mse_nearest and result.layers[0].flipped == 0.0


def test_spilled_cache_gives_the_same_result_as_an_in_memory_cache():
    """max_cache_mb=0 spills every cached chunk to disk; the optimization must not change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(32, 3, 12, 12)
    results = []
    for max_cache_mb in (0.0, 64.0):
        sim = QuantSim(model, x[:1], w4_a16_config())
        sim.calibrate([x], progress=False)
        result = apply_adaround(sim, [x], {"num_iterations": 30, "batch_size": 8, "num_samples": 32, "crop": 4,
                                           "max_cache_mb": max_cache_mb}, progress=False)
        results.append((result, {n: m.weight.detach().clone() for n, m in sim.weight_modules().items()}))
    (spilled, spilled_weights), (resident, resident_weights) = results
    assert spilled.stats.spilled_mb > 0 and spilled.stats.peak_cache_mb == 0
    assert resident.stats.spilled_mb == 0 and resident.stats.peak_cache_mb > 0
    assert [layer.name for layer in spilled.layers] == ["0", "2", "6"]
    for name in spilled_weights:
        assert torch.equal(spilled_weights[name], resident_weights[name])


def test_beta_schedule_warm_start_then_anneals_from_start_to_end():
    for schedule in ("cosine", "linear"):
        config = AdaRoundConfig(num_iterations=100, warm_start=0.2, beta_start=20.0, beta_end=2.0, beta_schedule=schedule)
        assert beta_at(config, 19) is None
        assert beta_at(config, 20) == pytest.approx(20.0)
        assert beta_at(config, 99) == pytest.approx(2.0)
        assert 2.0 < beta_at(config, 60) < 20.0
    cosine = AdaRoundConfig(num_iterations=101, warm_start=0.0)
    assert beta_at(cosine, 50) == pytest.approx(11.0)  # halfway: the mean of 20 and 2


def test_rectified_sigmoid_inverse_round_trip():
    h = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-6)
    assert float(rectified_sigmoid(torch.tensor(50.0))) == 1.0 and float(rectified_sigmoid(torch.tensor(-50.0))) == 0.0


def test_config_errors_name_the_setting():
    with pytest.raises(PassConfigError, match=r"beta_start=1.0 must be >= beta_end=2.0"):
        AdaRoundConfig(beta_start=1.0)
    with pytest.raises(PassConfigError, match=r"adaround.num_iteration is not a AdaRoundConfig setting"):
        apply_adaround(linear_sim()[1], [torch.zeros(1, 24)], {"num_iteration": 5})
    with pytest.raises(PTQConfigError, match=r"ptq.steps\[0\].warm_start=1.5 must be a fraction"):
        prepare_quantsim(nn.Linear(4, 2), torch.zeros(1, 4), "per_channel", [{"name": "adaround", "warm_start": 1.5}],
                         [torch.zeros(2, 4)])


def test_adaround_pipeline_step_reports_per_layer_mse_and_recalibrates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = correlated_inputs(256)
    data = [(b, torch.zeros(len(b), dtype=torch.long)) for b in x.split(64)]
    sim, report = prepare_quantsim(model, x[:1], w4_a16_config(), [{"name": "adaround", **FAST, "num_samples": 256}],
                                   data, progress=False)
    (step,) = report.steps
    assert step.name == "adaround" and step.summary["layers"] == 2 and step.summary["recalibrated"] is True
    assert [row["name"] for row in step.summary["per_layer"]] == ["0", "2"]
    assert step.summary["mse_adaround_sum"] < step.summary["mse_nearest_sum"]
    assert all(is_frozen(m.weight_quantizer) for m in sim.weight_modules().values())
    copied = copy.deepcopy(sim)  # AutoQuant copies sims: frozen quantizers must survive it
    assert torch.equal(copied.model(x), sim.model(x))


def test_adaquant_lowers_layer_output_mse_and_freezes_the_encoding():
    model, sim, batches = linear_sim()
    held_out = correlated_inputs(1024, seed=0)[512:]
    before = output_mse(model, sim, held_out)
    result = apply_adaquant(sim, batches, {"num_iterations": 300, "learning_rate": 0.05, "batch_size": 64,
                                           "num_samples": 512, "check_every": 20}, progress=False)
    after = output_mse(model, sim, held_out)
    (layer,) = result.layers
    assert layer.mse_after < 0.7 * layer.mse_before and after < 0.7 * before
    assert is_frozen(sim.weight_modules()["0"].weight_quantizer)
    assert math.isclose(result.summary()["mse_after_sum"], layer.mse_after)


def test_adaquant_pipeline_step_is_registered():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 8)).eval()
    x = correlated_inputs(128)
    sim, report = prepare_quantsim(model, x[:1], w4_a16_config(),
                                   [{"name": "adaquant", "num_iterations": 50, "batch_size": 32, "num_samples": 128}],
                                   [x], progress=False)
    assert report.steps[0].name == "adaquant" and report.steps[0].summary["layers"] == 1


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 4, 5, padding=2, groups=4),
                                  nn.Conv2d(4, 6, 3, padding=2, dilation=2), nn.Conv1d(4, 6, 3, padding=1)])
def test_cropped_windows_are_exact_windows_of_the_full_output(conv):
    """AdaRound/AdaQuant train on random output windows: each must equal that window of the full map."""
    from quantlib.ptq.chunk_store import ChunkStore
    from quantlib.ptq.layer_cache import LayerData
    from quantlib.ptq.layer_ops import ReconstructionBatches, layer_forward

    torch.manual_seed(0)
    spatial = (13, 11) if isinstance(conv, nn.Conv2d) else (17,)
    x = torch.randn(3, 4, *spatial)
    with torch.no_grad(), ChunkStore(0) as store:  # everything spilled: windows are read from memory maps
        store.append("x", x)
        store.append("y", conv(x))
        layer = LayerData(name="conv", module=conv, store=store, input_key="x", target_key="y")
        batches = ReconstructionBatches(layer, crop=4, generator=torch.Generator().manual_seed(0))
        assert batches.windowed
        for _ in range(20):
            window, target = batches.sample()
            assert target.shape[2:] == (4,) * len(spatial)
            assert torch.allclose(batches.forward(window, conv.weight, conv.bias), target, atol=1e-5)
        assert torch.allclose(layer_forward(conv, x, conv.weight, conv.bias), conv(x))


def test_layers_are_reconstructed_after_the_activation_that_follows_them():
    """Linear 0 -> ReLU (in place, fused: no quantizer between) -> Linear 2: layer 0's error is
    measured after a ReLU that leaves cached targets alone; layer 2 (the model output) has none."""
    from quantlib.ptq.layer_cache import following_activation

    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(inplace=True), nn.Linear(16, 4)).eval()
    sim = QuantSim(model, torch.zeros(1, 24), w4_a16_config())
    modules = dict(sim.model.named_modules())
    nodes = {n.target: n for n in sim.model.graph.nodes if n.op == "call_module"}
    relu = following_activation(nodes["0"], modules)
    values = torch.tensor([-3.0, 2.0, 9.0])
    assert torch.equal(relu(values), torch.tensor([0.0, 2.0, 9.0]))
    assert torch.equal(values, torch.tensor([-3.0, 2.0, 9.0]))  # not modified in place
    assert following_activation(nodes["2"], modules) is None
    x = correlated_inputs(256)
    nearest_mse = {}
    for through in (True, False):
        fresh = QuantSim(model, torch.zeros(1, 24), w4_a16_config())
        fresh.calibrate([x], progress=False)
        result = apply_adaround(fresh, [x], {"num_iterations": 0, "num_samples": 256, "batch_size": 64,
                                             "through_activation": through}, progress=False)
        nearest_mse[through] = result.layers[0].mse_nearest
    # errors on outputs that both models send below zero are removed by the ReLU
    assert nearest_mse[True] < 0.8 * nearest_mse[False]


def test_the_per_channel_clamp_cle_leaves_for_relu6_is_the_activation_followed():
    """After BN fold + CLE the ReLU6 of a depthwise block is a clamp with per-channel tensor bounds
    (6 / s_i); the layer before it must be reconstructed through exactly that clamp."""
    from quantlib.ptq.layer_cache import following_activation

    from quantlib_models import DepthwiseNet

    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    with torch.no_grad():
        skew = torch.logspace(-1.5, 1.5, 8)
        model.pw.weight.mul_(skew.reshape(-1, 1, 1, 1))
        model.dw.weight.div_(skew.reshape(-1, 1, 1, 1))
        model.bn.weight.uniform_(1.0, 4.0)  # the ReLU6 saturates on some inputs
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 4.0
    sim, _ = prepare_quantsim(model, x, "per_channel", ["bn_fold", "cle"], [x], progress=False)
    modules = dict(sim.model.named_modules())
    nodes = {n.target: n for n in sim.model.graph.nodes if n.op == "call_module"}
    clamp = next(iter(nodes["dw"].users))
    assert clamp.target is torch.clamp  # CLE rewrote the ReLU6 into a per-channel clamp
    act = following_activation(nodes["dw"], modules)
    assert act is not None
    low, high = (getattr(sim.model.cle_clip_bounds, a.target.split(".")[-1]) for a in clamp.args[1:3])
    assert float(high.max() / high.min()) > 1.2  # the bounds really differ per channel
    values = torch.randn(5, 8, 6, 6, generator=torch.Generator().manual_seed(1)) * 8.0
    before = values.clone()
    assert torch.equal(act(values), torch.clamp(values, low, high))
    assert not torch.equal(act(values), torch.clamp(values, 0.0, 6.0))  # not a plain ReLU6
    assert torch.equal(values, before)  # not modified in place


def test_a_clamp_with_one_per_channel_bound_is_followed_as_written():
    """``clamp(x, min=tensor)`` (no upper bound) is a per-channel clip too; torch.clamp refuses a
    tensor next to a number, so the followed activation must still run."""
    from quantlib.graph import trace
    from quantlib.ptq.layer_cache import following_activation

    class FloorNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.register_buffer("floor", torch.tensor([-1.0, 0.0, 1.0]).reshape(3, 1, 1))

        def forward(self, x):
            return torch.clamp(self.conv(x), min=self.floor)

    gm = trace(FloorNet().eval())
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
    act = following_activation(conv, dict(gm.named_modules()))
    values = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3.0
    assert torch.equal(act(values), torch.maximum(values, gm.floor))


def test_mirror_caches_every_sample_and_its_mirror_image():
    from quantlib.ptq.layer_cache import CacheConfig, collect_samples

    images = torch.arange(5 * 2 * 3 * 4, dtype=torch.float32).reshape(5, 2, 3, 4)
    data = [(images[:3], torch.zeros(3)), (images[3:], torch.zeros(2))]
    plain = collect_samples(data, CacheConfig(num_samples=4, batch_size=3), torch.device("cpu"))
    mirrored = collect_samples(data, CacheConfig(num_samples=4, batch_size=3, mirror=True), torch.device("cpu"))
    assert [c.shape[0] for c in plain] == [3, 1] and [c.shape[0] for c in mirrored] == [3, 3, 2]
    both = torch.cat(mirrored)
    assert torch.equal(both[:4], images[:4]) and torch.equal(both[4:], images[:4].flip(-1))
