"""Cross-layer equalization, layer-pair detection and high-bias absorption (quantlib.ptq).

CLE must leave the FP32 function unchanged (relative error <= 1e-4) -- also across ReLU6, whose
bounds it rescales per channel -- and must equalize the per-channel weight ranges of each pair.
High-bias absorption must keep the function on inputs above the absorbed amount and narrow the
activation range by that amount.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantlib.graph import trace
from quantlib.ptq import channels
from quantlib.ptq.cle import CLEConfig, equalize_model, equalize_pair
from quantlib.ptq.high_bias_absorption import absorb_high_biases
from quantlib.ptq.bn_reestimation import reestimate_bn_stats
from quantlib.ptq.bn_stats import ChannelGaussian
from quantlib.ptq.layer_pairs import activation_of, chains_of, find_layer_pairs
from quantlib.ptq.pipeline import prepare_fp32_model, prepare_quantsim
from quantlib.ptq.plots import plot_channel_ranges

from quantlib_models import DepthwiseNet


class SkewedReluNet(nn.Module):
    """conv -> ReLU -> zero pad -> maxpool -> conv -> LeakyReLU -> conv, with skewed channel ranges."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.pad = nn.ZeroPad2d(1)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.c3 = nn.Conv2d(8, 4, 1)
        with torch.no_grad():  # a function-preserving rescaling that ruins both per-tensor grids
            skew = torch.logspace(-1.5, 1.5, 8)
            self.c1.weight.mul_(skew.reshape(-1, 1, 1, 1))
            self.c1.bias.mul_(skew)
            self.c2.weight.div_(skew.reshape(1, -1, 1, 1))

    def forward(self, x):
        y = self.pool(self.pad(self.relu(self.c1(x))))
        return self.c3(self.leaky(self.c2(y)))


