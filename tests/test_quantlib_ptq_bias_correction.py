"""Bias correction (quantlib.ptq.bias_correction): empirical and analytical (BN-based, data-free).

Both must reduce the mean output error of the quantized model on held-out data (the shift that
weight quantization adds), on a model quantized coarsely enough for that shift to be visible.
"""

from __future__ import annotations

import copy
from importlib import resources

import pytest
import torch
import yaml
from torch import nn

from quantlib.batchnorm_fold import fold_batch_norms
from quantlib.graph import trace
from quantlib.ptq.bias_correction import BiasCorrectionConfig, channel_mean, correct_bias_empirical
from quantlib.ptq.bn_reestimation import reestimate_bn_stats
from quantlib.ptq.lockstep import LayerIO, run_lockstep
from quantlib.ptq.pipeline import prepare_quantsim
from quantlib.ptq.quantizer_groups import fp32_reference
from quantlib.ptq.registry import PTQConfigError
from quantlib.quantsim import QuantSim


class ConvNet(nn.Module):
    """conv-BN-ReLU -> conv-BN-ReLU6 -> 1x1 conv-BN-ReLU -> global pool -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.bn3 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = nn.functional.relu6(self.bn2(self.c2(y)))
        y = torch.relu(self.bn3(self.c3(y)))
        return self.fc(torch.flatten(self.pool(y), 1))


def _w4_per_tensor() -> dict:
    """The per_tensor preset with 4-bit weights: a quantization shift large enough to measure."""
    data = yaml.safe_load((resources.files("quantlib") / "configs" / "per_tensor.yaml").read_text())
    data["defaults"]["weight"]["bitwidth"] = 4
    data["name"] = "w4_per_tensor_test"
    return data


def _batches(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 12, 12, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = ConvNet().eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 1.0)
    reestimate_bn_stats(net, _batches(4, seed=100))  # BN statistics describe the data
    return net


def _mean_output_error(sim_model: nn.Module, reference: nn.Module, data: list[torch.Tensor]) -> float:
    """mean over output channels of |E[quantized - FP32]| on ``data``."""
    with torch.no_grad():
        diffs = [sim_model(x) - reference(x) for x in data]
    return float(channel_mean(diffs, -1).abs().mean())


def test_empirical_bias_correction_reduces_the_mean_output_error(model):
    calibration, held_out = _batches(4, seed=1), _batches(4, seed=2)
    config = _w4_per_tensor()
    naive, _ = prepare_quantsim(model, calibration[0], config, [], calibration, progress=False)
    corrected, report = prepare_quantsim(model, calibration[0], config,
                                         [{"name": "bias_correction", "kind": "empirical", "num_samples": 48}],
                                         calibration, progress=False)
    summary = report.steps[0].summary
    assert (summary["corrected_layers"], summary["samples"], summary["recalibrated"]) == (4, 48, True)
    before = _mean_output_error(naive.model, model, held_out)
    after = _mean_output_error(corrected.model, model, held_out)
    assert after < before / 2, (before, after)


def test_analytical_bias_correction_reduces_the_mean_output_error_without_data(model):
    calibration, held_out = _batches(4, seed=1), _batches(4, seed=2)
    config = _w4_per_tensor()
    naive, _ = prepare_quantsim(model, calibration[0], config, [], calibration, progress=False)
    corrected, report = prepare_quantsim(model, calibration[0], config,
                                         [{"name": "bias_correction", "kind": "analytical", "recalibrate": False}],
                                         calibration, progress=False)
    summary = report.steps[0].summary
    # c2, c3 (after BN + ReLU/ReLU6) and fc (after BN + ReLU + global pooling); c1 reads the raw input
    assert summary["corrected_layers"] == 3
    assert summary["skipped"] == {"input_not_from_batchnorm_layer": 1}
    before = _mean_output_error(naive.model, model, held_out)
    after = _mean_output_error(corrected.model, model, held_out)
    assert after < 0.75 * before, (before, after)


def _layer_outputs(model: nn.Module, names: list[str], data: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: outputs[name].append(output.detach())) for name in names]
    with torch.no_grad():
        for x in data:
            model(x)
    for handle in handles:
        handle.remove()
    return outputs


def test_empirical_correction_zeroes_each_layers_mean_shift_on_its_data(model):
    data = _batches(2, seed=3)
    sim = QuantSim(model, data[0], _w4_per_tensor())
    sim.calibrate(data, progress=False)
    result = correct_bias_empirical(sim, [(x,) for x in data])
    assert sorted(result.shifts) == ["c1", "c2", "c3", "fc"]
    folded = trace(copy.deepcopy(model))  # the FP32 reference: BN folded, nothing quantized
    fold_batch_norms(folded)
    layers = ["c2", "c3", "fc"]
    quantized, fp32 = _layer_outputs(sim.model, layers, data), _layer_outputs(folded, layers, data)
    for name in layers:
        axis = -1 if name == "fc" else 1
        residual = channel_mean(quantized[name], axis) - channel_mean(fp32[name], axis)
        # what is left is the int32 bias grid's rounding, a small fraction of the corrected shift
        assert float(residual.abs().max()) < 0.1 * float(result.shifts[name].abs().max()), name


def test_float_references_stay_fp32_after_bias_correction_and_adaround(model):
    """Later passes compare with the float model the sim was built from, not with one that carries
    an earlier pass's bias shifts or grid-valued weights (quantlib.ptq.float_parameters)."""
    data = _batches(2, seed=4)
    sim, _ = prepare_quantsim(model, data[0], _w4_per_tensor(),
                              [{"name": "adaround", "num_iterations": 5, "num_samples": 32, "batch_size": 16},
                               {"name": "bias_correction", "num_samples": 32}], data, progress=False)
    folded = trace(copy.deepcopy(model))
    fold_batch_norms(folded)
    assert float(sim.model.c2.bias.detach().sub(folded.c2.bias.detach()).abs().max()) > 1e-3  # the sim's biases did move
    with torch.no_grad():
        assert torch.allclose(fp32_reference(sim)(data[0]), folded(data[0]), atol=1e-5)
    seen = {}

    def hook(io: LayerIO) -> None:
        seen[io.name] = (io.fp32.weight, io.fp32.bias)

    run_lockstep(sim.model, [(data[0],)], hook)
    for name in ("c1", "c2", "c3", "fc"):
        weight, bias = seen[name]
        assert torch.equal(weight, folded.get_submodule(name).weight), name
        assert torch.allclose(bias, folded.get_submodule(name).bias), name


def test_bias_correction_config_is_validated():
    with pytest.raises(PTQConfigError, match="kind='both' is not supported; use one of empirical, analytical"):
        BiasCorrectionConfig(kind="both")
    with pytest.raises(PTQConfigError, match="num_samples=0 must be at least 1"):
        BiasCorrectionConfig(num_samples=0)
