"""quantlib.quantsim / graph / batchnorm_fold / config / checkpoint on small hand-built models.

Quantizer placement is checked node by node against what the pipeline documents: a quantizer on
the model input and on every op output, none inside fusion supergroups (Conv+ReLU, Conv+BN+ReLU,
Gemm+ReLU, Add+ReLU, ...) and none after pure data-movement ops (flatten, reshape, transpose).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

from quantlib.affine import quantize
from quantlib.batchnorm_fold import fold_batch_norms, fold_bn_into
from quantlib.checkpoint import FORMAT, load_quantized_state_dict, pack_int4, quantized_state_dict, unpack_int4
from quantlib.config import load_config
from quantlib.graph import trace
from quantlib.qmodules import QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear
from quantlib.quantizer import FakeQuantizer, QuantizerNotCalibratedError
from quantlib.quantsim import QuantSim

try:
    from quantlib_models import Conv1dNet, DepthwiseNet, FunctionalNet, TransposedNet
except ImportError:  # tests/ imported as a package
    from tests.quantlib_models import Conv1dNet, DepthwiseNet, FunctionalNet, TransposedNet

# --------------------------------------------------------------------------------- models


class ResBlockNet(nn.Module):
    """Conv-BN-ReLU -> Conv-BN -> residual Add -> ReLU -> pool -> flatten -> Linear-ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        self.fcrelu = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)  # 15 weights: an odd count for int4 packing

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        y = self.relu2(z + y)
        y = torch.flatten(self.pool(y), 1)
        return self.fc2(self.fcrelu(self.fc(y)))


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


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh BNs fold to the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def build(cls, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(cls(**kwargs), seed + 1).eval()


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


IMG = (2, 3, 8, 8)
NO_QUANT = {
    "defaults": {"activation": {"enabled": False}, "weight": {"enabled": False}},
    "model_input": {"enabled": False},
    "model_output": {"enabled": False},
}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def calibrated(model, example, config="per_channel", batches=None) -> QuantSim:
    sim = QuantSim(model, example, config)
    sim.calibrate(batches if batches is not None else [randn(*example.shape, seed=s) for s in (10, 11)], progress=False)
    return sim


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


# ----------------------------------------------------------------------------- calibration


def test_quantizer_used_before_calibration_raises():
    sim = QuantSim(build(ResBlockNet), randn(*IMG))
    with pytest.raises(QuantizerNotCalibratedError, match="quantizer x has no encoding; run QuantSim.calibrate"):
        sim.model(randn(*IMG))
    with pytest.raises(QuantizerNotCalibratedError, match="<unnamed>"):
        FakeQuantizer(load_config("per_channel").activation)(torch.ones(3))


def test_calibrate_with_tqdm_accepts_x_y_tuples():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, 8, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen))
    loader = DataLoader(data, batch_size=4)
    sim = QuantSim(build(ResBlockNet), randn(*IMG))
    assert sim.calibrate(loader, progress=True) == 3
    assert all(q.has_encoding and not q.calibrating for q in sim.activation_quantizers().values())
    # the input range is the union of the 12 images' range
    x_all = data.tensors[0]
    lo, hi = sim.activation_quantizers()["x"].representable_range()
    assert lo.item() == pytest.approx(x_all.min().item(), abs=0.02)
    assert hi.item() == pytest.approx(x_all.max().item(), abs=0.02)
    # num_batches limits the pass; lists of (x, y) tuples work too
    pairs = [(x, y) for x, y in loader]
    assert sim.calibrate(pairs, num_batches=2, progress=False) == 2
    with pytest.raises(ValueError, match="calibration data is empty"):
        sim.calibrate([], progress=False)


def test_w8a8_output_close_to_fp32():
    model = build(ResBlockNet)
    data = [randn(8, 3, 8, 8, seed=s) for s in range(4)]
    sim = QuantSim(model, data[0])
    sim.calibrate(data, progress=False)
    with torch.no_grad():
        for x in data:
            assert rel_error(sim.model(x), model(x)) < 0.05
    # and quantization does change the numbers
    with torch.no_grad():
        assert not torch.equal(sim.model(data[0]), model(data[0]))


@pytest.mark.parametrize("cls, shape", [(FunctionalNet, (4, 3, 4, 4)), (DepthwiseNet, (4, 3, 6, 6)),
                                        (TransposedNet, (4, 3, 8, 8)), (Conv1dNet, (4, 3, 10))])
def test_w8a8_close_to_fp32_on_other_models(cls, shape):
    model = build(cls)
    data = [randn(*shape, seed=s) for s in range(3)]
    sim = QuantSim(model, data[0])
    sim.calibrate(data, progress=False)
    with torch.no_grad():
        assert rel_error(sim.model(data[1]), model(data[1])) < 0.05


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


# --------------------------------------------------------------- simulation vs integer kernels

NEAR_TIE = 0.04330708459019661  # with scale 1/127: x / s and x * (1 / s) round to different codes (6 vs 5)


def test_weights_use_exact_division_so_checkpoint_and_simulation_agree():
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, NEAR_TIE]]))
    x = torch.tensor([[0.0, 1.0], [1.0, 0.5]])
    for config in ("per_tensor", "per_channel"):
        sim = QuantSim(model, x, config)
        sim.calibrate([x], progress=False)
        module = sim.weight_modules()["0"]
        wq = module.weight_quantizer
        assert wq.exact
        # absmax 1 -> scale 1/127; 0.0433070846 / (1/127) = 5.49999... / 5.5 -> the ONNX division gives code 6
        assert wq.scale.item() == pytest.approx(1 / 127, rel=1e-7)
        with torch.no_grad():
            codes = (module.quantized_weight() / wq.scale.reshape(-1, 1)).round()
        stored = quantize(module.weight.detach(), wq.scale, wq.zero_point, wq.spec)
        assert codes.tolist() == [[127.0, 6.0]] and stored.tolist() == [[127, 6]]
        tensors, metadata = quantized_state_dict(sim)
        fresh = QuantSim(model, x, config)
        load_quantized_state_dict(fresh, tensors, metadata)
        with torch.no_grad():
            assert torch.equal(fresh.model(x), sim.model(x))


class SingleLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(x)


def test_simulated_bias_is_rounded_to_the_int32_grid():
    model = SingleLinear().eval()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[0.7, -0.3]]))
        model.fc.bias.fill_(0.0123)
    x = torch.tensor([[0.0, 2.55], [1.0, 2.0]])
    # W4A8 (symmetric per-channel int4 weights, asymmetric uint8 activations), output not quantized
    sim = QuantSim(model, x, {"defaults": {"weight": {"bitwidth": 4}}, "model_output": {"enabled": False}})
    sim.calibrate([x], progress=False)
    # input [0, 2.55] asymmetric uint8: scale 0.01, zero point 0 -> x is on the grid
    assert sim.activation_quantizers()["x"].scale.item() == pytest.approx(0.01, rel=1e-6)
    # weight int4 symmetric: absmax 0.7 / 7 = 0.1 -> codes [7, -3]; bias scale 0.01 * 0.1 = 0.001
    # int32 bias code round(0.0123 / 0.001) = 12 -> 0.012
    # row 1: 1.0 * 0.7 + 2.0 * -0.3 + 0.012 = 0.112 (the float bias gives 0.1123)
    with torch.no_grad():
        out = sim.model(x)
    assert out[1, 0].item() == pytest.approx(0.112, abs=1e-6)
