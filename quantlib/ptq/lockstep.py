"""Run a QuantSim graph node by node on a set of batches, in FP32 and quantized side by side.

Layer-wise PTQ methods (empirical bias correction, and AdaRound/AdaQuant-style passes) need,
for each weight layer in forward order, the layer's input in the FP32 model and in the quantized
model, *after* the layers before it have been adjusted. Running the whole model once per layer
costs O(layers) forward passes; this interpreter needs one: it evaluates the simulated graph in
topological order over all batches at once and keeps two environments:

* quantized: the graph as it is (activation quantizers, quantized weights);
* FP32: activation quantizers pass through and every weight layer runs a frozen float copy of
  its weights and bias taken when the run starts.

At each weight layer the ``hook`` sees both inputs and may change the module (its bias, say);
its quantized output is computed after the hook, so later layers see the change. Values are
freed after their last use. Memory: all batches of the live tensors, twice. Hooks run under
``torch.no_grad()``; one that optimizes something enables gradients itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..qmodules import QuantizedWeightMixin
from ..quantizer import FakeQuantizer
from .float_parameters import FLOAT_BIAS, original_bias, original_weight

_FLOAT_BASES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def float_twin(module: QuantizedWeightMixin) -> nn.Module:
    """A plain float module with copies of ``module``'s float weight and bias: those it had before
    sim-level passes rewrote them (:mod:`quantlib.ptq.float_parameters`)."""
    base = next(c for c in type(module).__mro__ if c in _FLOAT_BASES)
    twin = base.__new__(base)
    twin.__dict__ = {k: v for k, v in module.__dict__.items()
                     if k not in ("_parameters", "_buffers", "_modules", "_cached_weight", "_bias_cache", "_export_tensors")}
    originals = {**module._parameters, "weight": original_weight(module), "bias": original_bias(module)}
    twin._parameters = {k: None if originals[k] is None else nn.Parameter(originals[k].detach().clone(), requires_grad=False)
                        for k in module._parameters}
    twin._buffers = {k: v for k, v in module._buffers.items() if k != FLOAT_BIAS}
    twin._modules = {}
    return twin


@dataclass
class LayerIO:
    """What a hook sees at one weight layer.

    Attributes:
        name: the module name (fx node target).
        module: the quantized module in the sim (the hook may mutate it).
        quantized_inputs / fp32_inputs: one input tensor per batch.
        fp32: the frozen float copy of the layer as it was when the run started.
    """

    name: str
    module: QuantizedWeightMixin
    quantized_inputs: list[torch.Tensor]
    fp32_inputs: list[torch.Tensor]
    fp32: nn.Module

    def fp32_outputs(self) -> list[torch.Tensor]:
        """FP32 layer outputs on the FP32 inputs."""
        return [self.fp32(x) for x in self.fp32_inputs]

    def quantized_outputs(self) -> list[torch.Tensor]:
        """Quantized layer outputs on the quantized inputs (with the module as it is now)."""
        return [self.module(x) for x in self.quantized_inputs]


Hook = Callable[[LayerIO], None]


def _fetch_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """node -> values whose last use is that node (free them after it runs)."""
    seen: set[fx.Node] = set()
    last: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                last.setdefault(node, []).append(arg)
    return last


@torch.no_grad()
def run_lockstep(gm: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]], hook: Hook,
                 *, layers: set[str] | None = None) -> int:
    """Evaluate ``gm`` (a QuantSim model) over ``batches`` in FP32 and quantized, calling ``hook``.

    ``hook`` runs at every call of a :class:`QuantizedWeightMixin` module whose name is in
    ``layers`` (default: all of them), in forward order. Returns how many times it ran.
    """
    modules = dict(gm.named_modules())
    twins = {name: float_twin(m) for name, m in modules.items() if isinstance(m, QuantizedWeightMixin)}
    last_uses = _last_uses(gm.graph)
    quant_env: dict[fx.Node, list[Any]] = {}
    fp_env: dict[fx.Node, list[Any]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    count = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            index = placeholders.index(node)
            if index >= len(batches[0]):
                raise ValueError(f"the model takes {len(placeholders)} inputs but the data batches hold {len(batches[0])}")
            quant_env[node] = [batch[index] for batch in batches]
            fp_env[node] = [batch[index].clone() for batch in batches]  # in-place ops must not leak across
        elif node.op == "output":
            break
        elif node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            quant_env[node] = fp_env[node] = [value] * len(batches)
        else:
            module = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, QuantizedWeightMixin) and (layers is None or node.target in layers):
                io = LayerIO(node.target, module, quant_env[node.args[0]], fp_env[node.args[0]], twins[node.target])
                hook(io)
                count += 1
            quant_env[node] = _evaluate(node, module, quant_env, len(batches))
            if isinstance(module, FakeQuantizer):
                fp_env[node] = fp_env[node.args[0]]
            elif isinstance(module, QuantizedWeightMixin):
                fp_env[node] = _evaluate(node, twins[node.target], fp_env, len(batches))
            else:
                fp_env[node] = _evaluate(node, module, fp_env, len(batches))
        for dead in last_uses.get(node, []):
            quant_env.pop(dead, None)
            fp_env.pop(dead, None)
    return count


def _evaluate(node: fx.Node, module: nn.Module | None, env: dict[fx.Node, list[Any]], num_batches: int) -> list[Any]:
    """Run one node once per batch with its arguments taken from ``env``."""
    outputs = []
    for b in range(num_batches):
        args = fx.node.map_arg(node.args, lambda n: env[n][b])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][b])
        if node.op == "call_module":
            outputs.append(module(*args, **kwargs))
        elif node.op == "call_function":
            outputs.append(node.target(*args, **kwargs))
        elif node.op == "call_method":
            self_obj, *rest = args
            outputs.append(getattr(self_obj, node.target)(*rest, **kwargs))
        else:
            raise NotImplementedError(f"fx op {node.op!r} at node {node.name}")
    return outputs
