"""Find the channel-prunable units of a traced float model.

A unit is a *producer* layer (ungrouped Conv2d or Linear) whose output reaches exactly one
*consumer* layer (ungrouped Conv2d or Linear) through a chain of single-user, channel-wise nodes:
activations, identity/dropout, pooling, flatten of a ``[N, C, 1, 1]`` tensor, depthwise convs and
leftover BatchNorms. Removing output channel ``c`` of the producer removes channel ``c`` of every
depthwise conv/BatchNorm in the chain and input channel ``c`` of the consumer, and nothing else in
the model sees the difference. Outputs that feed a residual add, a concat or a second user are not
units (pruning them would need every member of the group pruned alike).

The chain is checked on the node shapes that :func:`quantlib.compress.prepare.record_shapes` stored:
every node in it must keep the channel count on axis 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ..graph import op_type

# Ops that act on each channel separately and keep it on axis 1.
_CHANNELWISE_OPS = frozenset({
    "Relu", "Clip", "Silu", "Gelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu",
    "Identity", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten",
})


@dataclass(frozen=True)
class ChannelUnit:
    """One prunable channel set: ``channels`` outputs of ``producer`` feeding ``consumer``'s inputs.

    ``between``: module names of depthwise convs and BatchNorms in the chain (sliced alike).
    The unit is named after its consumer, the layer whose input channels are pruned and re-fit,
    as in AIMET's channel pruning.
    """

    producer: str
    consumer: str
    between: tuple[str, ...]
    channels: int

    @property
    def name(self) -> str:
        return self.consumer


def _is_dense_layer(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)


def _is_depthwise(module: nn.Module, channels: int) -> bool:
    return type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels == channels


def _channels_kept(node: fx.Node, channels: int) -> bool:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return shape is not None and len(shape) >= 2 and shape[1] == channels


def _follow(node: fx.Node, modules: dict[str, nn.Module], channels: int) -> tuple[fx.Node, list[str]] | None:
    """(consumer node, between names) reached from ``node`` through a channel-wise chain, else None."""
    between: list[str] = []
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None
        nxt = users[0]
        if not nxt.args or nxt.args[0] is not current or any(
                isinstance(a, fx.Node) for a in list(nxt.args[1:]) + list(nxt.kwargs.values())):
            return None  # the value enters a multi-input op (add, mul, cat) or is not the first argument
        module = modules.get(nxt.target) if nxt.op == "call_module" else None
        if module is not None and _is_dense_layer(module):
            return nxt, between
        if module is not None and (_is_depthwise(module, channels) or isinstance(module, nn.modules.batchnorm._BatchNorm)):
            if not _channels_kept(nxt, channels):
                return None
            between.append(nxt.target)
        elif op_type(nxt, modules) in _CHANNELWISE_OPS and _channels_kept(nxt, channels):
            if module is not None and list(module.parameters()):
                return None  # an activation with per-channel parameters (PReLU) would need slicing too
        else:
            return None
        current = nxt


def find_channel_units(gm: fx.GraphModule) -> list[ChannelUnit]:
    """Every prunable unit of ``gm`` (not mutated), in graph order of the producers."""
    modules = dict(gm.named_modules())
    units: list[ChannelUnit] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_dense_layer(modules[node.target]):
            continue
        producer = modules[node.target]
        channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        found = _follow(node, modules, channels)
        if found is None:
            continue
        consumer_node, between = found
        consumer = modules[consumer_node.target]
        inputs = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
        arg_meta = getattr(consumer_node.args[0].meta.get("tensor_meta"), "shape", None)
        if inputs != channels or arg_meta is None or (isinstance(consumer, nn.Linear) and len(arg_meta) != 2):
            continue  # e.g. a Linear reading a flattened [N, C*H*W] map: channel c is not one input
        units.append(ChannelUnit(node.target, consumer_node.target, tuple(between), channels))
    return units
