"""Straight-through gradients and LSQ range learning (quantlib.qat.ste, quantlib.qat.range_learning)."""

from __future__ import annotations

import math

import pytest
import torch

from quantlib.affine import compute_qparams
from quantlib.qat import LearnableQuantizer, TrainConfig, disable_range_learning, enable_range_learning, train
from quantlib.qat.data import training_loader
from quantlib.qat.ste import fake_quantize_ste, round_ste, scale_gradient
from quantlib.quantizer import FakeQuantizer
from quantlib.spec import QuantizerSpec

from test_quantlib_qat_fixtures import accuracy, digits, quantized, trained_mlp

UINT4 = QuantizerSpec(bitwidth=4, symmetric=False, signed=False)


def _quantizer(cls=FakeQuantizer, low=-1.0, high=2.0, **kwargs) -> FakeQuantizer:
    q = FakeQuantizer(UINT4, name="q")
    q.set_qparams(*compute_qparams(torch.tensor([low]), torch.tensor([high]), UINT4))
    return q if cls is FakeQuantizer else LearnableQuantizer.from_quantizer(q, **kwargs)


@pytest.mark.parametrize("cls", [FakeQuantizer, LearnableQuantizer])
def test_ste_passes_gradients_inside_the_range_and_clips_outside(cls):
    q = _quantizer(cls)
    low, high = (float(v.detach()) for v in q.representable_range())
    x = torch.tensor([low - 0.5, low + 0.13, 0.0, 0.71, high - 0.02, high + 0.4, 7.0], requires_grad=True)
    out = q(x)
    out.backward(torch.ones_like(out))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # forward is the rounded, clipped value: outside the range it saturates
    assert out[0].item() == pytest.approx(low) and out[-1].item() == pytest.approx(high)
    assert abs(out[3].item() - 0.71) <= q.scale.item() / 2 + 1e-6


def test_round_ste_and_scale_gradient():
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0, -2.0] and x.grad.tolist() == [1.0, 1.0, 1.0]
    s = torch.tensor(3.0, requires_grad=True)
    z = scale_gradient(s, 0.25)
    (z * 2).backward()
    assert z.item() == 3.0 and s.grad.item() == pytest.approx(0.5)


def test_lsq_scale_gradient_matches_the_paper():
    """d x_hat / d s = round(x/s) - x/s inside the grid, q_min - z / q_max - z outside (Esser et al. 2020)."""
    q = _quantizer(LearnableQuantizer, grad_scale=False, log_scale=False)
    s, z = q.scale.item(), float(q.zero_point.item())
    x = torch.tensor([0.37, -0.61, 1.234, -5.0, 9.0])
    q(x).sum().backward()
    expected = 0.0
    for v in x.tolist():
        code = round(v / s) + z
        if code < 0:
            expected += 0 - z
        elif code > 15:
            expected += 15 - z
        else:
            expected += round(v / s) - v / s
    assert q.scale.grad.item() == pytest.approx(expected, abs=1e-5)
    # the learned offset only hears from clipped values: -s for each of them
    assert q.offset.grad.item() == pytest.approx(-2 * s, rel=1e-5)
    # in the log domain (the default) the parameter is log s: its gradient is s times the LSQ one
    in_log = _quantizer(LearnableQuantizer, grad_scale=False)
    in_log(x).sum().backward()
    assert in_log.scale_parameter is in_log.log_scale and not isinstance(in_log.scale, torch.nn.Parameter)
    assert in_log.log_scale.grad.item() == pytest.approx(s * expected, abs=1e-5)


def test_lsq_gradient_scale_factor():
    plain, scaled = _quantizer(LearnableQuantizer, grad_scale=False), _quantizer(LearnableQuantizer, grad_scale=True)
    x = torch.linspace(-2, 3, 40).reshape(4, 10)  # 4 samples of 10 features, per-tensor: N = 10
    plain(x).sum().backward()
    scaled(x).sum().backward()
    assert scaled.log_scale.grad.item() == pytest.approx(plain.log_scale.grad.item() / math.sqrt(10 * 15), rel=1e-5)


def test_learnable_quantizer_without_gradient_equals_the_plain_one_and_converts_back():
    plain = _quantizer()
    learnable = LearnableQuantizer.from_quantizer(plain)
    x = torch.randn(1000) * 2
    with torch.no_grad():
        assert torch.equal(learnable(x), plain(x))
    with torch.no_grad():
        learnable.log_scale.add_(math.log(1.1))
        learnable.offset.add_(1.4)
    back = learnable.to_fake_quantizer()
    assert type(back) is FakeQuantizer and back.zero_point.item() == plain.zero_point.item() + 1
    assert back.scale.item() == pytest.approx(plain.scale.item() * 1.1)
    with torch.no_grad():
        assert torch.equal(back(x), learnable(x))
    assert back.encoding() == learnable.encoding()


