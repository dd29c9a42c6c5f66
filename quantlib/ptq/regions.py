"""Regions of an fx graph that a reconstruction pass optimizes as one unit.

A :class:`Region` is a run of graph nodes with exactly one tensor input from outside (the value
of ``input``) and one output (its last node), holding one or more selected weight layers.

* :func:`layer_regions`: one region per weight layer, the layer's call alone (layer-wise
  AdaRound/AdaQuant: the region's input is the layer's input).
* :func:`block_regions`: BRECQ's blocks (Li et al., ICLR 2021, "BRECQ: Pushing the Limit of
  Post-Training Quantization by Block Reconstruction"). The graph is cut where a single value is
  live (every later node depends on earlier ones only through it); consecutive pieces whose weight
  layers belong to the same parent module (``blocks.1.0`` for ``blocks.1.0.conv_pw``) form one
  region, so a residual block with its skip connection, or a conv -> BN -> ReLU6 -> conv chain of
  one block, is reconstructed jointly at its output.

:class:`RegionData` is what a pass receives for a region: the cached inputs (from the quantized
model), the float reference's inputs and outputs, and :meth:`RegionData.forward`, which runs the
region's nodes of the quantized model with caller-given weights for its weight layers (activation
quantizers inside the region stay on).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .chunk_store import CachedChunks, ChunkStore
from .layer_ops import layer_forward


class NodeRunner:
    """Executes single fx nodes of one GraphModule (what fx.Interpreter does, one node at a time)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def attr(self, target: str) -> Any:
        return functools.reduce(getattr, target.split("."), self.gm)

    def run(self, node: fx.Node, fetch: Callable[[fx.Node], Any]) -> Any:
        args = fx.node.map_arg(node.args, fetch)
        kwargs = fx.node.map_arg(node.kwargs, fetch)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        raise RuntimeError(f"cannot execute fx node {node.name} of kind {node.op}")


@dataclass(frozen=True, eq=False)
class Region:
    """``nodes`` (graph order) read the outside value of ``input`` only; ``layers`` are the
    selected weight layers among them (module names), ``name`` names the region in reports."""

    name: str
    input: fx.Node
    nodes: tuple[fx.Node, ...]
    layers: tuple[str, ...]

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]


def layer_regions(gm: fx.GraphModule, layers: Sequence[str]) -> list[Region]:
    """One region per layer of ``layers``: its call node, reading its first argument. Raises
    KeyError for a layer the graph does not call, ValueError for one called more than once or
    without a tensor argument."""
    calls = _layer_calls(gm, layers)
    regions = []
    for node in calls:
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            raise ValueError(f"layer {node.target} takes no tensor argument in the graph")
        regions.append(Region(name=str(node.target), input=source, nodes=(node,), layers=(str(node.target),)))
    return regions


def block_regions(gm: fx.GraphModule, layers: Sequence[str]) -> list[Region]:
    """BRECQ blocks over ``layers`` (see the module docstring), in graph order.

    Nodes between two cuts that hold no selected layer join the region before them (a residual
    add, or a norm layer, joins its block), unless they hold a quantized weight layer (one with
    a ``weight_quantizer``) left out of ``layers``, e.g. by an ``exclude`` pattern: those end
    the region before them and belong to none, so a region's output never lies past an
    unselected layer. Every selected layer lands in exactly one region.
    """
    calls = _layer_calls(gm, layers)
    layer_of = {node: str(node.target) for node in calls}
    modules = dict(gm.named_modules())

    def holds_unselected_layer(piece: list[fx.Node]) -> bool:
        return any(n.op == "call_module" and n not in layer_of and hasattr(modules[str(n.target)], "weight_quantizer")
                   for n in piece)

    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    pieces: list[list[fx.Node]] = [[]]
    cut_before: list[fx.Node] = []
    for node, is_cut in zip(nodes, _cuts(nodes)):
        if node.op == "placeholder":
            cut_before.append(node)
            continue
        pieces[-1].append(node)
        if is_cut:
            pieces.append([])
            cut_before.append(node)
    regions: list[Region] = []
    groups: list[tuple[fx.Node, list[fx.Node], list[str], str | None]] = []
    for start, piece in zip(cut_before, pieces):
        if not piece:
            continue
        names = [layer_of[n] for n in piece if n in layer_of]
        parents = {_parent(name) for name in names}
        if groups and ((not names and not holds_unselected_layer(piece)) or (len(parents) == 1 and groups[-1][3] in parents)):
            groups[-1][1].extend(piece)
            groups[-1][2].extend(names)
            continue
        groups.append((start, list(piece), names, parents.pop() if len(parents) == 1 else None))
    for start, group_nodes, names, parent in groups:
        if not names:
            continue
        label = parent if parent else names[0]
        regions.append(Region(name=label, input=start, nodes=tuple(group_nodes), layers=tuple(names)))
    return regions


