"""quantlib.spec / quantlib.affine: integer grids, scale and zero point, power-of-two scales,
AIMET offsets, and the spec / config errors that name the bad field.

Every expected number below is derived by hand in the comment next to it, from the
conventions documented in quantlib/affine.py:
    q = clamp(round(x / scale) + zero_point, quant_min, quant_max),  x_hat = (q - zero_point) * scale
"""

from __future__ import annotations

import pytest
import torch

from quantlib.affine import (
    aimet_offset,
    compute_qparams,
    container_dtype,
    fake_quantize,
    is_power_of_two,
    quantize,
    zero_point_from_aimet_offset,
)
from quantlib.config import load_config, parse_config
from quantlib.spec import ObserverSpec, QuantizerSpec, QuantSpecError, spec_from_dict

from quantlib_affine_helpers import ASYM_U8, SYM_S8, t


def qparams(lo: float, hi: float, spec: QuantizerSpec) -> tuple[float, int]:
    scale, zero_point = compute_qparams(torch.tensor([lo]), torch.tensor([hi]), spec)
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    assert scale.shape == (1,) and zero_point.shape == (1,)
    return scale.item(), int(zero_point.item())


# ------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize(
    "kwargs, qmin, qmax",
    [
        ({"bitwidth": 8, "signed": False}, 0, 255),
        ({"bitwidth": 8, "signed": True}, -128, 127),
        ({"bitwidth": 8, "signed": True, "narrow_range": True}, -127, 127),
        ({"bitwidth": 8, "signed": False, "narrow_range": True}, 1, 255),
        ({"bitwidth": 4, "signed": True}, -8, 7),
        ({"bitwidth": 4, "signed": False}, 0, 15),
        ({"bitwidth": 2, "signed": True}, -2, 1),
        ({"bitwidth": 16, "signed": True}, -32768, 32767),
        ({"bitwidth": 16, "signed": False}, 0, 65535),
    ],
)
def test_integer_grid_bounds(kwargs, qmin, qmax):
    spec = QuantizerSpec(**kwargs)
    assert (spec.quant_min, spec.quant_max) == (qmin, qmax)


@pytest.mark.parametrize(
    "kwargs, dtype",
    [
        ({"bitwidth": 4, "signed": True}, torch.int8),
        ({"bitwidth": 8, "signed": True}, torch.int8),
        ({"bitwidth": 8, "signed": False}, torch.uint8),
        ({"bitwidth": 12, "signed": True}, torch.int16),
        ({"bitwidth": 16, "signed": False}, torch.uint16),
    ],
)
def test_container_dtype(kwargs, dtype):
    assert container_dtype(QuantizerSpec(**kwargs)) is dtype


# ---------------------------------------------------------------------- scale and zero point


def test_asymmetric_uint8_scale_and_zero_point():
    # x in [-1, 3]: scale = (3 - (-1)) / (255 - 0) = 4/255 = 0.0156862745...
    # zero_point = 0 - round(-1 / (4/255)) = round(63.75) = 64
    scale, zp = qparams(-1.0, 3.0, ASYM_U8)
    assert scale == pytest.approx(4 / 255, rel=1e-6)
    assert zp == 64
    # representable range: (0 - 64) * 4/255 = -1.00392, (255 - 64) * 4/255 = 2.99608
    x = t([-1.0, 0.0, 3.0])
    codes = quantize(x, torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32), ASYM_U8)
    # -1/(4/255) = -63.75 -> -64 -> +64 = 0; 0 -> 64 (zero exactly representable); 3/(4/255) = 191.25 -> 191 -> 255
    assert codes.tolist() == [0, 64, 255]
    assert codes.dtype == torch.int32


