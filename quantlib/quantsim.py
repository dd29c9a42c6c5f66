"""QuantSim: simulate fixed-point inference of any nn.Module by quantize-dequantize (QDQ).

Pipeline (all automatic, no per-model code):
    1. deep-copy the model, put it in eval mode and trace it with torch.fx (:mod:`quantlib.graph`);
    2. decompose fused attention into matmul/softmax/matmul nodes;
    3. fold BatchNorm into the preceding conv/linear (:mod:`quantlib.batchnorm_fold`);
    4. replace Conv1d/Conv2d/ConvTranspose2d/Linear with weight-quantized versions;
    5. insert a FakeQuantizer after the model inputs and after every op output, except inside
       fusion supergroups (Conv+ReLU, Add+ReLU, ...) and after pure data-movement ops.

The original model is not modified. ``sim.model`` is an ordinary ``nn.Module``.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from tqdm.auto import tqdm

from .affine import zero_point_from_aimet_offset
from .batchnorm_fold import fold_batch_norms, set_submodule
from .config import ARITHMETIC_MODES, QuantSimConfig, load_config
from .graph import DATA_MOVEMENT_OPS, decompose_attention, op_type, scope_name, trace
from .qmodules import QuantizedWeightMixin, quantized_class_for
from .quantizer import FakeQuantizer

ENCODINGS_VERSION = "1.0.0"
_CLAMPS_AND_DATA_MOVEMENT = DATA_MOVEMENT_OPS | {"Relu", "Clip"}


def _is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _default_forward(model: nn.Module, batch: Any, device: torch.device) -> Any:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(inputs.to(device))


def _clamp_callable(node: fx.Node, modules: dict[str, nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``node`` (a ReLU/Clip-like op whose first argument is the tensor) as a one-tensor callable,
    or None when its other arguments are graph values rather than constants."""
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in (*rest, *kwargs.values())):
        return None
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_function":
        return lambda t: node.target(t, *rest, **kwargs)
    if node.op == "call_method":
        return lambda t: getattr(t, node.target)(*rest, **kwargs)
    return None


