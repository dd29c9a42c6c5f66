"""quantlib.affine: per-channel and per-block (grouped) scales: grouping, qparam expansion and
fake-quantize per group.

Every expected number below is derived by hand in the comment next to it, from the
conventions documented in quantlib/affine.py:
    q = clamp(round(x / scale) + zero_point, quant_min, quant_max),  x_hat = (q - zero_point) * scale
"""

from __future__ import annotations

import pytest
import torch

from quantlib.affine import (
    block_count,
    compute_qparams,
    dequantize,
    expand_qparam,
    fake_quantize,
    group_view,
    num_groups,
    quantize,
)
from quantlib.spec import QuantizerSpec, QuantSpecError

from quantlib_affine_helpers import SYM_S8, t


# ----------------------------------------------------------------------------- granularity


def test_per_channel_scales_follow_the_channel_ranges():
    spec = QuantizerSpec(symmetric=True, signed=True, granularity="per_channel", axis=0)
    w = t([[-1.0, 0.5, 0.25], [0.2, -2.54, 1.0], [0.127, 0.0635, -0.1]])
    grouped = group_view(w, spec)
    assert grouped.shape == (3, 3)
    lo, hi = torch.aminmax(grouped, dim=1)
    scale, zp = compute_qparams(lo, hi, spec)
    # absmax per row: 1, 2.54, 0.127 -> scales 1/127, 0.02, 0.001
    assert scale.tolist() == pytest.approx([1 / 127, 0.02, 0.001], rel=1e-6)
    assert zp.tolist() == [0, 0, 0]
    out = fake_quantize(w, scale, zp, spec)
    # row 1: 1.0/0.02 = 50 exactly -> 1.0; row 2: -0.1/0.001 = -100 -> -0.1; 0.0635/0.001 = 63.5 -> 64 -> 0.064
    assert out[1, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert out[2, 2].item() == pytest.approx(-0.1, abs=1e-6)
    assert out[2, 1].item() == pytest.approx(0.064, abs=1e-6)
    err = (out - w).abs()
    assert (err <= scale.reshape(3, 1) / 2 + 1e-7).all()


def test_per_channel_axis_is_respected():
    # axis=1 on a [2, 3] tensor: one scale per column
    spec = QuantizerSpec(symmetric=True, signed=True, granularity="per_channel", axis=1)
    x = t([[1.27, -0.127, 12.7], [-0.5, 0.05, 3.0]])
    assert num_groups(x.shape, spec) == 3
    grouped = group_view(x, spec)
    assert torch.equal(grouped, t([[1.27, -0.5], [-0.127, 0.05], [12.7, 3.0]]))
    lo, hi = torch.aminmax(grouped, dim=1)
    scale, zp = compute_qparams(lo, hi, spec)
    # column absmax 1.27, 0.127, 12.7 -> scales 0.01, 0.001, 0.1
    assert scale.tolist() == pytest.approx([0.01, 0.001, 0.1], rel=1e-6)
    assert expand_qparam(scale, x.shape, spec).shape == (1, 3)
    out = fake_quantize(x, scale, zp, spec)
    # -0.5/0.01 = -50 -> -0.5; 0.05/0.001 = 50 -> 0.05; 3.0/0.1 = 30 -> 3.0
    assert torch.allclose(out, x, atol=1e-6)
    # a single shared (per-tensor) scale 0.1 would destroy the small column: 0.05 -> 0.0
    per_tensor = fake_quantize(x, torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), SYM_S8)
    assert per_tensor[1, 1].item() == 0.0


def test_per_channel_non_fused_path_matches_fused():
    # half_up uses the generic path, half_even the fused kernel; away from ties they agree
    spec = QuantizerSpec(symmetric=True, signed=True, granularity="per_channel", axis=0)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    lo, hi = torch.aminmax(group_view(w, spec), dim=1)
    scale, zp = compute_qparams(lo, hi, spec)
    fused = fake_quantize(w, scale, zp, spec)
    generic = fake_quantize(w, scale, zp, spec.replace(rounding="half_up"))
    assert torch.allclose(fused, generic, atol=1e-6)


