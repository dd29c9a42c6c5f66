"""quantlib.affine: rounding modes, fake_quantize (on-grid output, clipping, the straight-through
gradient, the exact and fused paths) and the float16 / bfloat16 passthrough.

Every expected number below is derived by hand in the comment next to it, from the
conventions documented in quantlib/affine.py:
    q = clamp(round(x / scale) + zero_point, quant_min, quant_max),  x_hat = (q - zero_point) * scale
"""

from __future__ import annotations

import math

import pytest
import torch

from quantlib.affine import compute_qparams, dequantize, fake_quantize, quantize, round_with_mode
from quantlib.spec import QuantizerSpec, QuantSpecError

from quantlib_affine_helpers import ASYM_U8, SYM_S8, t


# ------------------------------------------------------------------------------------ rounding

TIES = [0.5, 1.5, 2.5, -0.5, -1.5]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("half_even", [0, 2, 2, 0, -2]),  # to the even neighbour (-0.5 -> -0, -1.5 -> -2)
        ("half_up", [1, 2, 3, 0, -1]),  # floor(x + 0.5): ties go towards +inf
        ("half_down", [0, 1, 2, -1, -2]),  # ceil(x - 0.5): ties go towards -inf
    ],
)
def test_rounding_modes_on_exact_ties(mode, expected):
    assert round_with_mode(t(TIES), mode).tolist() == expected
    spec = QuantizerSpec(symmetric=True, signed=True, rounding=mode)
    one, zero = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
    assert quantize(t(TIES), one, zero, spec).tolist() == expected
    assert fake_quantize(t(TIES), one, zero, spec).tolist() == expected
    # the same ties at scale 0.5 (x / 0.5 is exact in binary): x_hat = code * 0.5
    half = torch.tensor([0.5])
    x = t(TIES) * 0.5
    assert fake_quantize(x, half, zero, spec).tolist() == [e * 0.5 for e in expected]


def test_half_even_negative_zero_tie():
    out = round_with_mode(t([-0.5]), "half_even")
    assert out.item() == 0.0 and math.copysign(1.0, out.item()) == -1.0  # -0.0


def test_stochastic_rounding_lands_on_neighbours_with_the_right_mean():
    spec = QuantizerSpec(symmetric=True, signed=True, rounding="stochastic")
    n = 20000
    # x / scale = 0.3 and -1.7: floor/ceil are {0, 1} and {-2, -1}
    x = torch.cat([torch.full((n,), 0.3), torch.full((n,), -1.7)])
    gen = torch.Generator().manual_seed(1234)
    codes = quantize(x, torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32), spec, generator=gen)
    first, second = codes[:n].float(), codes[n:].float()
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert set(second.unique().tolist()) == {-2.0, -1.0}
    # E[floor(v + U)] = v; std of the mean is sqrt(0.21 / 20000) = 0.0032, allow ~6 sigma
    assert first.mean().item() == pytest.approx(0.3, abs=0.02)
    assert second.mean().item() == pytest.approx(-1.7, abs=0.02)
    # fake_quantize with the same seed draws the same noise: x_hat == codes * scale (scale 0.25)
    gen_a = torch.Generator().manual_seed(7)
    gen_b = torch.Generator().manual_seed(7)
    scale = torch.tensor([0.25])
    a = fake_quantize(x * 0.25, scale, torch.tensor([0], dtype=torch.int32), spec, generator=gen_a)
    b = quantize(x * 0.25, scale, torch.tensor([0], dtype=torch.int32), spec, generator=gen_b).float() * 0.25
    assert torch.equal(a, b)


def test_exact_fake_quantize_divides_like_onnx():
    # 0.04330708459019661 / (1/127) lies within an ulp of the tie 5.5: dividing (ONNX QuantizeLinear,
    # quantize()) gives code 6; the fused torch kernel multiplies by 1/scale and may give 5 (documented)
    spec = SYM_S8
    scale, zp = compute_qparams(t([-1.0]), t([1.0]), spec)
    x = t([0.04330708459019661, 1.0])
    exact = fake_quantize(x, scale, zp, spec, exact=True)
    assert (exact / scale).round().tolist() == [6.0, 127.0]
    assert torch.equal(exact, dequantize(quantize(x, scale, zp, spec), scale, zp, spec))
    fused = fake_quantize(x, scale, zp, spec)
    assert (fused - exact).abs().max().item() <= scale.item() * 1.0001


def test_stochastic_rounding_keeps_integers_fixed():
    gen = torch.Generator().manual_seed(0)
    x = t([-3.0, 0.0, 2.0, 5.0]).repeat(100)
    assert torch.equal(round_with_mode(x, "stochastic", gen), x)


def test_unknown_rounding_mode_raises():
    with pytest.raises(QuantSpecError, match="rounding='foo'"):
        round_with_mode(t([0.5]), "foo")


# ------------------------------------------------------------------------- inference fast path