def test_asymmetric_range_is_widened_to_include_zero():
    # x in [0.5, 2.55] is widened to [0, 2.55]: scale = 2.55/255 = 0.01, zero_point = 0 - round(0) = 0
    scale, zp = qparams(0.5, 2.55, ASYM_U8)
    assert scale == pytest.approx(0.01, rel=1e-6)
    assert zp == 0
    # x in [-2.55, -0.5] -> [-2.55, 0]: scale 0.01, zero_point = 0 - round(-255) = 255
    scale, zp = qparams(-2.55, -0.5, ASYM_U8)
    assert scale == pytest.approx(0.01, rel=1e-6)
    assert zp == 255


def test_signed_symmetric_int8_scale():
    # absmax = max(|-2|, |1.27|) = 2 -> scale = 2/127 = 0.015748..., zero_point 0
    scale, zp = qparams(-2.0, 1.27, SYM_S8)
    assert scale == pytest.approx(2 / 127, rel=1e-6)
    assert zp == 0
    # -2 / (2/127) = -127 -> -127 (the extra -128 code stays available without narrow range)
    codes = quantize(t([-2.0, 1.27, -2.1]), torch.tensor([scale]), torch.tensor([0], dtype=torch.int32), SYM_S8)
    # 1.27/(2/127) = 80.645 -> 81;  -2.1/(2/127) = -133.35 -> clamped to -128
    assert codes.tolist() == [-127, 81, -128]


def test_unsigned_symmetric_scale_and_zero_point():
    spec = QuantizerSpec(bitwidth=8, symmetric=True, signed=False)
    # scale = max / (255 - 0) = 5.1/255 = 0.02; zero_point = quant_min = 0 (negative side dropped)
    scale, zp = qparams(-1.0, 5.1, spec)
    assert scale == pytest.approx(0.02, rel=1e-6)
    assert zp == 0
    out = fake_quantize(t([-1.0, 0.03, 5.1, 6.0]), torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32), spec)
    # -1 -> clipped to 0; 0.03/0.02 = 1.5 -> half-even 2 -> 0.04; 5.1 -> 255 -> 5.1; 6.0 -> clipped to 5.1
    assert out.tolist() == pytest.approx([0.0, 0.04, 5.1, 5.1], abs=1e-6)


def test_narrow_range_signed_grid():
    spec = QuantizerSpec(bitwidth=8, symmetric=True, signed=True, narrow_range=True)
    assert (spec.quant_min, spec.quant_max) == (-127, 127)
    # absmax 1.27 -> scale = 1.27/127 = 0.01
    scale, zp = qparams(-1.27, 0.5, spec)
    assert scale == pytest.approx(0.01, rel=1e-6) and zp == 0
    s, z = torch.tensor([scale]), torch.tensor([0], dtype=torch.int32)
    # -5 / 0.01 = -500 -> clamped to -127 (not -128) -> -1.27;  +5 -> 127 -> 1.27
    assert fake_quantize(t([-5.0, 5.0]), s, z, spec).tolist() == pytest.approx([-1.27, 1.27], abs=1e-6)
    assert quantize(t([-5.0, 5.0]), s, z, spec).tolist() == [-127, 127]
    # the full-range grid keeps -128: -5 -> -128 -> -1.28
    assert fake_quantize(t([-5.0]), s, z, SYM_S8).tolist() == pytest.approx([-1.28], abs=1e-6)


def test_narrow_range_unsigned_asymmetric():
    spec = QuantizerSpec(bitwidth=8, symmetric=False, signed=False, narrow_range=True)
    # grid [1, 255]: x in [0, 2.54] -> scale = 2.54/(255-1) = 0.01, zero_point = 1 - round(0/0.01) = 1
    scale, zp = qparams(0.0, 2.54, spec)
    assert scale == pytest.approx(0.01, rel=1e-6)
    assert zp == 1