def _parent(module_name: str) -> str:
    return module_name.rsplit(".", 1)[0] if "." in module_name else ""


def _layer_calls(gm: fx.GraphModule, layers: Sequence[str]) -> list[fx.Node]:
    wanted = set(layers)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in wanted]
    missing = sorted(wanted - {n.target for n in calls})
    if missing:
        raise KeyError(f"layer {missing[0]!r} is not called in the model graph")
    if len(calls) != len(wanted):
        raise ValueError("a selected layer is called more than once; layer-wise passes need one call per layer")
    return calls


def _cuts(nodes: list[fx.Node]) -> list[bool]:
    """For each node: after it runs, is its own value the only one a later node still reads?"""
    index = {n: i for i, n in enumerate(nodes)}
    last_read = [max((index[u] for u in n.users if u in index), default=-1) for n in nodes]
    cuts = []
    for i in range(len(nodes)):
        crossing = sum(1 for j in range(i + 1) if last_read[j] > i)  # values made by i and read after it
        cuts.append(crossing == 1 and last_read[i] > i)
    return cuts


@dataclass
class RegionData(CachedChunks):
    """The cached data of one region, as a block-wise pass receives it.

    Chunk ``i`` holds ``batch_size`` samples: ``inputs(i)`` is the region's input from the
    quantized model as optimized so far, ``float_inputs(i)`` the float reference's input and
    ``targets(i)`` the float reference's region output for the same samples. With
    ``weight_key`` set, ``output_weights(i)`` holds per-element weights of the region's squared
    output error, shaped like ``targets(i)`` (see :mod:`quantlib.ptq.output_fisher`).
    """

    region: Region
    runner: NodeRunner
    store: ChunkStore
    input_key: str
    float_input_key: str
    target_key: str
    weight_key: str | None = None
    modules: dict[str, nn.Module] = field(init=False)  # the region's weight layers by name

    def __post_init__(self) -> None:
        self.modules = {name: self.runner.modules[name] for name in self.region.layers}

    @property
    def name(self) -> str:
        return self.region.name

    def output_weights(self, index: int) -> torch.Tensor | None:
        """Chunk ``index``'s weights of the squared output error, or None (every element counts once)."""
        return None if self.weight_key is None else self.store.get(self.weight_key, index)

    def forward(self, x: torch.Tensor, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """The region's output for input ``x``, each layer named in ``weights`` computed with the
        given (weight, bias) in place of its own (see :func:`~quantlib.ptq.layer_ops.layer_forward`);
        every other node, activation quantizers included, runs as the model runs it. Call it
        inside :meth:`float_arithmetic` so that no output quantizer takes a float layer output for
        an integer kernel's."""
        values: dict[fx.Node, Any] = {self.region.input: x}

        def fetch(node: fx.Node) -> Any:
            if node.op == "get_attr":
                return self.runner.attr(node.target)
            return values[node]

        for node in self.region.nodes:
            name = str(node.target) if node.op == "call_module" else None
            if name in weights:
                weight, bias = weights[name]
                values[node] = layer_forward(self.modules[name], fetch(node.args[0]), weight, bias)
            else:
                values[node] = self.runner.run(node, fetch)
        return values[self.region.output]

    @contextlib.contextmanager
    def float_arithmetic(self) -> Iterator[None]:
        """Integer kernels of the region's layers off (restored on exit)."""
        saved = {name: getattr(module, "integer_arithmetic", None) for name, module in self.modules.items()}
        try:
            for module in self.modules.values():
                if hasattr(module, "integer_arithmetic"):
                    module.integer_arithmetic = False
            yield
        finally:
            for name, value in saved.items():
                if value is not None:
                    self.modules[name].integer_arithmetic = value
