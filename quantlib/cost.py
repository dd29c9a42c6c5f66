"""Inference cost of a QuantSim: per-layer MACs and bit-operations (BOPs), and weight storage.

Bit-operations follow van Baalen et al., "Bayesian Bits: Unifying Quantization and Pruning"
(NeurIPS 2020): a layer that performs ``macs`` multiply-accumulates between ``b_w``-bit weights and
``b_a``-bit activations costs ``macs * b_w * b_a`` BOPs. A float32 operand counts as 32 bits, a
float16/bfloat16 passthrough as 16.

Counted layers (every call, so a module used twice counts twice):

* ``Conv`` (Conv1d/2d/3d, grouped and depthwise included) and ``Gemm`` (Linear), as modules or as
  ``F.conv*`` / ``F.linear`` calls;
* ``ConvTranspose`` modules;
* ``MatMul`` between two activations (e.g. decomposed attention): both operands use activation bits.

Element-wise ops, pooling and normalization are not counted (they have no MACs in this sense).
Shapes come from the shape propagation QuantSim ran on its ``example_input``, so the counts are
for one forward pass on that input: build the QuantSim with a one-sample input to get the cost
per inference (``quantzoo run`` does). Nothing is run and nothing is mutated.

The bits of an operand are those of the quantizer that produced it, looking back through pure
data-movement ops (reshape, transpose, zero padding, ...); an operand with no quantizer is float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from .graph import DATA_MOVEMENT_OPS, op_type
from .quantizer import FakeQuantizer

if TYPE_CHECKING:
    from .quantsim import QuantSim

FLOAT32_BITS = 32
FLOAT16_BITS = 16
BIAS_BYTES = 4  # biases are int32 codes (or float32 when the weight stays float)
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerCost:
    """One MAC layer call: ``macs`` multiply-accumulates between ``weight_bits`` and ``activation_bits`` operands.

    For ``MatMul`` (activation x activation), ``weight_bits`` is the bits of the second operand.
    """

    name: str
    op_type: str
    macs: int
    weight_bits: int
    activation_bits: int

    @property
    def bitops(self) -> int:
        """``macs * weight_bits * activation_bits``."""
        return self.macs * self.weight_bits * self.activation_bits


@dataclass(frozen=True)
class ModelCost:
    """Per-layer costs in graph order, and the bytes of the counted layers' weights at their bit-widths.

    ``weight_bytes``: every weight tensor of a counted layer packed at its weight bit-width (rounded up
    to whole bytes, each tensor counted once), plus 4 bytes per bias element.
    """

    layers: tuple[LayerCost, ...]
    weight_bytes: int

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def bitops(self) -> int:
        return sum(layer.bitops for layer in self.layers)

    def summary(self) -> dict[str, int]:
        """``{"macs", "bitops", "weight_bytes"}``: the ``cost`` block of a run record."""
        return {"macs": self.macs, "bitops": self.bitops, "weight_bytes": self.weight_bytes}


def quantizer_bits(quantizer: FakeQuantizer | None) -> int:
    """Bits a quantizer leaves its tensor with: its bitwidth, 16 for a float16/bfloat16 passthrough, else 32."""
    if quantizer is None or not quantizer.spec.enabled:
        return FLOAT32_BITS
    if quantizer.spec.is_float:
        return FLOAT16_BITS
    return quantizer.spec.bitwidth


def _shape(node: Any) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        name = node.name if isinstance(node, fx.Node) else repr(node)
        raise ValueError(f"node {name!r} has no tensor shape; model_cost needs the QuantSim's shape propagation "
                         "(build the QuantSim with an example_input)")
    return tuple(meta.shape)


class _Graph:
    """Looks up module types and operand bits on a QuantSim graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.modules = dict(gm.named_modules())

    def op_type(self, node: fx.Node) -> str:
        return op_type(node, self.modules)

    def operand_bits(self, node: Any) -> int:
        """Bits of the value ``node`` carries: the producing quantizer's, through data movement."""
        while isinstance(node, fx.Node):
            if node.op == "call_module" and isinstance(self.modules.get(node.target), FakeQuantizer):
                return quantizer_bits(self.modules[node.target])
            if self.op_type(node) not in DATA_MOVEMENT_OPS or not node.all_input_nodes:
                return FLOAT32_BITS
            node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node.all_input_nodes[0]
        return FLOAT32_BITS


def _conv_macs(out_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    # weight [out, in/groups, *kernel]: every output element sums in/groups * prod(kernel) products
    return math.prod(out_shape) * math.prod(weight_shape[1:])


def _transposed_macs(in_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    # weight [in, out/groups, *kernel]: every input element is scattered into out/groups * prod(kernel) outputs
    return math.prod(in_shape) * math.prod(weight_shape[1:])


def _module_cost(graph: _Graph, node: fx.Node, module: nn.Module, kind: str) -> LayerCost:
    weight_bits = quantizer_bits(getattr(module, "weight_quantizer", None))
    activation_bits = graph.operand_bits(node.args[0])
    weight_shape = tuple(module.weight.shape)
    if kind == "ConvTranspose":
        macs = _transposed_macs(_shape(node.args[0]), weight_shape)
    else:  # Conv and Gemm: weight [out, in(/groups), *kernel]
        macs = _conv_macs(_shape(node), weight_shape)
    return LayerCost(node.name, kind, macs, weight_bits, activation_bits)


def _function_cost(graph: _Graph, node: fx.Node, kind: str) -> LayerCost:
    first, second = node.args[0], node.args[1]
    activation_bits, other_bits = graph.operand_bits(first), graph.operand_bits(second)
    if kind == "MatMul":
        a_shape = _shape(first)
        macs = math.prod(_shape(node)) * a_shape[-1]
    else:  # F.conv* / F.linear with the weight as second argument
        macs = _conv_macs(_shape(node), _shape(second))
    return LayerCost(node.name, kind, macs, other_bits, activation_bits)


def model_cost(sim: QuantSim) -> ModelCost:
    """Per-layer MACs and BOPs of ``sim.model`` for one pass on the QuantSim's example input.

    Returns a :class:`ModelCost`; ``model_cost(sim).summary()`` is the record's ``cost`` block.
    Raises ValueError when the graph lacks the shapes QuantSim's shape propagation records.
    """
    gm = sim.model
    graph = _Graph(gm)
    layers: list[LayerCost] = []
    weight_bytes = 0
    counted_weights: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        kind = graph.op_type(node)
        if kind not in _MAC_OPS:
            continue
        if node.op == "call_module":
            module = graph.modules[node.target]
            if not isinstance(getattr(module, "weight", None), nn.Parameter):
                continue  # a leaf named like a MAC op without a weight of its own
            layer = _module_cost(graph, node, module, kind)
            weight, bias = module.weight, getattr(module, "bias", None)
        else:
            if len(node.args) < 2:
                continue
            layer = _function_cost(graph, node, kind)
            weight, bias = (_parameter(gm, node.args[1]) if kind != "MatMul" else None), None
        layers.append(layer)
        if weight is not None and id(weight) not in counted_weights:
            counted_weights.add(id(weight))
            weight_bytes += math.ceil(weight.numel() * layer.weight_bits / 8)
            if bias is not None:
                weight_bytes += bias.numel() * BIAS_BYTES
    return ModelCost(tuple(layers), weight_bytes)


def _parameter(gm: fx.GraphModule, node: Any) -> nn.Parameter | None:
    """The parameter a ``get_attr`` node reads, or None (a computed or buffer operand)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        return gm.get_parameter(node.target)
    except AttributeError:
        return None
