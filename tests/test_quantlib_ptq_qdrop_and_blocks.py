"""QDrop (float inputs mixed into quantized ones) and BRECQ block reconstruction: the float
inputs reach each layer, the mix follows its rate, blocks keep their skip connections, and block
AdaRound lowers the block output error and freezes every layer on its grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlib.ptq.adaround import AdaRoundConfig, apply_adaround
from quantlib.ptq.pass_config import PassConfigError
from quantlib.ptq.weight_freeze import is_frozen, weight_codes
from quantlib.quantsim import QuantSim
from quantlib_reconstruction_helpers import FAST, calibrated_sim, correlated_inputs, output_mse, w4_a16_config


@pytest.mark.parametrize("crop", [None, 4])
def test_input_drop_mixes_float_inputs_into_quantized_ones_elementwise(crop):
    """QDrop: each input element is the float reference's with probability input_drop, the
    quantized one otherwise, over the same window; 0 and 1 give exactly one of the two."""
    from quantlib.ptq.chunk_store import ChunkStore
    from quantlib.ptq.layer_cache import LayerData
    from quantlib.ptq.layer_ops import ReconstructionBatches

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    float_input = torch.randn(8, 4, 12, 12)
    quantized_input = float_input + 100.0  # far apart, so every element says where it came from
    with torch.no_grad(), ChunkStore(0) as store:
        store.append("q", quantized_input)
        store.append("f", float_input)
        store.append("y", conv(float_input))
        layer = LayerData(name="conv", module=conv, store=store, input_key="q", target_key="y", float_input_key="f")
        assert torch.equal(layer.float_inputs(0), float_input)
        fractions = {}
        for drop in (0.0, 0.3, 1.0):
            batches = ReconstructionBatches(layer, crop=crop, generator=torch.Generator().manual_seed(0), input_drop=drop)
            windows = [batches.sample() for _ in range(10)]
            if drop == 1.0:  # every element float: the layer reproduces the float target window exactly
                for x, target in windows:
                    assert torch.allclose(batches.forward(x, conv.weight, conv.bias), target, atol=1e-5)
            inside = torch.cat([x.flatten() for x, _ in windows])
            inside = inside[inside != 0]  # zero padding added around a window is neither
            fractions[drop] = float((inside < 50).float().mean())
    assert fractions[0.0] == 0.0 and fractions[1.0] == 1.0
    assert 0.27 < fractions[0.3] < 0.33


def test_layers_get_the_float_models_inputs_next_to_the_quantized_ones():
    """stream_layers hands each layer the float reference's input for the same samples: for the
    second layer of Linear -> ReLU -> Linear it is the float first layer's ReLU output, while its
    quantized input carries the 4-bit activation grid."""
    from quantlib.ptq.layerwise import LayerwiseConfig, run_layerwise

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = correlated_inputs(64)
    sim = calibrated_sim(model, x, weight_bits=4, activation_bits=4)
    seen = {}

    def record(layer, generator):
        seen[layer.name] = (layer.inputs(0).clone(), layer.float_inputs(0).clone())

    run_layerwise(sim, [x], LayerwiseConfig(num_samples=64, batch_size=64), record, method="test", progress=False)
    quantized, float_input = seen["2"]
    with torch.no_grad():
        assert torch.allclose(float_input, model[1](model[0](x)), atol=1e-6)
        assert not torch.allclose(quantized, float_input, atol=1e-3)
    assert quantized.unique().numel() <= 16  # the 4-bit activation grid


def test_adaround_with_input_drop_lowers_layer_output_mse_against_nearest_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = correlated_inputs(512)
    sim = calibrated_sim(model, x, weight_bits=4, activation_bits=4)
    result = apply_adaround(sim, [x], {**FAST, "input_drop": 0.5, "keep_nearest_if_worse": False}, progress=False)
    assert [layer.mse_adaround < layer.mse_nearest for layer in result.layers] == [True, True]
    assert result.to_dict()["config"]["input_drop"] == 0.5


def test_input_drop_errors_name_the_setting():
    with pytest.raises(PassConfigError, match=r"input_drop=1.5 must be a probability in \[0, 1\]"):
        AdaRoundConfig(input_drop=1.5)
    with pytest.raises(PassConfigError, match=r"input_drop=0.5 .* needs input_source='quantized', not 'fp32'"):
        AdaRoundConfig(input_drop=0.5, input_source="fp32")


class _ResidualBlock(nn.Module):
    """1x1 expand -> ReLU -> 3x3 depthwise -> ReLU -> 1x1 project, plus the skip connection."""

    def __init__(self, channels: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.conv3 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _ResidualBlock(), _ResidualBlock(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_block_regions_group_each_blocks_layers_with_its_skip_connection():
    from quantlib.ptq.regions import block_regions, layer_regions

    model = residual_net()
    sim = QuantSim(model, torch.zeros(1, 3, 8, 8), w4_a16_config())
    names = list(sim.weight_modules())
    regions = block_regions(sim.model, names)
    assert [(r.name, r.layers) for r in regions] == [
        ("0", ("0",)), ("2", ("2.conv1", "2.conv2", "2.conv3")), ("3", ("3.conv1", "3.conv2", "3.conv3")), ("6", ("6",))]
    block = regions[1]
    assert any(n.op == "call_function" and n.target.__name__ == "add" for n in block.nodes)  # the skip add is inside
    assert all(arg is block.input or arg in block.nodes or arg.op == "get_attr"
               for n in block.nodes for arg in n.all_input_nodes)  # one input from outside
    assert [r.layers for r in layer_regions(sim.model, names)] == [(name,) for name in names]


def test_block_adaround_lowers_block_output_mse_and_freezes_every_layer():
    model = residual_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 8, 8, generator=g)
    held_out = torch.randn(128, 3, 8, 8, generator=g)
    sim = calibrated_sim(model, x, weight_bits=4, activation_bits=8)
    before = output_mse(model, sim, held_out)
    result = apply_adaround(sim, [x], {**FAST, "num_samples": 256, "reconstruct": "block", "crop": None,
                                       "keep_nearest_if_worse": False}, progress=False)
    after = output_mse(model, sim, held_out)
    assert [layer.name for layer in result.layers] == ["0", "2", "3", "6"]
    assert result.layers[1].layers == ["2.conv1", "2.conv2", "2.conv3"]
    assert all(layer.mse_adaround < layer.mse_nearest for layer in result.layers)
    assert after < before
    for name, module in sim.weight_modules().items():
        quantizer = module.weight_quantizer
        assert is_frozen(quantizer) and quantizer.frozen_by == "adaround", name
        scale = quantizer.scale.reshape(-1, *([1] * (module.weight.dim() - 1)))
        assert torch.equal(module.weight, weight_codes(module).float() * scale), name  # exactly on the grid
    assert 0.0 < result.layers[1].flipped < 0.5


def test_block_reconstruction_needs_whole_feature_maps():
    with pytest.raises(PassConfigError, match=r"crop=8 crops one layer's output; reconstruct='block' .* set crop: null"):
        AdaRoundConfig(reconstruct="block", crop=8)
    with pytest.raises(PassConfigError, match=r"reconstruct"):
        AdaRoundConfig(reconstruct="blocks")


def test_block_regions_end_at_a_layer_left_out_of_the_selection():
    from quantlib.ptq.regions import block_regions

    sim = QuantSim(residual_net(), torch.zeros(1, 3, 8, 8), w4_a16_config())
    regions = block_regions(sim.model, ["0", "2.conv1", "2.conv2", "2.conv3"])
    assert [(r.name, r.layers) for r in regions] == [("0", ("0",)), ("2", ("2.conv1", "2.conv2", "2.conv3"))]
    # block 2 ends at its skip add: block 3 and the classifier, left out, are in no region
    assert any(n.op == "call_function" and n.target.__name__ == "add" for n in regions[1].nodes)
    called = {n.target for n in regions[1].nodes if n.op == "call_module"}
    assert not called & {"3.conv1", "3.conv2", "3.conv3", "6"}


class _NormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(x))))  # no skip: the graph is cut between the layers


def test_a_norm_layer_between_a_blocks_convolutions_stays_inside_the_block():
    from quantlib.ptq.regions import block_regions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _NormBlock()).eval()
    sim = QuantSim(model, torch.zeros(1, 3, 8, 8), w4_a16_config())
    names = list(sim.weight_modules())
    assert names == ["0", "1.conv1", "1.conv2"]
    regions = block_regions(sim.model, names)
    assert [(r.name, r.layers) for r in regions] == [("0", ("0",)), ("1", ("1.conv1", "1.conv2"))]
    assert "1.norm" in {n.target for n in regions[1].nodes if n.op == "call_module"}
