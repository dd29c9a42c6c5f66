"""Target configuration: which tensors get quantized, and how (a YAML file like AIMET's quantsim config).

Layout of a config file (every section optional)::

    defaults:
      activation: {bitwidth: 8, symmetric: false, signed: false}
      weight: {bitwidth: 8, symmetric: true, signed: true, granularity: per_channel}
    op_types:                 # per-op-type overrides, ONNX op names (Conv, Gemm, Softmax, Add, ...)
      Softmax: {output: {enabled: false}}
    supergroups:              # fused op sequences: no quantizer between their members
      - [Conv, Relu]
      - [Add, Relu]
    model_input: {enabled: true}
    model_output: {enabled: true}
    modules:                  # per-module-name overrides by glob, applied in order (later wins)
      - {pattern: conv_stem, weight: {bitwidth: 8}}
      - {pattern: classifier, output: {dtype: float16}, weight: {dtype: float16}}
    fold_batch_norms: true
    arithmetic: float         # or integer: mirror integer kernels (see QuantSim.set_arithmetic)

A quantizer's spec is resolved as: defaults -> op type rule -> model input/output rule -> module
rules. Presets ship in ``quantlib/configs/`` and are loaded by name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from .spec import QuantizerSpec, QuantSpecError, spec_from_dict

ARITHMETIC_MODES = ("float", "integer")
DEFAULT_ACTIVATION = QuantizerSpec(bitwidth=8, symmetric=False, signed=False)
DEFAULT_WEIGHT = QuantizerSpec(bitwidth=8, symmetric=True, signed=True, granularity="per_channel")
DEFAULT_SUPERGROUPS = (
    ("Conv", "Relu"), ("Conv", "Clip"), ("Conv", "BatchNormalization", "Relu"),
    ("Conv", "BatchNormalization", "Clip"), ("Conv", "BatchNormalization"),
    ("ConvTranspose", "Relu"), ("Gemm", "Relu"), ("Add", "Relu"),
)


@dataclass(frozen=True)
class QuantizerOverride:
    """Partial quantizer settings for outputs and weights, e.g. ``{"bitwidth": 4}``."""

    output: Mapping[str, Any] = field(default_factory=dict)
    weight: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleRule:
    """Overrides applied to modules/nodes whose name matches ``pattern`` (fnmatch glob)."""

    pattern: str
    override: QuantizerOverride


@dataclass(frozen=True)
class QuantSimConfig:
    """Resolved target configuration. Build with :func:`load_config`."""

    activation: QuantizerSpec = DEFAULT_ACTIVATION
    weight: QuantizerSpec = DEFAULT_WEIGHT
    op_types: Mapping[str, QuantizerOverride] = field(default_factory=dict)
    supergroups: tuple[tuple[str, ...], ...] = DEFAULT_SUPERGROUPS
    model_input: Mapping[str, Any] = field(default_factory=lambda: {"enabled": True})
    model_output: Mapping[str, Any] = field(default_factory=lambda: {"enabled": True})
    modules: tuple[ModuleRule, ...] = ()
    fold_batch_norms: bool = True
    arithmetic: str = "float"
    name: str = "custom"

    def activation_spec(self, op_type: str, scope: str, *, is_input: bool = False, is_output: bool = False) -> QuantizerSpec:
        """Spec of the output quantizer of a node of ``op_type`` named ``scope``."""
        spec = self.activation
        if op_type in self.op_types:
            spec = spec_from_dict(self.op_types[op_type].output, spec, f"op_types.{op_type}.output")
        if is_input:
            spec = spec_from_dict(self.model_input, spec, "model_input")
        if is_output:
            spec = spec_from_dict(self.model_output, spec, "model_output")
        for rule in self.modules:
            if fnmatch.fnmatchcase(scope, rule.pattern):
                spec = spec_from_dict(rule.override.output, spec, f"modules[{rule.pattern}].output")
        return spec

    def weight_spec(self, op_type: str, scope: str) -> QuantizerSpec:
        """Spec of the weight quantizer of a module of ``op_type`` named ``scope``."""
        spec = self.weight
        if op_type in self.op_types:
            spec = spec_from_dict(self.op_types[op_type].weight, spec, f"op_types.{op_type}.weight")
        for rule in self.modules:
            if fnmatch.fnmatchcase(scope, rule.pattern):
                spec = spec_from_dict(rule.override.weight, spec, f"modules[{rule.pattern}].weight")
        return spec

    def with_defaults(self, *, activation: Mapping[str, Any] | None = None,
                      weight: Mapping[str, Any] | None = None) -> "QuantSimConfig":
        """A copy with the default activation/weight specs updated (e.g. ``weight={"bitwidth": 4}``)."""
        changes: dict[str, Any] = {}
        if activation:
            changes["activation"] = spec_from_dict(activation, self.activation, "defaults.activation")
        if weight:
            changes["weight"] = spec_from_dict(weight, self.weight, "defaults.weight")
        return dataclasses.replace(self, **changes)

    def with_module_rules(self, rules: list[Mapping[str, Any]]) -> "QuantSimConfig":
        """A copy with extra module rules appended (they win over the existing ones)."""
        return dataclasses.replace(self, modules=self.modules + tuple(_parse_module_rules(rules, len(self.modules))))


_TOP_LEVEL_KEYS = {"name", "defaults", "op_types", "supergroups", "model_input", "model_output", "modules", "fold_batch_norms", "arithmetic"}


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    folder = resources.files("quantlib") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(source: str | Path | Mapping[str, Any] | QuantSimConfig) -> QuantSimConfig:
    """Load a config from a preset name, a YAML path, or a mapping; validates every key."""
    if isinstance(source, QuantSimConfig):
        return source
    if isinstance(source, Mapping):
        return parse_config(source)
    text_source = str(source)
    if text_source in preset_names():
        path = resources.files("quantlib") / "configs" / f"{text_source}.yaml"
        data = yaml.safe_load(path.read_text())
        data.setdefault("name", text_source)
        return parse_config(data)
    path = Path(text_source)
    if not path.is_file():
        raise QuantSpecError(
            f"quant config {text_source!r} is neither a preset ({', '.join(preset_names())}) nor an existing YAML file"
        )
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", path.stem)
    return parse_config(data)


def parse_config(data: Mapping[str, Any]) -> QuantSimConfig:
    """Validate and convert a config mapping (see module docstring for the layout)."""
    unknown = set(data) - _TOP_LEVEL_KEYS
    if unknown:
        raise QuantSpecError(f"config.{sorted(unknown)[0]} is not a config section; valid: {', '.join(sorted(_TOP_LEVEL_KEYS))}")
    defaults = data.get("defaults") or {}
    bad = set(defaults) - {"activation", "weight"}
    if bad:
        raise QuantSpecError(f"defaults.{sorted(bad)[0]} is not valid; use defaults.activation or defaults.weight")
    activation = spec_from_dict(defaults.get("activation") or {}, DEFAULT_ACTIVATION, "defaults.activation")
    weight = spec_from_dict(defaults.get("weight") or {}, DEFAULT_WEIGHT, "defaults.weight")
    op_types = {name: _parse_override(rule, f"op_types.{name}") for name, rule in (data.get("op_types") or {}).items()}
    for name, rule in op_types.items():  # validate eagerly so errors surface at load time
        spec_from_dict(rule.output, activation, f"op_types.{name}.output")
        spec_from_dict(rule.weight, weight, f"op_types.{name}.weight")
    supergroups = tuple(tuple(str(t) for t in group) for group in data.get("supergroups", DEFAULT_SUPERGROUPS))
    for i, group in enumerate(supergroups):
        if len(group) < 2:
            raise QuantSpecError(f"supergroups[{i}]={list(group)} needs at least two op types")
    model_input = dict(data.get("model_input") or {"enabled": True})
    model_output = dict(data.get("model_output") or {"enabled": True})
    spec_from_dict(model_input, activation, "model_input")
    spec_from_dict(model_output, activation, "model_output")
    modules = tuple(_parse_module_rules(data.get("modules") or [], 0))
    arithmetic = str(data.get("arithmetic", "float"))
    if arithmetic not in ARITHMETIC_MODES:
        raise QuantSpecError(f"config.arithmetic={arithmetic!r} is not valid; use one of {', '.join(ARITHMETIC_MODES)}")
    return QuantSimConfig(
        activation=activation, weight=weight, op_types=op_types, supergroups=supergroups,
        model_input=model_input, model_output=model_output, modules=modules,
        fold_batch_norms=bool(data.get("fold_batch_norms", True)), arithmetic=arithmetic, name=str(data.get("name", "custom")),
    )


def _parse_override(rule: Any, where: str) -> QuantizerOverride:
    if not isinstance(rule, Mapping):
        raise QuantSpecError(f"{where} must be a mapping with 'output' and/or 'weight'")
    bad = set(rule) - {"output", "weight", "enabled"}
    if bad:
        raise QuantSpecError(f"{where}.{sorted(bad)[0]} is not valid; use output, weight or enabled")
    output, weight = dict(rule.get("output") or {}), dict(rule.get("weight") or {})
    if "enabled" in rule:  # shorthand: enabled: false turns off both
        output.setdefault("enabled", bool(rule["enabled"]))
        weight.setdefault("enabled", bool(rule["enabled"]))
    return QuantizerOverride(output=output, weight=weight)


def _parse_module_rules(rules: list[Mapping[str, Any]], start: int) -> list[ModuleRule]:
    parsed = []
    for i, rule in enumerate(rules, start):
        if not isinstance(rule, Mapping) or "pattern" not in rule:
            raise QuantSpecError(f"modules[{i}] needs a 'pattern' (a glob over module names, e.g. 'blocks.0.*')")
        body = {k: v for k, v in rule.items() if k != "pattern"}
        override = _parse_override(body, f"modules[{i}]")
        spec_from_dict(override.output, DEFAULT_ACTIVATION, f"modules[{i}].output")
        spec_from_dict(override.weight, DEFAULT_WEIGHT, f"modules[{i}].weight")
        parsed.append(ModuleRule(pattern=str(rule["pattern"]), override=override))
    return parsed
