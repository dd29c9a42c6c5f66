"""Switch the bitwidths of quantizer groups of a calibrated QuantSim quickly and reversibly.

A mixed-precision search evaluates many per-group bitwidth assignments. :class:`PrecisionSwitch`
prepares every format once, so applying an assignment only swaps tensors:

* weights: for each weight module and candidate weight bitwidth, a weight quantizer calibrated
  on the float weight. A layer whose encoding a PTQ pass froze (AdaRound, AdaQuant; see
  :mod:`quantlib.ptq.weight_freeze`) keeps its optimized weight and frozen quantizer at its own
  bitwidth; at other bitwidths its original float weight is re-quantized.
* activations: for each group's input-activation quantizer and candidate activation bitwidth,
  the encoding from one calibration pass over the data with every searched activation quantizer
  at that bitwidth (weights at the widest candidate). Quantizers outside the search keep their
  encodings.

Only integer, enabled quantizers are switched; a disabled or float16 quantizer stays as it is and
its bits count as fixed. Groups come from :func:`~quantlib.ptq.quantizer_groups.quantizer_groups`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cost import model_cost, quantizer_bits
from ..observers import build_observer
from ..quantizer import FakeQuantizer
from ..quantsim import QuantSim
from ..spec import MAX_BITWIDTH, MIN_BITWIDTH, QuantizerSpec
from .pass_config import PassConfigError
from .quantizer_groups import QuantizerGroup
from .weight_freeze import is_frozen

_CANDIDATE = re.compile(r"^w(\d+)a(\d+)$")


@dataclass(frozen=True, order=True)
class Candidate:
    """A (weight bits, activation bits) pair, written ``w4a8``; ordered by ``weight x activation`` bits."""

    cost: int
    weight_bits: int
    activation_bits: int

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a{self.activation_bits}"


def parse_candidate(text: str, where: str = "candidates") -> Candidate:
    """``"w4a8"`` -> Candidate; PassConfigError naming ``where`` for a malformed or unsupported pair."""
    match = _CANDIDATE.match(str(text))
    if match is None:
        raise PassConfigError(f"{where}={text!r} is not a candidate; write weight and activation bits as w4a8, w8a8, w16a16")
    weight, activation = int(match.group(1)), int(match.group(2))
    for bits in (weight, activation):
        if not MIN_BITWIDTH <= bits <= MAX_BITWIDTH:
            raise PassConfigError(f"{where}={text!r} has {bits} bits; use {MIN_BITWIDTH}..{MAX_BITWIDTH}")
    return Candidate(weight * activation, weight, activation)


def parse_candidates(texts: Sequence[str], where: str = "candidates") -> tuple[Candidate, ...]:
    """Distinct candidates sorted cheapest first; at least two, else PassConfigError."""
    parsed = sorted({parse_candidate(t, f"{where}[{i}]") for i, t in enumerate(texts)})
    if len(parsed) < 2:
        raise PassConfigError(f"{where}={list(texts)} needs at least two different candidates, e.g. [w4a8, w8a8, w16a16]")
    return tuple(parsed)


def _searchable(quantizer: FakeQuantizer | None) -> bool:
    return quantizer is not None and quantizer.spec.enabled and not quantizer.spec.is_float


class _WeightFormats:
    """Weight and weight quantizer of one module for each candidate weight bitwidth.

    ``observers`` maps a weight bitwidth to the observer that calibrates the weight range at that
    bitwidth (bitwidths not named keep the module's observer). A frozen layer keeps its own
    bitwidth's quantizer whatever ``observers`` says.
    """

    def __init__(self, module: nn.Module, bitwidths: Iterable[int], observers: Mapping[int, str] | None = None) -> None:
        self.module = module
        current = module.weight_quantizer
        frozen = is_frozen(current)
        float_weight = current.float_weight if frozen else module.weight.detach().clone()
        observers = observers or {}
        self.variants: dict[int, tuple[torch.Tensor, FakeQuantizer]] = {}
        for bits in sorted(set(bitwidths)):
            observer = observers.get(bits, current.spec.observer.name)
            if bits == current.spec.bitwidth and (frozen or observer == current.spec.observer.name):
                # the layer as it is (a frozen one keeps its optimized weight)
                self.variants[bits] = (module.weight.detach().clone() if frozen else float_weight, current)
                continue
            spec = current.spec.replace(bitwidth=bits, observer={"name": observer})
            quantizer = FakeQuantizer(spec, name=current.name).to(float_weight.device)
            quantizer.exact = current.exact
            quantizer.calibrate_from(float_weight)
            self.variants[bits] = (float_weight, quantizer)
        self.source = self.variants.get(current.spec.bitwidth, (None,))[0]

    @torch.no_grad()
    def use(self, bits: int) -> None:
        weight, quantizer = self.variants[bits]
        module = self.module
        if module.weight_quantizer is not quantizer:
            quantizer.version = max(quantizer.version, module.weight_quantizer.version) + 1  # new cache keys
            module.weight_quantizer = quantizer
        if weight is not self.source:
            module.weight.copy_(weight)
            self.source = weight


class _ActivationFormats:
    """Spec and encoding of one activation quantizer for each candidate activation bitwidth."""

    def __init__(self, quantizer: FakeQuantizer) -> None:
        self.quantizer = quantizer
        self.variants: dict[int, tuple[QuantizerSpec, torch.Tensor, torch.Tensor]] = {}

    def store(self, bits: int) -> None:
        q = self.quantizer
        self.variants[bits] = (q.spec, q.scale.detach().clone(), q.zero_point.detach().clone())

    def use(self, bits: int) -> None:
        spec, scale, zero_point = self.variants[bits]
        q = self.quantizer
        if q.spec != spec:
            q.spec = spec
            q.observer = build_observer(spec)
        if not (torch.equal(q.scale, scale) and torch.equal(q.zero_point, zero_point)):
            q.set_qparams(scale, zero_point)  # bumps the version: cached weights and biases refresh


class PrecisionSwitch:
    """Every candidate format of every searched group, prepared once; :meth:`apply` sets an assignment.

    Args:
        sim: a calibrated QuantSim (mutated: by the calibration passes here, then by :meth:`apply`).
        groups: the layer groups to search (activation-only groups are ignored).
        candidates: the formats (see :func:`parse_candidates`).
        data: re-iterable calibration batches for the activation encodings.
        forward_fn: ``forward_fn(model, batch, device)`` for calibration (None: QuantSim's default).
        weight_observers: weight bitwidth -> observer name for the weight ranges at that bitwidth
            (e.g. ``{4: "mse", 8: "minmax"}``); bitwidths not named keep each layer's observer.

    After construction every group is at the widest candidate.
    """

    def __init__(self, sim: QuantSim, groups: Sequence[QuantizerGroup], candidates: Sequence[Candidate],
                 data: Iterable, *, forward_fn: Callable | None = None, progress: bool = False,
                 weight_observers: Mapping[int, str] | None = None) -> None:
        self.sim = sim
        self.groups = [g for g in groups if g.kind == "layer"]
        self.candidates = tuple(candidates)
        modules = sim.weight_modules()
        quantizers = sim.activation_quantizers()
        weight_bits = {c.weight_bits for c in self.candidates}
        self.weights = {m: _WeightFormats(modules[m], weight_bits, weight_observers) for g in self.groups for m in g.modules
                        if _searchable(modules[m].weight_quantizer)}
        self.activations = {a: _ActivationFormats(quantizers[a]) for g in self.groups for a in g.activation_quantizers
                            if _searchable(quantizers[a])}
        self.current: dict[str, Candidate] = {}
        self._calibrate_activations(data, forward_fn, progress)
        widest = self.candidates[-1]
        self.apply({g.name: widest for g in self.groups})
        self.costs = _GroupCosts(sim, self)

    def _calibrate_activations(self, data: Iterable, forward_fn: Callable | None, progress: bool) -> None:
        quantizers = self.sim.activation_quantizers()
        kept = {name: (q.spec, q.scale.detach().clone(), q.zero_point.detach().clone())
                for name, q in quantizers.items() if name not in self.activations}
        widest_weight = self.candidates[-1].weight_bits
        for formats in self.weights.values():
            formats.use(widest_weight)
        for bits in sorted({c.activation_bits for c in self.candidates}):
            for formats in self.activations.values():
                q = formats.quantizer
                q.spec = q.spec.replace(bitwidth=bits)
                q.observer = build_observer(q.spec)
                q.version += 1
            self.sim.calibrate(data, forward_fn=forward_fn, progress=progress, desc=f"calibrate a{bits}")
            for formats in self.activations.values():
                formats.store(bits)
        for name, (spec, scale, zero_point) in kept.items():
            quantizers[name].spec = spec
            quantizers[name].observer = build_observer(spec)
            if scale.numel():
                quantizers[name].set_qparams(scale, zero_point)

    def apply(self, assignment: Mapping[str, Candidate]) -> None:
        """Set each named group to its candidate (groups not named keep their format)."""
        by_name = {g.name: g for g in self.groups}
        for name, candidate in assignment.items():
            if self.current.get(name) == candidate:
                continue
            group = by_name[name]
            for module in group.modules:
                if module in self.weights:
                    self.weights[module].use(candidate.weight_bits)
            for quantizer in group.activation_quantizers:
                if quantizer in self.activations:
                    self.activations[quantizer].use(candidate.activation_bits)
            self.current[name] = candidate

    def bitops(self, assignment: Mapping[str, Candidate]) -> int:
        """Predicted ``model_cost(sim).bitops`` with ``assignment`` applied (nothing is changed)."""
        return self.costs.bitops(assignment)


class _GroupCosts:
    """MACs of each group's layers, so the bit-ops of an assignment need no graph walk."""

    def __init__(self, sim: QuantSim, switch: PrecisionSwitch) -> None:
        cost = model_cost(sim)
        node_of = {n.name: n.target for n in sim.model.graph.nodes if n.op == "call_module"}
        by_module: dict[str, list[Any]] = {}
        for layer in cost.layers:
            by_module.setdefault(node_of.get(layer.name, ""), []).append(layer)
        quantizers = sim.activation_quantizers()
        self.layers: dict[str, list[tuple[int, int | None, int | None]]] = {}
        grouped = 0
        for group in switch.groups:
            entries = []
            act_fixed = None
            searched_act = any(a in switch.activations for a in group.activation_quantizers)
            if not searched_act and group.activation_quantizers:
                act_fixed = quantizer_bits(quantizers[group.activation_quantizers[0]])
            for module in group.modules:
                weight_fixed = None if module in switch.weights else quantizer_bits(sim.weight_modules()[module].weight_quantizer)
                for layer in by_module.get(module, []):
                    act = None if searched_act else (act_fixed if act_fixed is not None else layer.activation_bits)
                    entries.append((layer.macs, weight_fixed, act))
                    grouped += layer.bitops
            self.layers[group.name] = entries
        self.other = cost.bitops - grouped  # layers outside the groups (e.g. activation matmuls)

    def group_bitops(self, group: str, candidate: Candidate) -> int:
        return sum(macs * (candidate.weight_bits if w is None else w) * (candidate.activation_bits if a is None else a)
                   for macs, w, a in self.layers[group])

    def bitops(self, assignment: Mapping[str, Candidate]) -> int:
        return self.other + sum(self.group_bitops(g, c) for g, c in assignment.items())
