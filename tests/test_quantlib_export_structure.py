"""quantlib.export: structure of the exported ONNX QDQ graph (Q/DQ nodes, int8 / 4-bit / uint16 / int32
initializers, per-channel axes, fp16 Cast nodes) and the artifacts written next to it (encodings,
integer weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import quantlib
from quantlib.config import load_config
from quantlib.export import ONNX_OPSET

from quantlib_export_helpers import CONFIGS, attribute, exported, initializers, op_counts, run_ort, simulate
from quantlib_quantsim_helpers import randn


# ---------------------------------------------------------------------------- ONNX structure


def test_onnx_graph_has_qdq_nodes_int8_weights_and_per_channel_axis(tmp_path_factory):
    sim, artifacts, proto = exported("per_channel", CONFIGS["per_channel"], tmp_path_factory)
    onnx.checker.check_model(proto)
    assert any(o.domain in ("", "ai.onnx") and o.version == ONNX_OPSET for o in proto.opset_import)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    counts = op_counts(proto)
    # one Q/DQ pair per activation quantizer, one DQ per weight and per int32 bias
    assert counts["QuantizeLinear"] == len(sim.activation_quantizers()) == 7
    assert counts["DequantizeLinear"] >= 7 + 4
    assert counts["Conv"] == 2 and counts["Gemm"] == 2
    inits = initializers(proto)
    weights = {name: m.weight.shape for name, m in sim.weight_modules().items()}
    int8 = [a for a in inits.values() if a.dtype == np.int8 and a.ndim >= 2]
    assert sorted(a.shape for a in int8) == sorted(tuple(s) for s in weights.values())
    # the weight DequantizeLinear nodes are per-channel along axis 0, one scale per output channel
    per_channel = []
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].dtype == np.int8:
            codes, scale = inits[node.input[0]], inits[node.input[1]]
            assert attribute(node, "axis", 1) == 0
            assert scale.shape == (codes.shape[0],)
            per_channel.append(codes.shape)
    assert sorted(per_channel) == sorted(tuple(s) for s in weights.values())
    # the exported int8 codes are the simulation's codes: DQ(codes) == the simulated weight
    conv1 = sim.weight_modules()["conv1"]
    w_sim = conv1.quantized_weight().detach().numpy()
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].shape == w_sim.shape:
            codes, scale = inits[node.input[0]], inits[node.input[1]]
            np.testing.assert_allclose(codes.astype(np.float32) * scale.reshape(-1, 1, 1, 1), w_sim, rtol=0, atol=1e-7)
            break
    else:
        pytest.fail("conv1 weight DequantizeLinear not found")
    # activation zero points are uint8 (asymmetric unsigned activations)
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[2]].dtype == np.uint8


def test_onnx_bytes_carry_no_source_paths_or_stack_traces(tmp_path_factory):
    """The exporter's debug metadata (stack traces with absolute paths and line numbers) is
    stripped, so a fresh clone elsewhere exports byte-identical files."""
    _, artifacts, proto = exported("per_channel", CONFIGS["per_channel"], tmp_path_factory)
    data = artifacts.onnx.read_bytes()
    checkout = str(Path(quantlib.__file__).resolve().parents[1]).encode()
    assert checkout not in data and b"stack_trace" not in data and b"quantizer.py" not in data
    assert b"pkg.torch.onnx" not in data
    assert all(len(node.metadata_props) == 0 for node in proto.graph.node)


def test_biases_are_exported_as_int32_at_input_times_weight_scale(tmp_path_factory):
    sim, artifacts, proto = exported("per_channel", CONFIGS["per_channel"], tmp_path_factory)
    inits = initializers(proto)
    conv2 = sim.weight_modules()["conv2"]
    in_scale = sim.activation_quantizers()["relu1"].scale.item()
    expected_scale = in_scale * conv2.weight_quantizer.scale.numpy()
    found = False
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        codes = inits[node.input[0]]
        if codes.dtype == np.int32 and codes.shape == (8,):
            scale = inits[node.input[1]]
            if np.allclose(scale, expected_scale, rtol=1e-6):
                # bias codes = round(bias / (s_in * s_w))
                np.testing.assert_array_equal(codes, np.round(conv2.bias.detach().numpy() / expected_scale))
                found = True
    assert found


def test_w4a8_weights_stay_on_the_4bit_grid(tmp_path_factory):
    sim, artifacts, proto = exported("w4a8", CONFIGS["w4a8"], tmp_path_factory)
    int8 = [a for a in initializers(proto).values() if a.dtype == np.int8 and a.ndim >= 2]
    assert len(int8) == 4
    for codes in int8:
        assert codes.min() >= -8 and codes.max() <= 7
    assert all(q.spec.bitwidth == 4 for q in sim.param_quantizers().values())


def test_w8a16_activations_use_uint16(tmp_path_factory):
    sim, artifacts, proto = exported("w8a16", CONFIGS["w8a16"], tmp_path_factory)
    inits = initializers(proto)
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == 7
    for node in q_nodes:
        assert inits[node.input[2]].dtype == np.uint16
    # 16-bit activations: biases stay float (no int32 bias at scale s_in * s_w)
    assert not any(a.dtype == np.int32 and a.ndim == 1 and a.size > 1 for a in inits.values())


def test_float16_passthrough_exports_with_cast_nodes(tmp_path_factory):
    config = load_config("per_channel").with_defaults(activation={"dtype": "float16"}, weight={"dtype": "float16"})
    sim, artifacts, proto = exported("fp16", config, tmp_path_factory)
    counts = op_counts(proto)
    assert counts.get("Cast", 0) >= 2 * len(sim.activation_quantizers())
    assert "QuantizeLinear" not in counts and "DequantizeLinear" not in counts
    casts = [attribute(n, "to") for n in proto.graph.node if n.op_type == "Cast"]
    assert onnx.TensorProto.FLOAT16 in casts and onnx.TensorProto.FLOAT in casts
    x = randn(4, 3, 8, 8, seed=20)
    ref = simulate(sim, x)
    out = run_ort(artifacts.onnx, x)
    # fp16 rounding of each activation: the two agree to fp16 precision
    np.testing.assert_allclose(out, ref, rtol=2e-3, atol=2e-3)
    # the simulated output itself is an fp16 value (output passthrough)
    assert np.array_equal(ref, ref.astype(np.float16).astype(np.float32))


def test_export_writes_encodings_and_integer_weights(tmp_path_factory):
    from safetensors import safe_open

    sim, artifacts, proto = exported("per_channel", CONFIGS["per_channel"], tmp_path_factory)
    assert set(artifacts.as_dict()) == {"onnx", "encodings", "weights"}
    assert artifacts.encodings.read_text().startswith("{")
    with safe_open(str(artifacts.weights), "pt") as handle:
        assert handle.metadata()["format"] == "quantzoo.quantized/1"
        assert handle.get_tensor("conv1.weight.int8").dtype == torch.int8
    # export leaves the simulation in simulation mode
    assert not any(q.exporting for q in sim.quantizers().values())
    assert all(m._export_tensors is None for m in sim.weight_modules().values())