class Residual(nn.Module):
    """c1's output feeds both c2 and the residual add: no pair may start at c1."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 1)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.c3 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c3(F.relu(self.c2(y) + y))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.f1, self.f2, self.f3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.f3(torch.relu(self.f2(F.relu(self.f1(x)))))


def _skewed_depthwise() -> DepthwiseNet:
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    with torch.no_grad():
        skew = torch.logspace(-1.5, 1.5, 8)
        model.pw.weight.mul_(skew.reshape(-1, 1, 1, 1))
        model.pw.bias.mul_(skew)
        model.dw.weight.div_(skew.reshape(-1, 1, 1, 1))
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(1.0, 4.0)  # large enough that ReLU6 saturates on some inputs
        model.bn.bias.uniform_(0.0, 3.0)
    return model


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _input(shape, seed=3, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------------- layer pairs


def test_pairs_follow_pass_through_ops_and_stop_at_branches():
    pairs = find_layer_pairs(trace(SkewedReluNet()))
    assert [(p.first, p.second, p.activation.kind) for p in pairs] == [("c1", "c2", "relu"),
                                                                        ("c2", "c3", "leaky_relu")]
    assert [[p.first for p in chain] for chain in chains_of(pairs)] == [["c1", "c2"]]
    residual = find_layer_pairs(trace(Residual()))
    assert [(p.first, p.second) for p in residual] == []  # c1 branches, c2 feeds the add


def test_relu6_pairs_carry_their_bounds():
    gm = trace(DepthwiseNet())
    from quantlib.batchnorm_fold import fold_batch_norms

    fold_batch_norms(gm)
    pairs = find_layer_pairs(gm)
    assert [(p.first, p.second, p.activation.kind) for p in pairs] == [("pw", "dw", "identity"), ("dw", "gc", "relu6")]
    assert (pairs[1].activation.low, pairs[1].activation.high) == (0.0, 6.0)


# --------------------------------------------------------------------------------- equalization


def test_equalize_pair_makes_both_ranges_the_geometric_mean():
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, groups=6)  # into a depthwise conv
    with torch.no_grad():
        first.weight.mul_(torch.logspace(-2, 2, 6).reshape(-1, 1, 1, 1))
    r1, r2 = channels.out_channel_absmax(first.weight), channels.in_channel_absmax(second.weight, 6)
    equalize_pair(first, second)
    expected = torch.sqrt(r1 * r2)
    torch.testing.assert_close(channels.out_channel_absmax(first.weight), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(channels.in_channel_absmax(second.weight, 6), expected, rtol=1e-5, atol=0)


def test_cle_keeps_fp32_outputs_and_reduces_range_spread():
    torch.manual_seed(0)
    model = SkewedReluNet().eval()
    x = _input((4, 3, 12, 12))
    context, report = prepare_fp32_model(model, x, ["cle"], [x], progress=False)
    with torch.no_grad():
        assert _relative_error(context.model(x), model(x)) <= 1e-4
    summary = report.steps[0].summary
    assert summary["pairs"] == 2 and summary["unconverged_chains"] == 0
    # the 1,000x spread of channel ranges on both sides of c1 -> c2 is undone
    for layer, ranges in (("c1", lambda m: channels.out_channel_absmax(m.c1.weight)),
                          ("c2", lambda m: channels.in_channel_absmax(m.c2.weight, 1))):
        before, after = ranges(model), ranges(context.model)
        assert float(before.max() / before.min()) > 300, layer
        assert float(after.max() / after.min()) < 5, layer
    assert summary["precision_after"] > summary["precision_before"] + 0.3


def test_cle_across_relu6_rescales_the_clip_bounds_exactly():
    model = _skewed_depthwise()
    x = _input((4, 3, 8, 8), scale=4.0)
    with torch.no_grad():
        saturated = float((model.bn(model.dw(model.pw(x))) > 6).float().mean())
    assert saturated > 0.05  # the test is only meaningful when ReLU6 clips
    context, report = prepare_fp32_model(model, x, ["bn_fold", "cle"], [x], progress=False)
    summary = report.steps[1].summary
    assert (summary["pairs"], summary["depthwise_pairs"], summary["rescaled_clips"]) == (2, 2, 1)
    with torch.no_grad():
        assert _relative_error(context.model(x), model(x)) <= 1e-4
    clip = next(n for n in context.model.graph.nodes if n.target is torch.clamp)
    bounds = activation_of(clip, dict(context.model.named_modules()))
    assert bounds.per_channel and float(bounds.low.abs().max()) == 0.0
    assert float(bounds.high.max() / bounds.high.min()) > 1.5  # 6 / s_i differs per channel
    # running CLE again changes nothing: it has converged
    again, report2 = prepare_fp32_model(context.model, x, ["cle"], [x], progress=False)
    assert report2.steps[0].summary["iterations"] == 1
    with torch.no_grad():
        assert _relative_error(again.model(x), model(x)) <= 1e-4


def test_relu6_to_relu_changes_fp32_where_relu6_saturates_and_skip_leaves_the_pair():
    model = _skewed_depthwise()
    x = _input((4, 3, 8, 8), scale=4.0)
    converted, report = prepare_fp32_model(model, x, ["bn_fold", {"name": "cle", "relu6": "relu"}], [x],
                                           progress=False)
    assert report.steps[1].summary["converted_relu6"] == 1
    assert not any(isinstance(m, nn.ReLU6) for m in converted.model.modules())
    with torch.no_grad():
        assert _relative_error(converted.model(x), model(x)) > 0.01
    skipped, report = prepare_fp32_model(model, x, ["bn_fold", {"name": "cle", "relu6": "skip"}], [x], progress=False)
    summary = report.steps[1].summary
    assert (summary["pairs"], summary["skipped_clip_pairs"]) == (1, 1)
    assert torch.equal(skipped.model.gc.weight, model.gc.weight)
    with torch.no_grad():
        assert _relative_error(skipped.model(x), model(x)) <= 1e-4


def test_cle_on_linear_layers_and_functional_relu():
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        skew = torch.logspace(-2, 2, 16)
        model.f1.weight.mul_(skew.reshape(-1, 1))
        model.f1.bias.mul_(skew)
        model.f2.weight.div_(skew)
    x = _input((32, 6))
    gm = trace(model)
    result = equalize_model(gm, CLEConfig())
    assert [(p.first, p.second) for p in result.pairs] == [("f1", "f2"), ("f2", "f3")]
    assert result.precision_before < 0.3 and result.precision_after > 0.6
    with torch.no_grad():
        assert _relative_error(gm(x), model(x)) <= 1e-4


def test_cle_improves_per_tensor_quantsim_on_a_skewed_model():
    torch.manual_seed(0)
    model = SkewedReluNet().eval()
    calibration = [_input((8, 3, 12, 12), seed=s) for s in range(3)]
    held_out = _input((16, 3, 12, 12), seed=10)
    with torch.no_grad():
        reference = model(held_out)
        errors = {}
        for name, steps in (("naive", []), ("cle", ["cle"])):
            sim, _ = prepare_quantsim(model, calibration[0], "per_tensor", steps, calibration, progress=False)
            errors[name] = _relative_error(sim.model(held_out), reference)
    assert errors["cle"] < errors["naive"] / 2, errors


# ------------------------------------------------------------------------------ high-bias absorption


class HighBiasNet(nn.Module):
    """conv -> BN (large beta, small gamma) -> act -> 1x1 conv (no padding: absorption is exact for z >= c)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.act = act
        self.c2 = nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            self.bn.bias.copy_(torch.tensor([4.0, 3.0, 0.5, 5.0, 2.0, 0.0]))
            self.bn.weight.copy_(torch.tensor([0.5, 0.4, 1.0, 0.3, 0.5, 1.0]))

    def forward(self, x):
        return self.c2(self.act(self.bn(self.c1(x))))


