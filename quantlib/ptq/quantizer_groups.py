"""Quantizer groups of a QuantSim, and switching quantizers on, off or to another format.

A *layer group* is one or more weight layers plus the activation quantizer that feeds them (found
by walking back from the layer's input through data-movement ops such as Flatten); layers fed by
the same quantizer share a group, as in AIMET's mixed-precision quantizer groups. Bit-ops of a
group are ``MACs x weight bits x input-activation bits``, so a group is the unit whose precision
a mixed-precision search changes. Activation quantizers that feed no weight layer (residual adds,
the model output, ...) form *activation groups* of their own.

Quantizers are switched through their spec (``spec.enabled``, ``spec.bitwidth``); every switch
bumps the quantizer's ``version`` so the quantized weight and int32 bias cached by the weight
modules are recomputed.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import fx

from ..graph import DATA_MOVEMENT_OPS, scope_name
from ..observers import build_observer
from ..qmodules import QuantizedWeightMixin
from ..quantizer import FakeQuantizer
from ..quantsim import QuantSim
from ..spec import QuantizerSpec
from .float_parameters import restore_float_parameters


ACTIVATION_GROUP_PREFIX = "act:"


@dataclass(frozen=True)
class QuantizerGroup:
    """Quantizers whose precision is analysed or chosen together.

    Attributes:
        name: the first weight module's name, or ``act:`` and the activation quantizer's name
            (a quantizer is named after its node, which can share a module's name).
        modules: weight module names (``sim.weight_modules()`` keys), in graph order.
        activation_quantizers: names (``sim.activation_quantizers()`` keys) of the activation
            quantizers feeding the modules, or the group's own activation quantizer.
    """

    name: str
    modules: tuple[str, ...]
    activation_quantizers: tuple[str, ...]

    @property
    def kind(self) -> str:
        """"layer" (weights and their input activation) or "activation" (activation only)."""
        return "layer" if self.modules else "activation"

    @property
    def weight_quantizers(self) -> tuple[str, ...]:
        """Names of the weight quantizers as in ``sim.param_quantizers()``."""
        return tuple(f"{m}.weight" for m in self.modules)

    @property
    def quantizers(self) -> tuple[str, ...]:
        """Every quantizer name of the group (as in ``sim.quantizers()``)."""
        return self.weight_quantizers + self.activation_quantizers

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "modules": list(self.modules),
                "activation_quantizers": list(self.activation_quantizers)}


def _quantizer_node_names(sim: QuantSim) -> dict[fx.Node, str]:
    """Activation-quantizer call nodes -> quantizer name."""
    by_id = {id(q): name for name, q in sim.activation_quantizers().items()}
    modules = dict(sim.model.named_modules())
    return {node: by_id[id(modules[node.target])] for node in sim.model.graph.nodes
            if node.op == "call_module" and isinstance(modules.get(node.target), FakeQuantizer)
            and id(modules[node.target]) in by_id}


def input_quantizer(sim: QuantSim, node: fx.Node) -> str | None:
    """Name of the activation quantizer feeding ``node``'s first argument, looking through
    data-movement ops; None when the input is not quantized."""
    quantizer_nodes = _quantizer_node_names(sim)
    source = node.args[0] if node.args else None
    while isinstance(source, fx.Node):
        if source in quantizer_nodes:
            return quantizer_nodes[source]
        if sim.op_types.get(source.name) in DATA_MOVEMENT_OPS and source.all_input_nodes:
            source = source.all_input_nodes[0]
            continue
        return None
    return None


def quantizer_groups(sim: QuantSim) -> list[QuantizerGroup]:
    """Layer groups in graph order, then activation groups in graph order."""
    modules = dict(sim.model.named_modules())
    weight_nodes = [n for n in sim.model.graph.nodes
                    if n.op == "call_module" and isinstance(modules.get(n.target), QuantizedWeightMixin)]
    by_input: dict[str, list[str]] = {}
    groups: list[list[str]] = []
    inputs: list[str | None] = []
    for node in weight_nodes:
        source = input_quantizer(sim, node)
        if source is not None and source in by_input:
            by_input[source].append(str(node.target))
            continue
        members = [str(node.target)]
        groups.append(members)
        inputs.append(source)
        if source is not None:
            by_input[source] = members
    result = [QuantizerGroup(name=members[0], modules=tuple(members), activation_quantizers=(source,) if source else ())
              for members, source in zip(groups, inputs)]
    used = {s for s in inputs if s}
    result += [QuantizerGroup(name=f"{ACTIVATION_GROUP_PREFIX}{name}", modules=(), activation_quantizers=(name,))
               for name in sim.activation_quantizers() if name not in used]
    return result


def activation_scopes(sim: QuantSim) -> dict[str, str]:
    """Activation quantizer name -> the scope its spec is resolved with (for config ``modules`` rules)."""
    return {name: scope_name(node.args[0]) for node, name in _quantizer_node_names(sim).items()}


def glob_literal(name: str) -> str:
    """A fnmatch pattern that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def select(names: Iterable[str], include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    """``names`` matching any ``include`` glob and no ``exclude`` glob, order kept."""
    include, exclude = tuple(include), tuple(exclude)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)
            and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def set_enabled(quantizer: FakeQuantizer, enabled: bool) -> None:
    """Switch ``quantizer`` on or off (through its spec); invalidates cached quantized weights."""
    if quantizer.spec.enabled != enabled:
        quantizer.spec = quantizer.spec.replace(enabled=enabled)
        quantizer.version += 1


def set_spec(quantizer: FakeQuantizer, spec: QuantizerSpec) -> None:
    """Give ``quantizer`` a new format and a fresh observer for it; the encoding must be recomputed
    (weights: ``calibrate_weight``; activations: ``QuantSim.calibrate``)."""
    quantizer.spec = spec
    quantizer.observer = build_observer(spec)
    quantizer.version += 1


@contextmanager
def only_enabled(sim: QuantSim, names: Iterable[str]) -> Iterator[None]:
    """Within the block, only the quantizers named in ``names`` (``sim.quantizers()`` keys) that
    were enabled stay enabled; every other quantizer passes its tensor through. Restored on exit."""
    quantizers = sim.quantizers()
    keep = set(names)
    unknown = sorted(keep - set(quantizers))
    if unknown:
        raise KeyError(f"quantizer {unknown[0]!r} is not in this sim; names come from sim.quantizers()")
    original = {name: q.spec.enabled for name, q in quantizers.items()}
    try:
        for name, q in quantizers.items():
            set_enabled(q, original[name] and name in keep)
        yield
    finally:
        for name, q in quantizers.items():
            set_enabled(q, original[name])


def fp32_reference(sim: QuantSim) -> fx.GraphModule:
    """A copy of ``sim.model`` with every quantizer disabled: the float model after BatchNorm
    folding, with the same graph and module names as the sim (``sim`` is not changed).

    Weight layers get back the float weight and bias they had before sim-level passes (AdaRound,
    AdaQuant, bias correction) rewrote them (:mod:`quantlib.ptq.float_parameters`).
    """
    reference = copy.deepcopy(sim.model)
    for module in reference.modules():
        if isinstance(module, FakeQuantizer):
            set_enabled(module, False)
        elif isinstance(module, QuantizedWeightMixin):
            restore_float_parameters(module)
    return reference.eval()
