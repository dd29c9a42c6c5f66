"""Find consecutive weight-layer pairs in an fx graph (the pairs CLE and high-bias absorption act on).

A pair is ``first -> (pass-through ops and at most one activation) -> second`` where:

* ``first`` and ``second`` are ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` modules (exact types, as
  QuantSim quantizes; grouped and depthwise convs included) of the same kind, each called once;
* every tensor between them has exactly one user, so rescaling ``first``'s output channels
  reaches nothing but ``second`` (residual branches and model outputs break a pair);
* the ops in between commute with a positive per-channel scale: identity/dropout, zero padding,
  max and average pooling, and the activations ReLU and LeakyReLU -- or are a clip: ReLU6,
  Hardtanh, ``clamp`` with scalar or per-channel (tensor) bounds. A clip does *not* commute with
  a scale (``relu6(x / s) != relu6(x) / s``) but ``clip(x / s, lo / s, hi / s) == clip(x, lo, hi) / s``,
  so its pairs are reported with their bounds (``activation.kind`` "relu6" or "clip") and the
  caller skips them, converts ReLU6 to ReLU, or rescales the bounds per channel (see
  :mod:`quantlib.ptq.cle`).

Pairs sharing a layer form a chain (conv -> depthwise -> pointwise in MobileNet/EfficientNet
blocks); :func:`chains_of` groups them in forward order. Nothing here mutates the graph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

WEIGHT_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)

_IDENTITY_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)


@dataclass(frozen=True, eq=False)
class Activation:
    """An elementwise activation: ``kind`` is relu | relu6 | leaky_relu | clip | identity.

    ``low``/``high`` are the clip bounds (relu: 0, inf; relu6: 0, 6): floats, or 1-D tensors with
    one bound per channel for a per-channel clip (what CLE leaves after rescaling a ReLU6);
    ``slope`` is the negative slope of leaky_relu. Compared by identity (bounds may be tensors).
    """

    kind: str
    low: float | torch.Tensor = float("-inf")
    high: float | torch.Tensor = float("inf")
    slope: float = 0.0

    @property
    def positive_homogeneous(self) -> bool:
        """True when act(s * x) == s * act(x) for every s > 0 (what CLE needs)."""
        return self.kind in ("relu", "leaky_relu", "identity")

    @property
    def is_clip(self) -> bool:
        """A clip to [low, high] (ReLU6, Hardtanh, clamp): equalizable by rescaling its bounds."""
        return self.kind in ("relu6", "clip")

    @property
    def per_channel(self) -> bool:
        """True when the bounds are per-channel tensors."""
        return isinstance(self.low, torch.Tensor) or isinstance(self.high, torch.Tensor)


IDENTITY = Activation("identity")
RELU = Activation("relu", low=0.0)
RELU6 = Activation("relu6", low=0.0, high=6.0)


def _clip_activation(low: float | torch.Tensor, high: float | torch.Tensor) -> Activation:
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        return Activation("clip", low=low, high=high)
    if low == 0.0 and high == 6.0:
        return RELU6
    if low == 0.0 and high == float("inf"):
        return RELU
    return Activation("clip", low=low, high=high)


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_NOT_CONSTANT = object()


def _bound(value, modules: dict[str, nn.Module], default: float):
    """A clamp bound as a float or a 1-D tensor (a ``get_attr`` of the graph); _NOT_CONSTANT otherwise."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "get_attr" and "" in modules:
        attr = modules[""]
        for part in str(value.target).split("."):
            attr = getattr(attr, part, None)
        if isinstance(attr, torch.Tensor):
            return attr.detach().flatten()
    return _NOT_CONSTANT


def _clamp_activation(node: fx.Node, modules: dict[str, nn.Module]) -> Activation | None:
    low = _bound(_arg(node, 1, "min", None), modules, float("-inf"))
    high = _bound(_arg(node, 2, "max", None), modules, float("inf"))
    if low is _NOT_CONSTANT or high is _NOT_CONSTANT:
        return None
    return _clip_activation(low, high)


def activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> Activation | None:
    """The activation a node computes, or None when it is not a known elementwise activation.

    ``modules`` is ``dict(gm.named_modules())`` (its ``""`` entry, the graph module, is where
    per-channel clamp bounds are read from).
    """
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.ReLU):
            return RELU
        if isinstance(module, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
            return _clip_activation(float(module.min_val), float(module.max_val))
        if isinstance(module, nn.LeakyReLU):
            return Activation("leaky_relu", low=float("-inf"), slope=float(module.negative_slope))
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return RELU
        if node.target is F.relu6:
            return RELU6
        if node.target is F.hardtanh:
            return _clip_activation(float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0)))
        if node.target is F.leaky_relu:
            return Activation("leaky_relu", slope=float(_arg(node, 1, "negative_slope", 0.01)))
        if node.target in (torch.clamp, torch.clip):
            return _clamp_activation(node, modules)
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return RELU
    if node.op == "call_method" and node.target in ("clamp", "clip"):
        return _clamp_activation(node, modules)
    return None


def is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Identity in eval mode: nn.Identity, dropout."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _IDENTITY_MODULES)
    if node.op == "call_function":
        return node.target in (F.dropout, F.dropout1d, F.dropout2d)
    return node.op == "call_method" and node.target in ("contiguous", "clone", "detach")


def is_zero_pad(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Constant padding with zeros (it commutes with a per-channel scale)."""
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, (nn.ZeroPad1d, nn.ZeroPad2d)) or (
            isinstance(module, (nn.ConstantPad1d, nn.ConstantPad2d)) and float(module.value) == 0.0)
    if node.op == "call_function" and node.target is F.pad:
        mode = _arg(node, 2, "mode", "constant")
        value = _arg(node, 3, "value", None)
        return mode == "constant" and (value is None or float(value) == 0.0)
    return False


def is_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Max or average pooling (per channel, positive homogeneous)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _POOL_MODULES)
    return node.op == "call_function" and node.target in _POOL_FUNCTIONS


def weight_layer(node: fx.Node, modules: dict[str, nn.Module], call_counts: Counter) -> nn.Module | None:
    """The Conv1d/Conv2d/Linear a node calls, if it is called from this node only."""
    if node.op != "call_module" or call_counts[node.target] != 1:
        return None
    module = modules[node.target]
    return module if type(module) in WEIGHT_LAYER_TYPES else None


@dataclass(frozen=True)
class LayerPair:
    """``first`` -> ``activation`` -> ``second`` (module names); ``activation_node`` is its fx node name."""

    first: str
    second: str
    activation: Activation = IDENTITY
    activation_node: str | None = None


def module_call_counts(gm: fx.GraphModule) -> Counter:
    """How many graph nodes call each module."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def _follow(start: fx.Node, modules: dict[str, nn.Module], call_counts: Counter) -> tuple[fx.Node, Activation, fx.Node | None] | None:
    """Walk the single-user path after ``start`` to the next weight layer, or None."""
    node, activation, act_node = start, IDENTITY, None
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if weight_layer(user, modules, call_counts) is not None:
            if user.args and user.args[0] is node and len(user.all_input_nodes) == 1:
                return user, activation, act_node
            return None
        found = activation_of(user, modules)
        if found is not None:
            if act_node is not None or not (found.positive_homogeneous or found.is_clip):
                return None
            activation, act_node = found, user
        elif not (is_identity(user, modules) or is_zero_pad(user, modules) or is_pool(user, modules)):
            return None
        if user.args[:1] != (node,):  # the tensor must be the op's data input
            return None
        node = user


def _compatible(first: nn.Module, second: nn.Module) -> bool:
    if type(first) is not type(second):
        return False
    produced = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    consumed = second.in_features if isinstance(second, nn.Linear) else second.in_channels
    return produced == consumed


def find_layer_pairs(gm: fx.GraphModule) -> list[LayerPair]:
    """Every equalizable pair of ``gm`` in graph order, ReLU6 pairs included (see module doc)."""
    modules = dict(gm.named_modules())
    call_counts = module_call_counts(gm)
    pairs = []
    for node in gm.graph.nodes:
        first = weight_layer(node, modules, call_counts)
        if first is None:
            continue
        found = _follow(node, modules, call_counts)
        if found is None:
            continue
        second_node, activation, act_node = found
        if not _compatible(first, modules[second_node.target]):
            continue
        pairs.append(LayerPair(node.target, second_node.target, activation, act_node.name if act_node else None))
    return pairs


def chains_of(pairs: list[LayerPair]) -> list[list[LayerPair]]:
    """Group pairs into chains ``a -> b -> c ...`` (each pair in exactly one chain), forward order."""
    by_first = {p.first: p for p in pairs}
    seconds = {p.second for p in pairs}
    chains = []
    for pair in pairs:
        if pair.first in seconds:
            continue  # not the head of its chain
        chain = [pair]
        while chain[-1].second in by_first:
            chain.append(by_first[chain[-1].second])
        chains.append(chain)
    return chains

