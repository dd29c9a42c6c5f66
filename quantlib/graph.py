"""Graph capture with torch.fx and the op-type vocabulary the quantization config speaks.

:func:`trace` turns any ``nn.Module`` into an ``fx.GraphModule``. Modules and functions that
timm marks as untraceable are kept as leaves/wrapped calls, so timm and torchvision models trace
without per-model code. :func:`decompose_attention` rewrites ``F.scaled_dot_product_attention``
into explicit matmul -> softmax -> matmul nodes, so attention matmuls get quantizers like any
other op. :func:`op_type` names every node with an ONNX operator name (Conv, Gemm, Relu, Add,
...), the names used by config files, as in AIMET's quantsim config.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn


class GraphCaptureError(RuntimeError):
    """torch.fx could not trace the model."""


def _timm_notrace() -> tuple[tuple, tuple]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm is optional for quantlib users
        return (), ()
    return tuple(timm_fx.get_notrace_functions()), tuple(timm_fx.get_notrace_modules())


class _QuantTracer(fx.Tracer):
    """fx tracer that treats torch.nn modules and timm's no-trace modules as leaves."""

    def __init__(self, leaf_types: tuple[type, ...], autowrap: tuple) -> None:
        super().__init__(autowrap_functions=autowrap)
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, extra_leaf_types: tuple[type, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` (not mutated) into a GraphModule sharing its parameters."""
    autowrap, leaves = _timm_notrace()
    tracer = _QuantTracer(leaves + tuple(extra_leaf_types), autowrap)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types; report them uniformly
        raise GraphCaptureError(
            f"torch.fx could not trace {type(model).__name__}: {err}. Make data-dependent control flow "
            "static, or pass the offending submodule types as extra_leaf_types"
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def decompose_attention(gm: fx.GraphModule) -> int:
    """Replace scaled_dot_product_attention calls with explicit nodes; returns how many.

    softmax(q @ k^T * scale + mask) @ v, with scale = 1/sqrt(head_dim) unless given. Calls with
    dropout or is_causal are left fused (they only occur in training).
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), node.args))
        args.update(node.kwargs)
        args = {name: _static_value(value) for name, value in args.items()}
        if args.get("dropout_p", 0.0) or args.get("is_causal", False) or args.get("enable_gqa", False):
            continue
        q, k, v, mask = args["query"], args["key"], args["value"], args.get("attn_mask")
        scale = args.get("scale")
        graph = gm.graph
        with graph.inserting_before(node):
            if scale is None:
                head_dim = graph.call_method("size", (q, -1))
                scale = graph.call_function(operator.truediv, (1.0, graph.call_function(math.sqrt, (head_dim,))))
            q_scaled = graph.call_function(operator.mul, (q, scale))
            k_t = graph.call_method("transpose", (k, -2, -1))
            logits = graph.call_function(operator.matmul, (q_scaled, k_t))
            if mask is not None:
                logits = graph.call_function(operator.add, (logits, mask))
            probs = graph.call_method("softmax", (logits,), {"dim": -1})
            out = graph.call_function(operator.matmul, (probs, v))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _static_value(value):
    """An optional forward argument left at its default traces as a placeholder: use the default."""
    if isinstance(value, fx.Node) and value.op == "placeholder" and value.args:
        return value.args[0]
    return value


_MODULE_OP_TYPES: dict[type, str] = {
    nn.Conv1d: "Conv", nn.Conv2d: "Conv", nn.Conv3d: "Conv",
    nn.ConvTranspose1d: "ConvTranspose", nn.ConvTranspose2d: "ConvTranspose",
    nn.Linear: "Gemm",
    nn.BatchNorm1d: "BatchNormalization", nn.BatchNorm2d: "BatchNormalization",
    nn.ReLU: "Relu", nn.ReLU6: "Clip", nn.Hardtanh: "Clip", nn.GELU: "Gelu", nn.SiLU: "Silu",
    nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Hardswish: "HardSwish", nn.Hardsigmoid: "HardSigmoid",
    nn.LeakyReLU: "LeakyRelu", nn.PReLU: "PRelu", nn.ELU: "Elu",
    nn.Softmax: "Softmax", nn.LogSoftmax: "LogSoftmax",
    nn.LayerNorm: "LayerNormalization", nn.GroupNorm: "GroupNormalization",
    nn.MaxPool1d: "MaxPool", nn.MaxPool2d: "MaxPool",
    nn.AvgPool1d: "AveragePool", nn.AvgPool2d: "AveragePool",
    nn.AdaptiveAvgPool1d: "GlobalAveragePool", nn.AdaptiveAvgPool2d: "GlobalAveragePool",
    nn.ZeroPad2d: "Pad", nn.ConstantPad2d: "Pad", nn.Upsample: "Resize", nn.Embedding: "Gather",
    nn.Dropout: "Identity", nn.Identity: "Identity", nn.Flatten: "Flatten",
}

_FUNCTION_OP_TYPES: dict = {
    operator.add: "Add", operator.iadd: "Add", torch.add: "Add",
    operator.sub: "Sub", torch.sub: "Sub",
    operator.mul: "Mul", operator.imul: "Mul", torch.mul: "Mul",
    operator.truediv: "Div", torch.div: "Div",
    operator.matmul: "MatMul", torch.matmul: "MatMul", torch.bmm: "MatMul", torch.mm: "MatMul",
    torch.cat: "Concat", torch.concat: "Concat", torch.stack: "Concat",
    F.relu: "Relu", torch.relu: "Relu", F.relu6: "Clip", F.hardtanh: "Clip", torch.clamp: "Clip",
    F.gelu: "Gelu", F.silu: "Silu", torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh",
    F.hardswish: "HardSwish", F.hardsigmoid: "HardSigmoid", F.leaky_relu: "LeakyRelu",
    F.softmax: "Softmax", torch.softmax: "Softmax", F.log_softmax: "LogSoftmax",
    F.layer_norm: "LayerNormalization", F.group_norm: "GroupNormalization",
    F.adaptive_avg_pool2d: "GlobalAveragePool", F.adaptive_avg_pool1d: "GlobalAveragePool",
    F.avg_pool2d: "AveragePool", F.max_pool2d: "MaxPool",
    torch.mean: "ReduceMean", torch.sum: "ReduceSum",
    F.pad: "Pad", F.interpolate: "Resize", F.linear: "Gemm", F.conv2d: "Conv",
    torch.flatten: "Flatten", torch.reshape: "Reshape", torch.permute: "Transpose",
    torch.transpose: "Transpose", torch.squeeze: "Squeeze", torch.unsqueeze: "Unsqueeze",
    operator.getitem: "Gather", F.dropout: "Identity", torch.chunk: "Split", torch.split: "Split",
    torch.unbind: "Split",
}

_METHOD_OP_TYPES: dict[str, str] = {
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div",
    "matmul": "MatMul", "bmm": "MatMul", "relu": "Relu", "relu_": "Relu", "sigmoid": "Sigmoid",
    "tanh": "Tanh", "softmax": "Softmax", "log_softmax": "LogSoftmax", "clamp": "Clip", "clip": "Clip",
    "mean": "ReduceMean", "sum": "ReduceSum", "flatten": "Flatten", "reshape": "Reshape", "view": "Reshape",
    "permute": "Transpose", "transpose": "Transpose", "contiguous": "Identity", "squeeze": "Squeeze",
    "unsqueeze": "Unsqueeze", "expand": "Expand", "chunk": "Split", "split": "Split", "unbind": "Split",
    "float": "Identity", "to": "Identity", "type_as": "Identity", "clone": "Identity", "detach": "Identity",
    "size": "Shape", "dim": "Shape", "repeat": "Tile", "flip": "Identity",
}

# Ops that only move, select or relabel values: their outputs take their input's quantization.
DATA_MOVEMENT_OPS = frozenset({
    "Identity", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Split",
    "Gather", "Shape", "Tile", "Pad",  # zero padding: 0 is on every grid
})


def op_type(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """ONNX-style op type of a node ("Conv", "Add", ...; the class/function name if unknown)."""
    if node.op == "placeholder":
        return "Input"
    if node.op == "output":
        return "Output"
    if node.op == "get_attr":
        return "Constant"
    if node.op == "call_module":
        module = modules[node.target]
        for cls in type(module).__mro__:
            if cls in _MODULE_OP_TYPES:
                return _MODULE_OP_TYPES[cls]
        if hasattr(module, "bn") or "BatchNorm" in type(module).__name__:
            return "BatchNormalization"
        return type(module).__name__
    if node.op == "call_method":
        return _METHOD_OP_TYPES.get(node.target, node.target)
    return _FUNCTION_OP_TYPES.get(node.target, getattr(node.target, "__name__", str(node.target)))


def scope_name(node: fx.Node) -> str:
    """Dotted module path for a module call, else the node name (used for glob overrides)."""
    return str(node.target) if node.op == "call_module" else node.name