class QuantSim:
    """A quantization-simulated copy of a model.

    Args:
        model: any ``nn.Module`` that torch.fx can trace (not mutated).
        example_input: a tensor (or tuple of tensors) with the model's input shape; used to
            propagate shapes, never stored.
        config: a preset name (see :func:`quantlib.config.preset_names`), a YAML path, a
            mapping, or a :class:`QuantSimConfig`.

    Attributes:
        model: the simulated ``fx.GraphModule``; use it like the original model.
        folded_batch_norms: (layer, bn) pairs folded during preparation.
        op_types: node name -> ONNX op type, for reporting.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | tuple, config: Any = "per_channel",
                 *, extra_leaf_types: tuple[type, ...] = ()) -> None:
        self.config: QuantSimConfig = load_config(config)
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        gm = trace(copy.deepcopy(model).eval(), extra_leaf_types)
        decompose_attention(gm)
        self.folded_batch_norms = fold_batch_norms(gm) if self.config.fold_batch_norms else []
        with torch.no_grad():
            ShapeProp(gm).propagate(*[t.to(device) for t in inputs])
        self.model = gm
        self.op_types: dict[str, str] = {}
        self._wrap_weight_modules()
        self._insert_activation_quantizers()
        self._link_quantizers()
        self.set_arithmetic(self.config.arithmetic)
        self.model.eval()

    # -- construction --------------------------------------------------------------------------
    def _wrap_weight_modules(self) -> None:
        gm = self.model
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            self.op_types[node.name] = op_type(node, modules)
            if node.op != "call_module":
                continue
            module = modules[node.target]
            cls = quantized_class_for(module)
            if cls is None:
                continue
            spec = self.config.weight_spec(self.op_types[node.name], node.target)
            qmodule = cls.from_float(module, spec, node.target)
            qmodule.calibrate_weight()
            set_submodule(gm, node.target, qmodule)

    def _fused_nodes(self) -> set[fx.Node]:
        """Nodes inside a supergroup whose output feeds only the next member (no quantizer)."""
        fused: set[fx.Node] = set()
        groups = sorted(self.config.supergroups, key=len, reverse=True)
        for node in self.model.graph.nodes:
            for group in groups:
                chain, members = [node], 1
                while members < len(group):
                    users = list(chain[-1].users)
                    if len(users) != 1:
                        break
                    kind = self.op_types.get(users[0].name)
                    if kind == "Identity":  # dropout/identity are no-ops in eval: look through them
                        chain.append(users[0])
                        continue
                    if kind != group[members]:
                        break
                    chain.append(users[0])
                    members += 1
                if members == len(group) and self.op_types.get(node.name) == group[0]:
                    fused.update(chain[:-1])
                    break
        return fused

    def _output_feeders(self) -> set[fx.Node]:
        """Compute nodes whose value reaches the model output through data movement only."""
        feeders: set[fx.Node] = set()
        stack = [n for n in self.model.graph.nodes if n.op == "output"]
        stack = [a for n in stack for a in n.all_input_nodes]
        while stack:
            node = stack.pop()
            if self.op_types.get(node.name) in DATA_MOVEMENT_OPS:
                stack.extend(node.all_input_nodes)
            else:
                feeders.add(node)
        return feeders

    def _insert_activation_quantizers(self) -> None:
        gm, graph = self.model, self.model.graph
        gm.add_module("activation_quantizers", nn.ModuleDict())
        fused = self._fused_nodes()
        outputs = self._output_feeders()
        for node in list(graph.nodes):
            if not _is_float_tensor(node):
                continue
            kind = self.op_types[node.name]
            if node.op == "placeholder":
                spec = self.config.activation_spec("Input", node.name, is_input=True, is_output=node in outputs)
            elif node.op in ("call_module", "call_function", "call_method"):
                if kind in DATA_MOVEMENT_OPS or node in fused:
                    continue
                spec = self.config.activation_spec(kind, scope_name(node), is_output=node in outputs)
            else:
                continue
            if not spec.enabled:
                continue
            quantizer = FakeQuantizer(spec, name=node.name)
            gm.activation_quantizers[node.name] = quantizer
            with graph.inserting_after(node):
                qnode = graph.call_module(f"activation_quantizers.{node.name}", (node,))
            node.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode: user is not q)
            qnode.meta["tensor_meta"] = node.meta.get("tensor_meta")
        graph.lint()
        gm.recompile()

    def _link_quantizers(self) -> None:
        """Tell each weight module which quantizer feeds it and which one takes its output.

        The input quantizer (found through value-preserving ops such as Identity, Flatten and
        Pad) sets the int32 bias grid. The output quantizer (found through a single-user chain of
        clamping activations and value-preserving ops) is the grid an integer kernel
        requantizes onto.
        """
        modules = dict(self.model.named_modules())

        def quantizer_at(node: Any) -> FakeQuantizer | None:
            if isinstance(node, fx.Node) and node.op == "call_module":
                module = modules.get(node.target)
                return module if isinstance(module, FakeQuantizer) else None
            return None

        for node in self.model.graph.nodes:
            module = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(module, QuantizedWeightMixin):
                continue
            source = node.args[0] if node.args else None
            while isinstance(source, fx.Node) and quantizer_at(source) is None and source.args \
                    and self.op_types.get(source.name) in DATA_MOVEMENT_OPS:
                source = source.args[0]
            if quantizer_at(source) is not None:
                module.input_quantizer_ref = (quantizer_at(source),)
            sink, clamps = node, []
            while len(sink.users) == 1 and quantizer_at(next(iter(sink.users))) is None:
                user = next(iter(sink.users))
                if self.op_types.get(user.name) not in _CLAMPS_AND_DATA_MOVEMENT or user.args[0] is not sink:
                    break
                if self.op_types.get(user.name) not in DATA_MOVEMENT_OPS:
                    clamps.append(_clamp_callable(user, modules))
                sink = user
            if len(sink.users) == 1 and quantizer_at(next(iter(sink.users))) is not None:
                output_quantizer = quantizer_at(next(iter(sink.users)))
                module.output_quantizer_ref = (output_quantizer,)
                if all(c is not None for c in clamps):
                    module.output_clamps = tuple(clamps)
                    output_quantizer.on_grid_producer = (module,)

    def set_arithmetic(self, arithmetic: str) -> None:
        """``"float"``: QDQ simulation (fused fake-quant kernels). ``"integer"``: layers with
        known 8-bit input and output grids run as integer kernels and activation quantizers
        divide by the scale as QuantizeLinear does, which mirrors ONNX Runtime's CPU int8
        execution (see :mod:`quantlib.qmodules`)."""
        if arithmetic not in ARITHMETIC_MODES:
            raise ValueError(f"arithmetic={arithmetic!r} is not valid; use one of {', '.join(ARITHMETIC_MODES)}")
        integer = arithmetic == "integer"
        for quantizer in self.activation_quantizers().values():
            quantizer.exact = integer
        for module in self.weight_modules().values():
            module.integer_arithmetic = integer
        self.arithmetic = arithmetic

    # -- access --------------------------------------------------------------------------------
    def weight_modules(self) -> dict[str, QuantizedWeightMixin]:
        """Module name -> weight-quantized module."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantizedWeightMixin)}

    def activation_quantizers(self) -> dict[str, FakeQuantizer]:
        """Node name -> activation quantizer."""
        return dict(self.model.activation_quantizers.items())

    def param_quantizers(self) -> dict[str, FakeQuantizer]:
        """``<module>.weight`` -> weight quantizer."""
        return {f"{n}.weight": m.weight_quantizer for n, m in self.weight_modules().items()}

    def quantizers(self) -> dict[str, FakeQuantizer]:
        """Every quantizer, activations first."""
        return {**self.activation_quantizers(), **self.param_quantizers()}

    # -- calibration ---------------------------------------------------------------------------
    def compute_weight_encodings(self) -> None:
        """(Re)compute every weight encoding from the current weights."""
        for module in self.weight_modules().values():
            module.calibrate_weight()

    def calibrate(self, data: Iterable, *, num_batches: int | None = None,
                  forward_fn: Callable[[nn.Module, Any, torch.device], Any] | None = None,
                  progress: bool = True, desc: str = "calibrate") -> int:
        """Observe activations on ``data`` and set every encoding; returns the batches used.

        ``data`` yields input tensors or (input, label) pairs. Weights are quantized during the
        pass (their encodings are set first), so activation ranges match deployment.
        """
        forward_fn = forward_fn or _default_forward
        device = next(self.model.parameters()).device
        self.compute_weight_encodings()
        quantizers = self.activation_quantizers().values()
        for q in quantizers:
            q.observer.reset()
            q.calibrating = True
        used = 0
        try:
            batches = itertools.islice(data, num_batches) if num_batches else data
            total = num_batches or (len(data) if hasattr(data, "__len__") else None)
            with torch.no_grad():
                for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
                    forward_fn(self.model, batch, device)
                    used += 1
        finally:
            for q in quantizers:
                q.calibrating = False
        if used == 0:
            raise ValueError("calibration data is empty; give at least one batch")
        for q in quantizers:
            q.compute_encoding()
        return used

    # -- encodings -----------------------------------------------------------------------------
    def encodings(self) -> dict[str, Any]:
        """AIMET-compatible encodings: activation_encodings, param_encodings, quantizer_args."""
        return {
            "version": ENCODINGS_VERSION,
            "activation_encodings": {n: q.encoding() for n, q in self.activation_quantizers().items() if q.has_encoding},
            "param_encodings": {n: q.encoding() for n, q in self.param_quantizers().items()
                                if q.spec.enabled and q.has_encoding},
            "quantizer_args": {n: q.spec.to_dict() for n, q in self.quantizers().items()},
            "config": self.config.name,
        }

    def save_encodings(self, path: str | Path) -> Path:
        """Write :meth:`encodings` as JSON atomically; returns the path."""
        from .io import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.encodings(), indent=1, sort_keys=True))

    def load_encodings(self, source: str | Path | dict[str, Any]) -> None:
        """Install encodings saved by :meth:`save_encodings` (bit-exact round trip)."""
        data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
        tables = {**data.get("activation_encodings", {}), **data.get("param_encodings", {})}
        quantizers = self.quantizers()
        unknown = sorted(set(tables) - set(quantizers))
        if unknown:
            raise KeyError(f"encodings name {unknown[0]!r}, which this model does not have; were they saved from another model or config?")
        for name, quantizer in quantizers.items():
            if quantizer.spec.is_float or not quantizer.spec.enabled:
                continue
            if name not in tables:
                raise KeyError(f"encodings have no entry for quantizer {name!r}; recalibrate or save them again")
            records = tables[name]
            scale = torch.tensor([r["scale"] for r in records], dtype=torch.float32)
            offset = torch.tensor([r["offset"] for r in records], dtype=torch.int64)
            quantizer.set_qparams(scale, zero_point_from_aimet_offset(offset, quantizer.spec))

    def summary(self) -> dict[str, int]:
        """Counts of quantizers and folded BNs, for logs."""
        acts = self.activation_quantizers()
        return {
            "activation_quantizers": len(acts),
            "weight_quantizers": sum(q.spec.enabled for q in self.param_quantizers().values()),
            "folded_batch_norms": len(self.folded_batch_norms),
        }