def test_4bit_grids():
    # signed symmetric int4: absmax 0.7 -> scale 0.7/7 = 0.1, grid [-8, 7]
    s4 = QuantizerSpec(bitwidth=4, symmetric=True, signed=True)
    scale, zp = qparams(-0.7, 0.3, s4)
    assert scale == pytest.approx(0.1, rel=1e-6) and zp == 0
    out = fake_quantize(t([-0.9, -0.7, 0.26, 0.9]), torch.tensor([scale]), torch.tensor([0], dtype=torch.int32), s4)
    # -0.9 -> -9 -> clamp -8 -> -0.8; -0.7 -> -7; 0.26 -> 2.6 -> 3 -> 0.3; 0.9 -> 9 -> clamp 7 -> 0.7
    assert out.tolist() == pytest.approx([-0.8, -0.7, 0.3, 0.7], abs=1e-6)
    # asymmetric uint4: x in [-1, 2] -> scale = 3/15 = 0.2, zero_point = 0 - round(-1/0.2) = 5
    u4 = QuantizerSpec(bitwidth=4, symmetric=False, signed=False)
    scale, zp = qparams(-1.0, 2.0, u4)
    assert scale == pytest.approx(0.2, rel=1e-6) and zp == 5
    codes = quantize(t([-1.0, 0.0, 2.0, 3.0]), torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32), u4)
    # -1 -> -5 + 5 = 0; 0 -> 5; 2 -> 10 + 5 = 15; 3 -> 15 + 5 = 20 -> clamp 15
    assert codes.tolist() == [0, 5, 15, 15]


def test_16bit_grids():
    # asymmetric uint16: x in [-1, 3] -> scale = 4/65535, zero_point = round(65535/4) = round(16383.75) = 16384
    u16 = QuantizerSpec(bitwidth=16, symmetric=False, signed=False)
    scale, zp = qparams(-1.0, 3.0, u16)
    assert scale == pytest.approx(4 / 65535, rel=1e-6)
    assert zp == 16384
    x = torch.linspace(-1.0, 2.99, 1001)
    out = fake_quantize(x, torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32), u16)
    assert (out - x).abs().max().item() <= scale / 2 * 1.001
    # signed symmetric int16: absmax 3.2767 -> scale = 3.2767/32767 = 1e-4
    s16 = QuantizerSpec(bitwidth=16, symmetric=True, signed=True)
    scale, zp = qparams(-1.0, 3.2767, s16)
    assert scale == pytest.approx(1e-4, rel=1e-6) and zp == 0
    codes = quantize(t([-3.2768, 1.0, 4.0]), torch.tensor([scale]), torch.tensor([0], dtype=torch.int32), s16)
    # -3.2768/1e-4 = -32768; 1.0 -> 10000; 4.0 -> 40000 -> clamp 32767
    assert codes.tolist() == [-32768, 10000, 32767]


def test_constant_zero_range_gives_positive_scale():
    # min = max = 0: the scale is clamped to 1e-8 instead of 0 (no division by zero)
    for spec in (ASYM_U8, SYM_S8, QuantizerSpec(symmetric=True, signed=False)):
        scale, zp = qparams(0.0, 0.0, spec)
        assert scale == pytest.approx(1e-8, rel=1e-6)
        out = fake_quantize(t([0.0, 1e-9]), torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32), spec)
        assert torch.isfinite(out).all()
        assert out[0].item() == 0.0


# ---------------------------------------------------------------------------- power of two


@pytest.mark.parametrize(
    "lo, hi, spec, expected",
    [
        # asym uint8 [-1, 3]: 4/255 = 0.01569 = 2^-5.99 -> rounded up to 2^-5 = 0.03125
        (-1.0, 3.0, QuantizerSpec(scale_type="power_of_two"), 2.0**-5),
        # sym int8 absmax 1: 1/127 = 0.007874 = 2^-6.99 -> 2^-6 = 0.015625
        (-1.0, 0.5, QuantizerSpec(symmetric=True, signed=True, scale_type="power_of_two"), 2.0**-6),
        # sym int8 absmax 127/64: 1/64 is already a power of two and stays 2^-6
        (-127 / 64, 0.0, QuantizerSpec(symmetric=True, signed=True, scale_type="power_of_two"), 2.0**-6),
        # sym int8 absmax 1000: 7.874 -> 2^3 = 8
        (-1000.0, 10.0, QuantizerSpec(symmetric=True, signed=True, scale_type="power_of_two"), 8.0),
    ],
)
def test_power_of_two_scale(lo, hi, spec, expected):
    scale, _ = qparams(lo, hi, spec)
    float_scale, _ = qparams(lo, hi, spec.replace(scale_type="float"))
    assert scale == expected
    assert is_power_of_two(scale)
    assert scale >= float_scale