def test_high_bias_absorption_keeps_the_function_and_narrows_the_range():
    torch.manual_seed(0)
    model = HighBiasNet(nn.ReLU()).eval()
    data = [_input((16, 3, 8, 8), seed=s, scale=1.0) for s in range(4)]
    reestimate_bn_stats(model, data)  # BN statistics now describe the data: z ~ N(beta, gamma^2)
    context, report = prepare_fp32_model(model, data[0], ["bn_fold", "high_bias_absorption"], data, progress=False)
    summary = report.steps[1].summary
    assert summary["pairs"] == 1
    # absorbed c = max(0, beta - 3 gamma) per channel: 2.5 + 1.8 + 0 + 4.1 + 0.5 + 0
    assert abs(summary["absorbed_total"] - 8.9) < 1e-4
    held_out = _input((16, 3, 8, 8), seed=20, scale=1.0)
    with torch.no_grad():
        assert _relative_error(context.model(held_out), model(held_out)) <= 1e-3
        before = model.act(model.bn(model.c1(held_out)))
        after = context.model.act(context.model.c1(held_out))
    shrink = (before.amax(dim=(0, 2, 3)) - after.amax(dim=(0, 2, 3)))
    torch.testing.assert_close(shrink, torch.tensor([2.5, 1.8, 0.0, 4.1, 0.5, 0.0]), rtol=0, atol=1e-4)


def test_high_bias_absorption_through_relu6_moves_the_bound():
    torch.manual_seed(0)
    model = HighBiasNet(nn.ReLU6()).eval()
    data = [_input((16, 3, 8, 8), seed=s, scale=1.0) for s in range(4)]
    reestimate_bn_stats(model, data)
    context, report = prepare_fp32_model(model, data[0], ["bn_fold", "cle", "high_bias_absorption"], data,
                                         progress=False)
    assert report.steps[2].summary["pairs"] == 1
    held_out = _input((16, 3, 8, 8), seed=20, scale=1.0)
    with torch.no_grad():
        assert _relative_error(context.model(held_out), model(held_out)) <= 1e-3
    gm = context.model
    clip = next(n for n in gm.graph.nodes if n.target is torch.clamp)
    high = activation_of(clip, dict(gm.named_modules())).high
    assert float(high.min()) > 0  # every channel still has a positive range after the shift


def test_absorb_high_biases_skips_layers_without_statistics():
    gm = trace(HighBiasNet(nn.ReLU()).eval())
    from quantlib.batchnorm_fold import fold_batch_norms

    fold_batch_norms(gm)
    result = absorb_high_biases(gm, {})
    assert (len(result.absorbed), result.skipped_no_stats) == (0, 1)
    stats = {"c1": ChannelGaussian(torch.full((6,), 5.0), torch.ones(6))}
    result = absorb_high_biases(gm, stats)
    torch.testing.assert_close(result.absorbed["c1"], torch.full((6,), 2.0))
    torch.testing.assert_close(stats["c1"].mean, torch.full((6,), 3.0))


# ---------------------------------------------------------------------------------------- plots


def test_plot_channel_ranges_writes_a_png(tmp_path):
    low, high = -torch.logspace(-1, 1, 16), torch.logspace(-1, 1, 16)
    path = plot_channel_ranges((low, high), (low / 2, high / 2), tmp_path / "sub" / "ranges.png", title="layer")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
