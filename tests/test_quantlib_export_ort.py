"""quantlib.export: the ONNX QDQ export run in ONNX Runtime (CPU) matches the simulation.

The reference for every ORT comparison is the simulated torch output of the same QuantSim; the
tolerance is ONE step of the quantizer that produces the model output (the two can only differ by
rounding decisions of values that land within float error of a rounding boundary). With
arithmetic=integer the simulation reproduces ORT's int8 kernels exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from quantlib.config import load_config
from quantlib.export import export

from quantlib_export_helpers import (
    CONFIGS,
    exported,
    initializers,
    output_quantizer_scale,
    prepare,
    run_ort,
    simulate,
    tolerance,
)
from quantlib_models import Conv1dNet, DepthwiseNet, FunctionalNet, TransposedNet
from quantlib_quantsim_helpers import ResBlockNet, build, randn


# ----------------------------------------------------------------------- ORT vs simulation


@pytest.mark.parametrize("config", [
    "per_tensor", "per_channel", "onnxruntime_cpu",
    "w4a8",
    "w8a16",
])
def test_ort_matches_simulation_within_one_output_step(config, tmp_path_factory):
    sim, artifacts, proto = exported(config, CONFIGS[config], tmp_path_factory)
    step = output_quantizer_scale(sim)
    for seed in (20, 21):
        x = randn(4, 3, 8, 8, seed=seed)  # batch 4 while exported with batch 2: the batch is dynamic
        ref = simulate(sim, x)
        diff = np.abs(run_ort(artifacts.onnx, x) - ref).max()
        assert diff <= tolerance(step, ref), (diff, step)


def test_16bit_weights_match_simulation_through_the_evaluator_backend(tmp_path_factory):
    """ORT's QDQ fusions get 16-bit conv weights wrong; OnnxRuntimeBackend turns them off for such models."""
    from evaluators.backends import OnnxRuntimeBackend, has_16bit_quantized_weights

    config = load_config("per_channel").with_defaults(weight={"bitwidth": 16}, activation={"bitwidth": 16})
    sim, artifacts, _ = exported("w16a16", config, tmp_path_factory)
    assert has_16bit_quantized_weights(artifacts.onnx)
    backend = OnnxRuntimeBackend(artifacts.onnx)
    step = output_quantizer_scale(sim)
    for seed in (20, 21):
        x = randn(4, 3, 8, 8, seed=seed)
        ref = simulate(sim, x)
        assert np.abs(backend.session.run(None, {"input": x.numpy()})[0] - ref).max() <= tolerance(step, ref)


def test_w4a8_matches_simulation_when_biases_stay_float(tmp_path):
    """With float biases and ORT's fusions off, the W4A8 export also matches the simulation."""
    sim = prepare(build(ResBlockNet), (2, 3, 8, 8), CONFIGS["w4a8"])
    for module in sim.weight_modules().values():
        module.input_quantizer_ref = None  # no known input scale -> the bias is exported as float
    artifacts = export(sim, tmp_path, "w4a8_float_bias", randn(2, 3, 8, 8, seed=1))
    proto = onnx.load(str(artifacts.onnx))
    assert not any(a.dtype == np.int32 for a in initializers(proto).values())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(artifacts.onnx), options, providers=["CPUExecutionProvider"])
    step = output_quantizer_scale(sim)
    for seed in (20, 21):
        x = randn(4, 3, 8, 8, seed=seed)
        ref = simulate(sim, x)
        assert np.abs(plain.run(None, {"input": x.numpy()})[0] - ref).max() <= tolerance(step, ref)


