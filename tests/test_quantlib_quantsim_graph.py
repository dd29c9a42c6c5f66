"""quantlib.quantsim / graph / batchnorm_fold / config on small hand-built models: quantizer
placement, batch-norm folding and the config rules (op types, module globs, model input / output).

Quantizer placement is checked node by node against what the pipeline documents: a quantizer on
the model input and on every op output, none inside fusion supergroups (Conv+ReLU, Conv+BN+ReLU,
Gemm+ReLU, Add+ReLU, ...) and none after pure data-movement ops (flatten, reshape, transpose).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from quantlib.affine import quantize
from quantlib.batchnorm_fold import fold_batch_norms, fold_bn_into
from quantlib.config import load_config
from quantlib.graph import trace
from quantlib.qmodules import QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear
from quantlib.quantsim import QuantSim

from quantlib_models import Conv1dNet, DepthwiseNet, FunctionalNet, TransposedNet
from quantlib_quantsim_helpers import IMG, ResBlockNet, build, randn, rel_error


# -------------------------------------------------------------------------------------- models


class AttentionNet(nn.Module):
    """LayerNorm -> qkv Linear -> scaled_dot_product_attention -> proj Linear -> residual Add."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, t, d)) + x


class ConvDropoutReluNet(nn.Module):
    """Conv -> Dropout (a no-op in eval) -> ReLU -> Conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(self.relu(self.drop(self.conv(x))))


NO_QUANT = {
    "defaults": {"activation": {"enabled": False}, "weight": {"enabled": False}},
    "model_input": {"enabled": False},
    "model_output": {"enabled": False},
}


def node_named(sim: QuantSim, name: str) -> fx.Node:
    return next(n for n in sim.model.graph.nodes if n.name == name)


def is_quantizer_node(sim: QuantSim, node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith("activation_quantizers.")


# ----------------------------------------------------------------------- quantizer placement


def test_resblock_quantizers_inserted_where_expected():
    sim = QuantSim(build(ResBlockNet), randn(*IMG))
    # BNs folded into their convs, the BN nodes and modules are gone
    assert sim.folded_batch_norms == [("conv1", "bn1"), ("conv2", "bn2")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sim.model.modules())
    assert sim.op_types == {
        "x": "Input", "conv1": "Conv", "relu1": "Relu", "conv2": "Conv", "add": "Add", "relu2": "Relu",
        "pool": "GlobalAveragePool", "flatten": "Flatten", "fc": "Gemm", "fcrelu": "Relu", "fc2": "Gemm",
        "output": "Output",
    }
    # input, ReLU after conv1 (Conv+BN+ReLU fused), conv2 (feeds the Add), relu2 (Add+ReLU fused),
    # pool, fcrelu (Gemm+ReLU fused), fc2 (model output); nothing after flatten (data movement)
    assert set(sim.activation_quantizers()) == {"x", "relu1", "conv2", "relu2", "pool", "fcrelu", "fc2"}
    assert set(sim.weight_modules()) == {"conv1", "conv2", "fc", "fc2"}
    assert isinstance(sim.weight_modules()["conv1"], QuantConv2d)
    assert isinstance(sim.weight_modules()["fc"], QuantLinear)
    assert set(sim.param_quantizers()) == {"conv1.weight", "conv2.weight", "fc.weight", "fc2.weight"}
    assert sim.summary() == {"activation_quantizers": 7, "weight_quantizers": 4, "folded_batch_norms": 2}
    # fusion groups: members feed each other directly, without a quantizer in between
    assert [u.name for u in node_named(sim, "conv1").users] == ["relu1"]
    assert [u.name for u in node_named(sim, "add").users] == ["relu2"]
    assert [u.name for u in node_named(sim, "fc").users] == ["fcrelu"]
    # and both inputs of the Add are quantized
    add = node_named(sim, "add")
    assert all(is_quantizer_node(sim, a) for a in add.args)
    # the flatten output goes straight into fc
    assert [u.name for u in node_named(sim, "flatten").users] == ["fc"]
    # conv1 sees the quantized model input; quantizer specs from the per_channel preset
    assert node_named(sim, "conv1").args[0].target == "activation_quantizers.x"
    acts = sim.activation_quantizers()
    assert all(q.spec.bitwidth == 8 and not q.spec.symmetric for q in acts.values())
    wq = sim.weight_modules()["conv2"].weight_quantizer
    assert wq.spec.granularity == "per_channel" and wq.scale.shape == (8,)  # calibrated at construction


def test_fusion_groups_without_batchnorm_folding():
    sim = QuantSim(build(ResBlockNet), randn(*IMG), {"fold_batch_norms": False})
    assert sim.folded_batch_norms == []
    # conv1-bn1-relu1 is a (Conv, BN, Relu) group; conv2-bn2 a (Conv, BN) group whose BN output is quantized
    assert set(sim.activation_quantizers()) == {"x", "relu1", "bn2", "relu2", "pool", "fcrelu", "fc2"}
    assert [u.name for u in node_named(sim, "conv1").users] == ["bn1"]
    assert [u.name for u in node_named(sim, "bn1").users] == ["relu1"]
    assert [u.name for u in node_named(sim, "conv2").users] == ["bn2"]


def test_functional_ops_get_quantizers():
    sim = QuantSim(build(FunctionalNet), randn(2, 3, 4, 4))
    types = sim.op_types
    assert types["add"] == "Add" and types["mul"] == "Mul" and types["cat"] == "Concat"
    assert types["matmul"] == "MatMul" and types["mean"] == "ReduceMean" and types["mean_1"] == "ReduceMean"
    assert types["adaptive_avg_pool2d"] == "GlobalAveragePool" and types["transpose"] == "Transpose"
    assert set(sim.activation_quantizers()) == {
        "x", "conv", "mean", "add", "mul", "cat", "matmul", "adaptive_avg_pool2d", "mean_1", "cat_1", "fc",
    }
    # no quantizer after the data-movement transpose / flatten
    assert not any(is_quantizer_node(sim, u) for u in node_named(sim, "transpose").users)
    assert not any(is_quantizer_node(sim, u) for u in node_named(sim, "flatten").users)


def test_conv_transpose_model():
    sim = QuantSim(build(TransposedNet), randn(*IMG))
    assert sim.folded_batch_norms == [("up", "bn")]
    assert sim.op_types["up"] == "ConvTranspose"
    # ConvTranspose+ReLU is a supergroup of the per_channel preset
    assert set(sim.activation_quantizers()) == {"x", "conv", "relu", "head"}
    up = sim.weight_modules()["up"]
    assert isinstance(up, QuantConvTranspose2d)
    # ConvTranspose weights are [in, out, kh, kw]: the per-channel axis is 1
    assert up.weight_quantizer.spec.axis == 1
    assert up.weight_quantizer.scale.shape == (4,)
    absmax = up.weight.detach().abs().amax(dim=(0, 2, 3))
    assert torch.allclose(up.weight_quantizer.scale, absmax / 127, rtol=1e-6)


def test_conv1d_model():
    sim = QuantSim(build(Conv1dNet), randn(2, 3, 10))
    assert sim.folded_batch_norms == [("c1", "bn")]
    assert set(sim.activation_quantizers()) == {"x", "relu", "c2"}
    c1 = sim.weight_modules()["c1"]
    assert isinstance(c1, QuantConv1d) and c1.weight_quantizer.scale.shape == (6,)


def test_depthwise_and_grouped_convs():
    sim = QuantSim(build(DepthwiseNet), randn(2, 3, 6, 6))
    assert sim.folded_batch_norms == [("dw", "bn")]
    assert sim.op_types["act"] == "Clip"  # ReLU6
    # pw feeds the depthwise conv (quantized); dw+BN+ReLU6 and gc+ReLU are fused
    assert set(sim.activation_quantizers()) == {"x", "pw", "act", "relu", "mean", "fc"}
    dw, gc = sim.weight_modules()["dw"], sim.weight_modules()["gc"]
    assert dw.weight.shape == (8, 1, 3, 3) and dw.weight_quantizer.scale.shape == (8,)
    assert gc.weight.shape == (8, 4, 3, 3) and gc.weight_quantizer.scale.shape == (8,)
    # per-channel scales of the depthwise conv are each channel's absmax / 127
    assert torch.allclose(dw.weight_quantizer.scale, dw.weight.detach().abs().amax(dim=(1, 2, 3)) / 127, rtol=1e-6)


def test_attention_is_decomposed_into_quantized_matmuls():
    model = build(AttentionNet)
    x = randn(2, 5, 8)
    sim = QuantSim(model, x)
    assert not any(n.target is F.scaled_dot_product_attention for n in sim.model.graph.nodes)
    matmuls = [n for n, t in sim.op_types.items() if t == "MatMul"]
    assert matmuls == ["matmul", "matmul_1"]
    assert set(sim.activation_quantizers()) == {"x", "norm", "qkv", "mul", "matmul", "softmax", "matmul_1", "proj", "add"}
    # decomposition is exact: with quantization off, the output equals the fused attention
    plain = QuantSim(model, x, NO_QUANT)
    with torch.no_grad():
        assert rel_error(plain.model(x), model(x)) < 1e-6


def test_dropout_is_an_identity_op_and_relu_output_is_quantized():
    """Dropout maps to the Identity op type (data movement: no quantizer of its own)."""
    sim = QuantSim(build(ConvDropoutReluNet), randn(2, 3, 6, 6))
    assert sim.op_types["drop"] == "Identity"
    assert "relu" in sim.activation_quantizers()


def test_identity_between_conv_and_relu_keeps_the_fusion():
    sim = QuantSim(build(ConvDropoutReluNet), randn(2, 3, 6, 6))
    assert "conv" not in sim.activation_quantizers()


# ------------------------------------------------------------------------------ BN folding


def test_fold_bn_into_hand_computed():
    conv = nn.Conv2d(1, 1, 1)
    bn = nn.BatchNorm2d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(3.0)
        bn.weight.fill_(3.0)
        bn.bias.fill_(0.25)
    fold_bn_into(conv, bn)
    # std = sqrt(3 + 1) = 2, factor = gamma / std = 1.5
    # w' = 2 * 1.5 = 3;  b' = (1 - 0.5) * 1.5 + 0.25 = 1.0
    assert conv.weight.item() == 3.0
    assert conv.bias.item() == 1.0


def test_fold_bn_adds_a_bias_when_the_layer_has_none():
    lin = nn.Linear(2, 2, bias=False)
    bn = nn.BatchNorm1d(2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        bn.running_var.copy_(torch.tensor([4.0 - 1e-5, 1.0 - 1e-5]))  # std 2 and 1
        bn.bias.copy_(torch.tensor([0.5, 0.0]))
    fold_bn_into(lin, bn)
    # factor = [1/2, 1]: rows scaled; bias = (0 - mean) * factor + beta = [-0.5 + 0.5, 1.0]
    assert torch.allclose(lin.weight, torch.tensor([[0.5, 1.0], [3.0, 4.0]]))
    assert torch.allclose(lin.bias, torch.tensor([0.0, 1.0]), atol=1e-6)


@pytest.mark.parametrize(
    "cls, kwargs, shape",
    [
        (ResBlockNet, {}, IMG),
        (TransposedNet, {"groups": 1}, IMG),
        (TransposedNet, {"groups": 2}, IMG),
        (Conv1dNet, {}, (2, 3, 10)),
        (DepthwiseNet, {}, (2, 3, 6, 6)),
    ],
)
def test_batchnorm_folding_is_exact_in_eval_mode(cls, kwargs, shape):
    model = build(cls, **kwargs)
    x = randn(*shape, seed=3)
    sim = QuantSim(model, x, NO_QUANT)
    assert len(sim.folded_batch_norms) >= 1
    assert sim.activation_quantizers() == {}
    with torch.no_grad():
        assert rel_error(sim.model(x), model(x)) < 1e-5


def test_fold_batch_norms_skips_a_bn_whose_conv_has_two_users():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = build(TwoUsers)
    gm = trace(model)
    assert fold_batch_norms(gm) == []
    x = randn(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))


def test_original_model_is_not_mutated():
    model = build(ResBlockNet)
    model.train()  # also keeps its training flag
    before = copy.deepcopy(model.state_dict())
    sim = QuantSim(model, randn(*IMG))
    sim.calibrate([randn(*IMG, seed=5)], progress=False)
    with torch.no_grad():
        sim.model(randn(*IMG))
    assert model.training and model.bn1.training
    assert isinstance(model.bn1, nn.BatchNorm2d) and type(model.conv1) is nn.Conv2d
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sim.model.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()


# ---------------------------------------------------------------------------- config rules


def test_softmax_output_disabled_by_op_type():
    model, x = build(AttentionNet), randn(2, 5, 8)
    assert "softmax" in QuantSim(model, x).activation_quantizers()
    sim = QuantSim(model, x, {"op_types": {"Softmax": {"output": {"enabled": False}}}})
    assert "softmax" not in sim.activation_quantizers()
    softmax = node_named(sim, "softmax")
    assert [u.name for u in softmax.users] == ["matmul_1"]
    assert {"matmul", "matmul_1"} <= set(sim.activation_quantizers())


def test_module_glob_override_puts_first_conv_at_4_bits():
    config = load_config("per_channel").with_module_rules([{"pattern": "conv1", "weight": {"bitwidth": 4}}])
    sim = QuantSim(build(ResBlockNet), randn(*IMG), config)
    bits = {name: q.spec.bitwidth for name, q in sim.param_quantizers().items()}
    assert bits == {"conv1.weight": 4, "conv2.weight": 8, "fc.weight": 8, "fc2.weight": 8}
    conv1 = sim.weight_modules()["conv1"]
    codes = quantize(conv1.weight.detach(), conv1.weight_quantizer.scale, conv1.weight_quantizer.zero_point,
                     conv1.weight_quantizer.spec)
    # signed 4-bit symmetric grid: codes in [-8, 7] and the extreme of each channel at +-7
    assert codes.min().item() >= -8 and codes.max().item() <= 7
    assert codes.abs().reshape(8, -1).amax(dim=1).tolist() == [7] * 8
    # a glob matches several modules; later rules win
    config = load_config("per_channel").with_module_rules([
        {"pattern": "fc*", "weight": {"bitwidth": 6}, "output": {"bitwidth": 16}},
        {"pattern": "fc2", "weight": {"bitwidth": 5}},
    ])
    sim = QuantSim(build(ResBlockNet), randn(*IMG), config)
    assert sim.param_quantizers()["fc.weight"].spec.bitwidth == 6
    assert sim.param_quantizers()["fc2.weight"].spec.bitwidth == 5
    acts = sim.activation_quantizers()
    # output rules match the node's module path: "fc*" matches fcrelu and fc2 (fc itself is fused, no output)
    assert {n: q.spec.bitwidth for n, q in acts.items()} == {
        "x": 8, "relu1": 8, "conv2": 8, "relu2": 8, "pool": 8, "fcrelu": 16, "fc2": 16,
    }


def test_model_output_disabled():
    sim = QuantSim(build(ResBlockNet), randn(*IMG), {"model_output": {"enabled": False}})
    assert "fc2" not in sim.activation_quantizers()
    assert set(sim.activation_quantizers()) == {"x", "relu1", "conv2", "relu2", "pool", "fcrelu"}


def test_model_output_rule_reaches_through_data_movement():
    class PoolHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return torch.flatten(self.pool(self.conv(x)), 1)

    sim = QuantSim(build(PoolHead), randn(*IMG), {"model_output": {"bitwidth": 16}})
    acts = sim.activation_quantizers()
    assert set(acts) == {"x", "conv", "pool"}
    assert acts["pool"].spec.bitwidth == 16  # feeds the output through flatten
    assert acts["conv"].spec.bitwidth == 8 and acts["x"].spec.bitwidth == 8


def test_model_input_rule():
    sim = QuantSim(build(ResBlockNet), randn(*IMG), {"model_input": {"enabled": False}})
    assert "x" not in sim.activation_quantizers()
    sim = QuantSim(build(ResBlockNet), randn(*IMG), {"model_input": {"symmetric": True, "signed": True}})
    assert sim.activation_quantizers()["x"].spec.signed