def test_power_of_two_asymmetric_zero_point():
    # scale 2^-5 = 0.03125 (see above); zero_point = 0 - round(-1 / 0.03125) = 32
    _, zp = qparams(-1.0, 3.0, QuantizerSpec(scale_type="power_of_two"))
    assert zp == 32


def test_power_of_two_per_channel_scales_are_each_powers_of_two():
    spec = QuantizerSpec(symmetric=True, signed=True, granularity="per_channel", scale_type="power_of_two")
    lo, hi = t([-0.3, -5.0, -0.01]), t([0.2, 1.0, 0.02])
    scale, _ = compute_qparams(lo, hi, spec)
    float_scale, _ = compute_qparams(lo, hi, spec.replace(scale_type="float"))
    # 0.3/127 = 2^-8.73 -> 2^-8; 5/127 = 2^-4.67 -> 2^-4; 0.02/127 = 2^-12.63 -> 2^-12
    assert scale.tolist() == [2.0**-8, 2.0**-4, 2.0**-12]
    assert all(is_power_of_two(s) for s in scale.tolist())
    assert (scale >= float_scale).all()


def test_is_power_of_two():
    assert is_power_of_two(1.0) and is_power_of_two(0.125) and is_power_of_two(1024.0)
    assert not is_power_of_two(0.0) and not is_power_of_two(3.0) and not is_power_of_two(-2.0)


# ------------------------------------------------------------------------- AIMET offsets


@pytest.mark.parametrize(
    "spec, zero_point, offset",
    [
        (ASYM_U8, 64, -64),  # unsigned: offset = -zero_point
        (SYM_S8, 0, -128),  # signed: codes shifted by 128 -> offset = -(0 + 128)
        (QuantizerSpec(bitwidth=4, signed=True), -3, -5),  # -(-3 + 8)
    ],
)
def test_aimet_offset_round_trip(spec, zero_point, offset):
    zp = torch.tensor([zero_point], dtype=torch.int32)
    assert aimet_offset(zp, spec).tolist() == [offset]
    assert zero_point_from_aimet_offset(aimet_offset(zp, spec), spec).tolist() == [zero_point]


# ----------------------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bitwidth": 1}, r"bitwidth=1 is not supported; use 2\.\.16"),
        ({"bitwidth": 17}, r"bitwidth=17 is not supported"),
        ({"bitwidth": 8.0}, r"bitwidth=8\.0 must be an integer"),
        ({"bitwidth": True}, r"bitwidth=True must be an integer"),
        ({"rounding": "foo"}, r"rounding='foo' is not supported; use one of half_even, half_up, half_down, stochastic"),
        ({"granularity": "per_block"}, r"granularity=per_block needs block_size >= 1"),
        ({"granularity": "per_block", "block_size": 0}, r"granularity=per_block needs block_size >= 1"),
        ({"granularity": "per_row"}, r"granularity='per_row' is not supported"),
        ({"dtype": "int4"}, r"dtype='int4' is not supported"),
        ({"scale_type": "log"}, r"scale_type='log' is not supported"),
        ({"observer": {"name": "minmax"}}, r"observer must be an ObserverSpec"),
    ],
)
def test_quantizer_spec_errors_name_the_field(kwargs, message):
    with pytest.raises(QuantSpecError, match=message):
        QuantizerSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "kmeans"}, r"observer\.name='kmeans' is not supported"),
        ({"combine": "min"}, r"observer\.combine='min' is not supported"),
        ({"momentum": 1.0}, r"observer\.momentum=1\.0 must be in \[0, 1\)"),
        ({"percentile": 50.0}, r"observer\.percentile=50\.0 must be in \(50, 100\]"),
        ({"num_bins": 8}, r"observer\.num_bins=8 must be at least 16"),
        ({"num_candidates": 1}, r"observer\.num_candidates=1 must be at least 2"),
    ],
)
def test_observer_spec_errors_name_the_field(kwargs, message):
    with pytest.raises(QuantSpecError, match=message):
        ObserverSpec(**kwargs)