def test_version_follows_in_place_updates_so_cached_weights_refresh():
    sim = quantized(trained_mlp())
    enable_range_learning(sim.model)
    layer = sim.weight_modules()["0"]
    assert isinstance(layer.weight_quantizer, LearnableQuantizer)
    with torch.no_grad():
        before = layer.quantized_weight().clone()
        version = layer.weight_quantizer.version
        layer.weight_quantizer.log_scale.add_(math.log(1.5))  # what an optimizer step does
        assert layer.weight_quantizer.version > version
        after = layer.quantized_weight()
    assert not torch.equal(before, after)


def test_enable_and_disable_keep_links_outputs_and_encodings():
    sim = quantized(trained_mlp())
    x = digits()[1][0]
    with torch.no_grad():
        reference = sim.model(x)
    encodings = sim.encodings()
    names = enable_range_learning(sim.model)
    assert len(names) == len(sim.quantizers()) == 5
    for module in sim.weight_modules().values():
        if module.input_quantizer_ref is not None:
            assert module.input_quantizer_ref[0] in sim.activation_quantizers().values()
    with torch.no_grad():
        assert torch.equal(sim.model(x), reference)
    assert sim.encodings() == encodings
    assert len(disable_range_learning(sim.model)) == 5
    assert not any(isinstance(q, LearnableQuantizer) for q in sim.quantizers().values())
    with torch.no_grad():
        assert torch.equal(sim.model(x), reference)
    assert sim.encodings() == encodings


def test_power_of_two_and_disabled_quantizers_are_not_made_learnable():
    sim = quantized(trained_mlp())
    first = next(iter(sim.activation_quantizers().values()))
    first.spec = first.spec.replace(scale_type="power_of_two")
    names = enable_range_learning(sim.model, weights=False)
    assert len(names) == len(sim.activation_quantizers()) - 1
    assert not any(isinstance(q, LearnableQuantizer) for q in sim.param_quantizers().values())


def test_lsq_scales_receive_gradients_change_and_improve_the_quantized_model():
    model = trained_mlp()
    sim = quantized(model)
    ptq = accuracy(sim.model)
    enable_range_learning(sim.model)
    scales = {n: q.scale_parameter.detach().clone() for n, q in sim.quantizers().items()}
    train_set, _ = digits()
    config = TrainConfig(epochs=4, optimizer="adam", lr=1e-3, quantizer_lr=1e-2, loss="task")
    seen: dict[str, float] = {}

    def record_gradients(m, step):  # after the step the .grad of the last backward is still there
        for name, q in sim.quantizers().items():
            seen[name] = seen.get(name, 0.0) + float(q.scale_parameter.grad.abs().sum())

    train(sim.model, training_loader(train_set, 128, seed=0), config, step_hooks=[record_gradients], progress=False)
    assert set(seen) == set(scales) and all(value > 0 for value in seen.values())
    for name, q in sim.quantizers().items():
        assert not torch.equal(q.scale_parameter.detach(), scales[name]), name
        q.encoding()
        assert torch.allclose(q.scale, q.log_scale.exp())  # the buffer follows the parameter
    disable_range_learning(sim.model)
    qat = accuracy(sim.model)
    assert qat > ptq + 10.0, (ptq, qat)  # 2-bit weights / 3-bit activations: PTQ loses a lot, QAT wins it back


@pytest.mark.parametrize("spec", [UINT4, QuantizerSpec(bitwidth=4, symmetric=True, signed=True, granularity="per_channel", axis=1)],
                         ids=["per_tensor_asym", "per_channel_sym"])
def test_fused_learnable_kernels_equal_the_reference_ste(spec):
    """The torch LSQ kernels the quantizer uses compute fake_quantize_ste's values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(8, 6, 5, 5) * 2
    base = FakeQuantizer(spec, name="q")
    base.calibrate_from(x * 0.7)  # some values clip
    fused = LearnableQuantizer.from_quantizer(base, log_scale=False)
    xa = x.clone().requires_grad_()
    out = fused(xa)
    grad = torch.randn_like(out)
    out.backward(grad)
    scale = base.scale.clone().requires_grad_()
    zero_point = base.zero_point.float().requires_grad_()
    xb = x.clone().requires_grad_()
    factor = fused.gradient_factor(x)
    reference = fake_quantize_ste(xb, scale_gradient(scale, factor), scale_gradient(zero_point, factor), spec)
    reference.backward(grad)
    assert torch.equal(out, reference)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)
    assert torch.allclose(fused.scale.grad, scale.grad, rtol=1e-4, atol=1e-6)
    if fused.offset is not None:
        assert torch.allclose(fused.offset.grad, zero_point.grad, rtol=1e-4, atol=1e-6)
