"""quantlib.quantsim encodings and quantlib.checkpoint: encodings JSON save / load (bit-exact round
trip, AIMET layout, mismatch errors), int4 packing and integer (int8 / int4) safetensors checkpoints.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from quantlib.checkpoint import FORMAT, load_quantized_state_dict, pack_int4, quantized_state_dict, unpack_int4
from quantlib.config import load_config
from quantlib.quantsim import QuantSim

from quantlib_models import DepthwiseNet
from quantlib_quantsim_helpers import IMG, ResBlockNet, build, calibrated, randn


# ------------------------------------------------------------------------------- encodings


ROUND_TRIP_CONFIGS = {
    "per_channel": "per_channel",
    "per_tensor": "per_tensor",
    "power_of_two": "power_of_two",
    "onnxruntime_cpu": "onnxruntime_cpu",
    "w4a8": load_config("per_channel").with_defaults(weight={"bitwidth": 4}),
    "w8a16": load_config("per_channel").with_defaults(activation={"bitwidth": 16}),
}


@pytest.mark.parametrize("config", list(ROUND_TRIP_CONFIGS))
def test_encodings_round_trip_bit_exact(config, tmp_path):
    cfg = ROUND_TRIP_CONFIGS[config]
    x = randn(*IMG, seed=7)
    sim = calibrated(build(ResBlockNet), x, cfg)
    with torch.no_grad():
        expected = sim.model(x)
    path = sim.save_encodings(tmp_path / "enc.json")
    fresh = QuantSim(build(ResBlockNet), x, cfg)
    fresh.load_encodings(path)
    with torch.no_grad():
        assert torch.equal(fresh.model(x), expected)
    for name, q in sim.quantizers().items():
        other = fresh.quantizers()[name]
        assert torch.equal(q.scale, other.scale) and torch.equal(q.zero_point, other.zero_point)


def test_encodings_json_layout(tmp_path):
    sim = calibrated(build(ResBlockNet), randn(*IMG))
    data = json.loads(sim.save_encodings(tmp_path / "e.json").read_text())
    assert data["version"] == "1.0.0" and data["config"] == "per_channel"
    assert set(data["activation_encodings"]) == set(sim.activation_quantizers())
    assert set(data["param_encodings"]) == {"conv1.weight", "conv2.weight", "fc.weight", "fc2.weight"}
    assert len(data["param_encodings"]["conv1.weight"]) == 8  # one record per output channel
    rec = data["param_encodings"]["conv1.weight"][0]
    # signed symmetric int8: zero_point 0 -> AIMET offset -128, grid [-128, 127] * scale
    assert rec["offset"] == -128 and rec["is_symmetric"] == "True" and rec["bitwidth"] == 8
    assert rec["min"] == pytest.approx(-128 * rec["scale"]) and rec["max"] == pytest.approx(127 * rec["scale"])
    assert data["quantizer_args"]["x"]["bitwidth"] == 8


def test_load_encodings_from_another_model_raises_key_error(tmp_path):
    path = calibrated(build(ResBlockNet), randn(*IMG)).save_encodings(tmp_path / "enc.json")
    other = QuantSim(build(DepthwiseNet), randn(2, 3, 6, 6))
    with pytest.raises(KeyError, match="which this model does not have; were they saved from another model"):
        other.load_encodings(path)


def test_load_encodings_missing_entry_raises_key_error(tmp_path):
    sim = calibrated(build(ResBlockNet), randn(*IMG))
    data = sim.encodings()
    del data["activation_encodings"]["relu1"]
    fresh = QuantSim(build(ResBlockNet), randn(*IMG))
    with pytest.raises(KeyError, match="encodings have no entry for quantizer 'relu1'"):
        fresh.load_encodings(data)


# ------------------------------------------------------------------------- int checkpoints


def test_pack_unpack_int4_hand_computed():
    # low nibble first: (1, -2) -> 0x1 | (0xE << 4) = 0xE1 = 225;  (7, -8) -> 0x7 | 0x80 = 135;  (3) -> 0x03
    packed = pack_int4(torch.tensor([1, -2, 7, -8, 3], dtype=torch.int32))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [225, 135, 3]
    assert unpack_int4(packed, 5, signed=True).tolist() == [1, -2, 7, -8, 3]
    # unsigned codes 0..15: (15, 0) -> 0x0F = 15, (8, 9) -> 0x98 = 152
    packed = pack_int4(torch.tensor([15, 0, 8, 9], dtype=torch.uint8))
    assert packed.tolist() == [15, 152]
    assert unpack_int4(packed, 4, signed=False).tolist() == [15, 0, 8, 9]


@pytest.mark.parametrize("signed, low, high", [(True, -8, 7), (False, 0, 15)])
@pytest.mark.parametrize("numel", [1, 2, 15, 64])
def test_pack_unpack_int4_round_trip(signed, low, high, numel):
    codes = torch.randint(low, high + 1, (numel,), generator=torch.Generator().manual_seed(numel))
    packed = pack_int4(codes)
    assert packed.numel() == math.ceil(numel / 2)
    out = unpack_int4(packed, numel, signed)
    assert out.dtype == torch.int16 and out.tolist() == codes.tolist()


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_checkpoint_round_trip(bits, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = load_config("per_channel").with_defaults(weight={"bitwidth": bits})
    x = randn(*IMG, seed=7)
    sim = calibrated(build(ResBlockNet), x, config)
    with torch.no_grad():
        expected = sim.model(x)
    tensors, metadata = quantized_state_dict(sim)
    assert metadata["format"] == FORMAT
    suffix = "int8" if bits == 8 else "int4"
    for name, module in sim.weight_modules().items():
        assert f"{name}.weight" not in tensors  # the float weight is not stored
        stored = tensors[f"{name}.weight.{suffix}"]
        n = module.weight.numel()
        if bits == 8:
            assert stored.dtype == torch.int8 and stored.shape == module.weight.shape
        else:
            assert stored.dtype == torch.uint8 and stored.numel() == math.ceil(n / 2)
    assert tensors["fc2.weight.int4" if bits == 4 else "fc2.weight.int8"].numel() == (8 if bits == 4 else 15)
    save_file(tensors, str(tmp_path / "q.safetensors"), metadata=metadata)
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as handle:
        loaded_metadata = handle.metadata()
    loaded = load_file(str(tmp_path / "q.safetensors"))
    # a freshly built QuantSim of a model with *different* random weights gets everything from the file
    fresh = QuantSim(build(ResBlockNet, seed=99), x, config)
    load_quantized_state_dict(fresh, loaded, loaded_metadata)
    with torch.no_grad():
        assert torch.equal(fresh.model(x), expected)
    # the rebuilt weights lie exactly on the grid of the original quantized weights
    for name, module in sim.weight_modules().items():
        assert torch.equal(fresh.weight_modules()[name].quantized_weight(), module.quantized_weight())


def test_load_quantized_state_dict_rejects_foreign_files():
    sim = QuantSim(build(ResBlockNet), randn(*IMG))
    with pytest.raises(ValueError, match="is not a quantzoo quantized checkpoint"):
        load_quantized_state_dict(sim, {}, {"format": "something/else"})
    tensors, metadata = quantized_state_dict(calibrated(build(ResBlockNet), randn(*IMG)))
    tensors["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="checkpoint does not match the model"):
        load_quantized_state_dict(QuantSim(build(ResBlockNet), randn(*IMG)), tensors, metadata)