def test_quant_spec_error_is_a_value_error():
    assert issubclass(QuantSpecError, ValueError)


def test_spec_from_dict_unknown_keys_and_bad_values_name_the_path():
    with pytest.raises(QuantSpecError, match=r"^quantizer\.bitwdth is not a quantizer setting; valid keys: .*bitwidth"):
        spec_from_dict({"bitwdth": 4})
    with pytest.raises(QuantSpecError, match=r"^defaults\.activation\.observer\.nme is not an observer setting"):
        spec_from_dict({"observer": {"nme": "minmax"}}, where="defaults.activation")
    with pytest.raises(QuantSpecError, match=r"^op_types\.Conv\.output\.rounding='foo' is not supported"):
        spec_from_dict({"rounding": "foo"}, where="op_types.Conv.output")
    with pytest.raises(QuantSpecError, match=r"^quantizer\.observer\.percentile=10 must be in"):
        spec_from_dict({"observer": {"name": "percentile", "percentile": 10}})
    with pytest.raises(QuantSpecError, match=r"observer must be a name or a mapping"):
        spec_from_dict({"observer": 3})


def test_spec_from_dict_merges_onto_base():
    base = QuantizerSpec(bitwidth=8, symmetric=True, signed=True, observer=ObserverSpec(name="mse", num_candidates=10))
    spec = spec_from_dict({"bitwidth": 4, "observer": "percentile"}, base)
    assert spec.bitwidth == 4 and spec.symmetric and spec.signed
    assert spec.observer.name == "percentile" and spec.observer.num_candidates == 10
    assert spec_from_dict(spec.to_dict()) == spec
    assert base.replace(observer={"percentile": 99.0}).observer == ObserverSpec(name="mse", num_candidates=10, percentile=99.0)


def test_config_errors_name_the_section():
    with pytest.raises(QuantSpecError, match=r"config\.defaultz is not a config section"):
        parse_config({"defaultz": {}})
    with pytest.raises(QuantSpecError, match=r"defaults\.bias is not valid"):
        parse_config({"defaults": {"bias": {}}})
    with pytest.raises(QuantSpecError, match=r"op_types\.Conv\.weight\.bitwidth=1 is not supported"):
        parse_config({"op_types": {"Conv": {"weight": {"bitwidth": 1}}}})
    with pytest.raises(QuantSpecError, match=r"supergroups\[0\]=\['Conv'\] needs at least two op types"):
        parse_config({"supergroups": [["Conv"]]})
    with pytest.raises(QuantSpecError, match=r"modules\[0\] needs a 'pattern'"):
        parse_config({"modules": [{"weight": {"bitwidth": 4}}]})
    with pytest.raises(QuantSpecError, match=r"neither a preset \(onnxruntime_cpu, per_channel, per_tensor, power_of_two\)"):
        load_config("no_such_preset")


def test_presets_load_with_their_documented_defaults():
    pc = load_config("per_channel")
    assert pc.name == "per_channel"
    assert pc.weight.granularity == "per_channel" and pc.weight.symmetric and pc.weight.signed
    assert pc.activation.granularity == "per_tensor" and not pc.activation.symmetric
    assert load_config("per_tensor").weight.granularity == "per_tensor"
    ort = load_config("onnxruntime_cpu")
    assert (ort.weight.quant_min, ort.weight.quant_max) == (-127, 127)
    p2 = load_config("power_of_two")
    assert p2.activation.scale_type == "power_of_two" and p2.activation.signed
    w4 = pc.with_defaults(weight={"bitwidth": 4})
    assert w4.weight.bitwidth == 4 and w4.weight.granularity == "per_channel" and pc.weight.bitwidth == 8