def test_power_of_two_matches_simulation_with_s8_to_u8_transform_off(tmp_path_factory):
    # see test_power_of_two_export_loads_in_default_onnxruntime for why the transformer is disabled
    sim, artifacts, proto = exported("power_of_two", "power_of_two", tmp_path_factory)
    step = output_quantizer_scale(sim)
    assert step == 2.0 ** round(np.log2(step))
    x = randn(4, 3, 8, 8, seed=20)
    out = run_ort(artifacts.onnx, x, disabled_optimizers=["QDQS8ToU8Transformer"])
    ref = simulate(sim, x)
    assert np.abs(out - ref).max() <= tolerance(step, ref)
    # activations are signed symmetric 8-bit with the real zero at code 0 (int8 zero point 0, or the same
    # grid shifted to uint8 with zero point 128)
    zps = initializers(proto)
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            zp = zps[node.input[2]]
            assert (zp.dtype == np.int8 and int(zp) == 0) or (zp.dtype == np.uint8 and int(zp) == 128)


def test_power_of_two_export_loads_in_default_onnxruntime(tmp_path_factory):
    sim, artifacts, _ = exported("power_of_two", "power_of_two", tmp_path_factory)
    x = randn(4, 3, 8, 8, seed=20)
    ref = simulate(sim, x)
    assert np.abs(run_ort(artifacts.onnx, x) - ref).max() <= tolerance(output_quantizer_scale(sim), ref)


@pytest.mark.parametrize(
    "name, cls, shape",
    [
        ("functional", FunctionalNet, (2, 3, 4, 4)),
        ("transposed", TransposedNet, (2, 3, 4, 4)),
        ("conv1d", Conv1dNet, (2, 3, 10)),
        ("depthwise", DepthwiseNet, (2, 3, 6, 6)),
    ],
)
def test_ort_matches_simulation_on_other_layer_types(name, cls, shape, tmp_path_factory):
    sim, artifacts, proto = exported(name, "per_channel", tmp_path_factory, cls=cls, shape=shape)
    step = output_quantizer_scale(sim)
    x = randn(*shape, seed=30)
    ref = simulate(sim, x)
    assert np.abs(run_ort(artifacts.onnx, x) - ref).max() <= tolerance(step, ref)


def test_grouped_conv_transpose_exports(tmp_path):
    sim = prepare(build(TransposedNet, groups=2), (2, 3, 4, 4), "per_channel")
    artifacts = export(sim, tmp_path, "tg2", randn(2, 3, 4, 4, seed=1))
    x = randn(2, 3, 4, 4, seed=30)
    ref = simulate(sim, x)
    assert np.abs(run_ort(artifacts.onnx, x) - ref).max() <= tolerance(output_quantizer_scale(sim), ref)


# ------------------------------------------------------ integer arithmetic vs ORT int8 kernels


@pytest.mark.parametrize("config", ["per_tensor", "per_channel", "onnxruntime_cpu"])
@pytest.mark.parametrize("cls", [ResBlockNet, DepthwiseNet])
def test_integer_arithmetic_reproduces_ort_int8_kernels(config, cls, tmp_path):
    # arithmetic=integer runs conv/linear with 8-bit grids as QLinearConv/QGemm do (integer
    # accumulation, float32 requantization multiplier), so no output may differ by a step
    sim = prepare(build(cls), (2, 3, 8, 8), dataclasses.replace(load_config(CONFIGS[config]), arithmetic="integer"))
    assert sim.arithmetic == "integer"
    with torch.no_grad():
        ready = [name for name, m in sim.weight_modules().items() if m.integer_kernel_ready()]
        # a quantizer right after an integer kernel (through ReLU) receives on-grid values and passes them on
        passed_through = [name for name, q in sim.activation_quantizers().items()
                          if q.on_grid_producer is not None and q.on_grid_producer[0].integer_output_on_grid()]
    assert len(ready) >= 2 and passed_through, (ready, passed_through)
    path = export(sim, tmp_path, "int", randn(2, 3, 8, 8, seed=1)).onnx
    for seed in range(30, 36):
        x = randn(8, 3, 8, 8, seed=seed) * 1.5
        ref = simulate(sim, x)
        assert np.abs(run_ort(path, x) - ref).max() <= tolerance(0.0, ref)
