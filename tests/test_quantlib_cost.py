"""quantlib.cost: per-layer MACs and bit-ops of a QuantSim, checked against hand counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from quantlib.config import load_config
from quantlib.cost import FLOAT16_BITS, FLOAT32_BITS, model_cost
from quantlib.quantsim import QuantSim
from quantlib_models import DepthwiseNet, FunctionalNet, TransposedNet
from zoo.models.digits import DigitsMLP


def _config(weight_bits: int = 8, activation_bits: int = 8, **extra):
    config = load_config("per_channel").with_defaults(weight={"bitwidth": weight_bits}, activation={"bitwidth": activation_bits})
    return config.with_module_rules(extra["modules"]) if "modules" in extra else config


class StridedNet(nn.Module):
    """conv 3->8 3x3 stride 2 (pad 1) on 10x10 -> 5x5, ReLU, flatten, linear 200 -> 4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


class SharedNet(nn.Module):
    """The same Linear(6 -> 6) applied twice."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def _by_name(cost):
    return {layer.name: layer for layer in cost.layers}


def test_conv_and_linear_macs_bitops_and_bytes_match_hand_counts():
    torch.manual_seed(0)
    sim = QuantSim(StridedNet(), torch.randn(1, 3, 10, 10), _config(weight_bits=4, activation_bits=8))
    cost = model_cost(sim)
    layers = _by_name(cost)
    conv_macs = 8 * 5 * 5 * (3 * 3 * 3)  # outputs x (in_channels x kernel)
    fc_macs = 4 * 200
    assert layers["conv"].macs == conv_macs and layers["fc"].macs == fc_macs
    assert {(l.weight_bits, l.activation_bits) for l in cost.layers} == {(4, 8)}
    assert cost.macs == conv_macs + fc_macs
    assert cost.bitops == (conv_macs + fc_macs) * 4 * 8
    weights = 8 * 3 * 3 * 3 + 200 * 4
    assert cost.weight_bytes == math.ceil(weights * 4 / 8) + (8 + 4) * 4  # int4 weights, int32 biases
    assert cost.summary() == {"macs": cost.macs, "bitops": cost.bitops, "weight_bytes": cost.weight_bytes}
    assert json.loads(json.dumps(cost.summary())) == cost.summary()


def test_depthwise_and_grouped_convs_count_only_their_group():
    sim = QuantSim(DepthwiseNet(), torch.randn(1, 3, 6, 6), _config())
    layers = _by_name(model_cost(sim))
    assert layers["pw"].macs == 8 * 36 * 3
    assert layers["dw"].macs == 8 * 36 * 9  # depthwise: one input channel per output
    assert layers["gc"].macs == 8 * 36 * 4 * 9  # groups=2: 4 input channels per output
    assert layers["fc"].macs == 3 * 8


def test_conv_transpose_and_activation_matmul():
    layers = _by_name(model_cost(QuantSim(TransposedNet(), torch.randn(1, 3, 4, 4), _config())))
    assert layers["up"].op_type == "ConvTranspose" and layers["up"].macs == (4 * 4 * 4) * 4 * (2 * 2)
    functional = _by_name(model_cost(QuantSim(FunctionalNet(), torch.randn(1, 3, 4, 4), _config(activation_bits=16))))
    matmul = functional["matmul"]
    # (1, 8, 4, 4) @ (1, 8, 4, 4): 128 outputs, each a 4-term dot product of two activations
    assert matmul.op_type == "MatMul" and matmul.macs == 128 * 4
    assert (matmul.weight_bits, matmul.activation_bits) == (16, 16)


def test_activation_bits_come_from_the_quantizer_feeding_the_layer():
    # digits_mlp: input quantizer -> flatten (data movement) -> fc1; fc1+relu fused -> relu quantizer -> fc2
    sim = QuantSim(DigitsMLP(), torch.randn(1, 1, 8, 8), _config(weight_bits=8, activation_bits=16))
    cost = model_cost(sim)
    assert [(l.name, l.macs, l.weight_bits, l.activation_bits) for l in cost.layers] == [
        ("fc1", 64 * 64, 8, 16), ("fc2", 64 * 10, 8, 16)]
    assert cost.bitops == (64 * 64 + 64 * 10) * 8 * 16


def test_float_and_disabled_quantizers_count_as_16_and_32_bits():
    rules = [{"pattern": "fc2", "weight": {"dtype": "float16"}}, {"pattern": "fc1", "weight": {"enabled": False}}]
    sim = QuantSim(DigitsMLP(), torch.randn(1, 1, 8, 8), _config(modules=rules))
    layers = _by_name(model_cost(sim))
    assert layers["fc1"].weight_bits == FLOAT32_BITS and layers["fc2"].weight_bits == FLOAT16_BITS
    no_input = load_config({"defaults": {"weight": {"bitwidth": 8, "symmetric": True, "signed": True}, "activation": {"bitwidth": 8}},
                            "model_input": {"enabled": False}})
    layers = _by_name(model_cost(QuantSim(DigitsMLP(), torch.randn(1, 1, 8, 8), no_input)))
    assert layers["fc1"].activation_bits == FLOAT32_BITS and layers["fc2"].activation_bits == 8


def test_a_module_called_twice_counts_its_macs_twice_and_its_weights_once():
    cost = model_cost(QuantSim(SharedNet(), torch.randn(1, 6), _config()))
    assert [l.macs for l in cost.layers] == [36, 36]
    assert cost.weight_bytes == 36 + 6 * 4


def test_costs_scale_with_the_example_batch_and_need_nothing_calibrated():
    one = model_cost(QuantSim(StridedNet(), torch.randn(1, 3, 10, 10), _config()))
    four = model_cost(QuantSim(StridedNet(), torch.randn(4, 3, 10, 10), _config()))
    assert four.macs == 4 * one.macs and four.weight_bytes == one.weight_bytes


def test_a_graph_without_shapes_is_a_clear_error():
    sim = QuantSim(StridedNet(), torch.randn(1, 3, 10, 10), _config())
    for node in sim.model.graph.nodes:
        node.meta.pop("tensor_meta", None)
    with pytest.raises(ValueError, match="no tensor shape"):
        model_cost(sim)