# ----------------------------------------------------------------------------------- per block


def test_per_block_groups_and_one_hand_checked_block():
    spec = QuantizerSpec(bitwidth=4, symmetric=True, signed=True, granularity="per_block", block_size=3)
    w = t([[0.7, -0.35, 0.1, 1.4, 0.2, -0.2],
           [2.1, 0.5, -0.8, -0.07, 0.0, 0.03]])
    # 6 input channels / block 3 = 2 blocks per row -> 2 * 2 = 4 groups, row-major (row, block)
    assert block_count(w.shape, spec) == 2
    assert num_groups(w.shape, spec) == 4
    grouped = group_view(w, spec)
    assert grouped.shape == (4, 3)
    assert grouped[2].tolist() == pytest.approx([2.1, 0.5, -0.8])
    lo, hi = torch.aminmax(grouped, dim=1)
    scale, zp = compute_qparams(lo, hi, spec)
    # absmax per block / 7: 0.7/7 = 0.1, 1.4/7 = 0.2, 2.1/7 = 0.3, 0.07/7 = 0.01
    assert scale.shape == (4,)
    assert scale.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.01], rel=1e-6)
    expanded = expand_qparam(scale, w.shape, spec)
    assert expanded.shape == (2, 6)
    assert expanded[1].tolist() == pytest.approx([0.3, 0.3, 0.3, 0.01, 0.01, 0.01], rel=1e-6)
    out = fake_quantize(w, scale, zp, spec)
    # block (row 1, block 0), scale 0.3: 2.1 -> 7 -> 2.1; 0.5 -> 1.667 -> 2 -> 0.6; -0.8 -> -2.667 -> -3 -> -0.9
    assert out[1, :3].tolist() == pytest.approx([2.1, 0.6, -0.9], abs=1e-6)
    # block (row 0, block 1), scale 0.2: 1.4 -> 7; 0.2 -> 1; -0.2 -> -1
    assert out[0, 3:].tolist() == pytest.approx([1.4, 0.2, -0.2], abs=1e-6)
    codes = quantize(w, scale, zp, spec)
    assert codes[1, :3].tolist() == [7, 2, -3]
    assert torch.allclose(dequantize(codes, scale, zp, spec), out, atol=1e-7)


def test_per_block_conv_weight_shape():
    spec = QuantizerSpec(symmetric=True, signed=True, granularity="per_block", block_size=4)
    w = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    # 8 / 4 = 2 blocks per output channel -> 4 * 2 = 8 scales
    assert num_groups(w.shape, spec) == 8
    grouped = group_view(w, spec)
    assert grouped.shape == (8, 4 * 9)
    # group 3 = output channel 1, input channels 4..7
    assert torch.equal(grouped[3], w[1, 4:8].reshape(-1))
    lo, hi = torch.aminmax(grouped, dim=1)
    scale, zp = compute_qparams(lo, hi, spec)
    assert expand_qparam(scale, w.shape, spec).shape == (4, 8, 1, 1)
    out = fake_quantize(w, scale, zp, spec)
    assert (out[1, 4:8] - w[1, 4:8]).abs().max() <= scale[3] / 2 + 1e-7
    # block bigger than the channels: one block per row
    assert block_count((4, 2, 3, 3), spec) == 1


def test_per_block_block_size_must_divide_channels():
    spec = QuantizerSpec(symmetric=True, signed=True, granularity="per_block", block_size=3)
    with pytest.raises(QuantSpecError, match="block_size=3 does not divide the 8 input channels"):
        block_count((4, 8), spec)
    with pytest.raises(QuantSpecError, match="per_block needs a tensor with an input-channel dimension"):
        block_count((8,), spec)