@pytest.mark.parametrize("signed,zero_point", [(False, 3), (False, 128), (True, 0)])
@pytest.mark.parametrize("scale", [0.02, 0.0173, 1 / 3])
def test_inference_per_tensor_path_is_bit_identical_to_the_fused_kernel(signed, zero_point, scale):
    # without autograd, 8-bit per-tensor QDQ runs through torch's int8 kernels; ties and saturation
    # must come out exactly as the fused fake-quantize kernel (and training) gives them
    spec = QuantizerSpec(symmetric=signed, signed=signed)
    k = torch.arange(-300, 300, dtype=torch.float32)
    x = torch.cat([(k + 0.5) * scale, torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 4]).reshape(1, -1, 1, 1)
    s, z = torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32)
    fused = torch.fake_quantize_per_tensor_affine(x, s, z, spec.quant_min, spec.quant_max)
    with torch.no_grad():
        fast = fake_quantize(x, s, z, spec)
    assert torch.equal(fast, fused)
    with_grad = fake_quantize(x.clone().requires_grad_(), s, z, spec)
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), fused)


# ------------------------------------------------------------------- fake_quantize and the STE


def _asym_encoding():
    # [-1, 3] asymmetric uint8: scale 4/255, zero_point 64 (see test_asymmetric_uint8_scale_and_zero_point);
    # representable range [(0-64)*4/255, (255-64)*4/255] = [-1.003922, 2.996078]
    scale, zp = compute_qparams(t([-1.0]), t([3.0]), ASYM_U8)
    return scale, zp


@pytest.mark.parametrize("rounding", ["half_even", "half_up", "half_down"])
def test_fake_quantize_output_on_grid_close_inside_and_clipped_outside(rounding):
    spec = ASYM_U8.replace(rounding=rounding)
    scale, zp = _asym_encoding()
    s = scale.item()
    lo, hi = (0 - 64) * s, (255 - 64) * s
    assert lo == pytest.approx(-1.003922, abs=1e-6) and hi == pytest.approx(2.996078, abs=1e-6)
    x = torch.linspace(-3.0, 5.0, 4001)
    out = fake_quantize(x, scale, zp, spec)
    codes = out / s + 64
    # on the grid: x_hat / scale + zero_point is an integer code in [0, 255]
    assert (codes - codes.round()).abs().max().item() < 1e-3
    assert codes.round().min().item() == 0 and codes.round().max().item() == 255
    inside = (x >= lo) & (x <= hi)
    assert ((out - x).abs()[inside] <= s / 2 + 1e-6).all()
    assert torch.allclose(out[x < lo - s], torch.tensor(lo), atol=1e-6)
    assert torch.allclose(out[x > hi + s], torch.tensor(hi), atol=1e-6)


@pytest.mark.parametrize("rounding", ["half_even", "half_up"])  # fused kernel and generic path
def test_fake_quantize_straight_through_gradient(rounding):
    spec = ASYM_U8.replace(rounding=rounding)
    scale, zp = _asym_encoding()
    x = t([-3.0, -1.5, -0.5, 0.0, 1.0, 2.5, 2.9, 3.5, 5.0]).requires_grad_(True)
    fake_quantize(x, scale, zp, spec).sum().backward()
    # gradient 1 inside [-1.0039, 2.9961], 0 outside
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_fake_quantize_per_channel_gradient_mask():
    spec = QuantizerSpec(symmetric=True, signed=True, granularity="per_channel", axis=0)
    scale = t([0.01, 0.1])  # ranges [-1.28, 1.27] and [-12.8, 12.7]
    zp = torch.zeros(2, dtype=torch.int32)
    x = t([[0.5, 2.0], [0.5, 20.0]]).requires_grad_(True)
    fake_quantize(x, scale, zp, spec).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_fake_quantize_learnable_scale_gets_a_gradient():
    scale, zp = _asym_encoding()
    scale = scale.clone().requires_grad_(True)
    x = torch.linspace(-2.0, 4.0, 101)
    out = fake_quantize(x, scale, zp, ASYM_U8)
    out.pow(2).sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad).all() and scale.grad.abs().item() > 0


@pytest.mark.parametrize("dtype, target", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_float_passthrough_equals_cast_round_trip(dtype, target):
    spec = QuantizerSpec(dtype=dtype)
    assert spec.is_float
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2000, generator=gen) * 100).requires_grad_(True)
    out = fake_quantize(x, torch.empty(0), torch.empty(0, dtype=torch.int32), spec)
    assert torch.equal(out, x.detach().to(target).float())
    assert not torch.equal(out, x.detach())  # it really rounds
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity gradient


def test_float16_passthrough_half_float_reference():
    spec = QuantizerSpec(dtype="float16")
    x = t([1.0 + 2.0**-12, 70000.0, 1e-8, -3.14159])
    out = fake_quantize(x, torch.empty(0), torch.empty(0, dtype=torch.int32), spec)
    # 1 + 2^-12 is below half of fp16's 2^-10 ulp -> 1.0; 70000 overflows fp16 -> inf; 1e-8 underflows -> 0
    assert out.tolist()[:3] == [1.0, math.inf, 0.0]
    assert torch.equal(out, x.half().float())
