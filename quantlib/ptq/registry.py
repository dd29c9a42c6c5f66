"""The PTQ step contract: :class:`PTQStep`, :class:`StepRegistry`, :class:`PTQContext`.

A step is a config dataclass plus a function ``run(context, config) -> dict``. The function
mutates the context (its FP32 working model or its QuantSim) and returns a small JSON-able
summary of what it did (counts, errors), which goes into the pipeline report. See
:mod:`quantlib.ptq.pipeline` for how steps are discovered, validated and run.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..config import QuantSimConfig

PHASES = ("model", "sim")


class PTQConfigError(ValueError):
    """A PTQ step list or step setting is invalid; the message names the setting and the fix."""


def batch_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """The model inputs of a data batch: a tensor, or the first item of an (inputs, labels) pair."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return inputs if isinstance(inputs, tuple) else (inputs,)


def default_forward(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """Run ``model`` on one data batch (tensor or (inputs, labels)) on ``device``."""
    return model(*[t.to(device) for t in batch_inputs(batch)])


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter or buffer (CPU for a module without either)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@dataclass
class PTQContext:
    """Everything a step may read or change.

    Attributes:
        fp32_model: the model the caller passed in; never mutated.
        model: the FP32 working copy, an ``fx.GraphModule``; model-level steps mutate it, and
            QuantSim is built from it after the last model-level step.
        example_input: an input tensor (or tuple) with the model's input shape.
        config: the QuantSim target config.
        calibration_data: re-iterable batches (tensors or (inputs, labels)), e.g. a DataLoader.
        forward_fn: ``forward_fn(model, batch, device)`` runs a model on one batch.
        progress: show progress bars.
        plots_dir: where steps may write PNG plots (None: no plots).
        layer_output_stats: ``{layer name: ChannelGaussian}`` captured from BatchNorm before
            folding (:mod:`quantlib.ptq.bn_stats`); steps that rescale or shift a layer's output
            channels update its entry.
        sim: the calibrated QuantSim (None until the model-level steps are done).
        plots: paths of the plots written so far.
        score_fn: ``score_fn(model) -> float``, higher is better (e.g. top-1 on labelled
            calibration data), for steps that search (sensitivity, mixed precision, AutoQuant);
            None when the caller gave none, and such steps then raise naming it.
    """

    fp32_model: nn.Module
    model: fx.GraphModule
    example_input: Any
    config: QuantSimConfig
    calibration_data: Iterable
    forward_fn: Callable[[nn.Module, Any, torch.device], Any] = default_forward
    progress: bool = True
    plots_dir: Path | None = None
    layer_output_stats: dict[str, Any] = field(default_factory=dict)
    sim: Any = None
    plots: list[Path] = field(default_factory=list)
    score_fn: Callable[[nn.Module], float] | None = None

    @property
    def device(self) -> torch.device:
        """Device of the working model."""
        return model_device(self.model)

    def recalibrate(self, step: str) -> None:
        """Recompute the QuantSim's activation encodings on the calibration data (frozen weight
        encodings stay); ``step`` names the caller in the error when there is no QuantSim."""
        self.require_sim(step).calibrate(self.calibration_data, forward_fn=self.forward_fn, progress=self.progress,
                                         desc="recalibrate")

    def require_sim(self, step: str) -> Any:
        """The QuantSim, or an error saying that ``step`` is a sim-level step."""
        if self.sim is None:
            raise RuntimeError(f"step {step!r} needs the calibrated QuantSim; register it with phase='sim'")
        return self.sim

    def require_score_fn(self, step: str) -> Callable[[nn.Module], float]:
        """The caller's ``score_fn``, or an error saying that ``step`` needs one."""
        if self.score_fn is None:
            raise PTQConfigError(f"ptq step {step!r} searches by accuracy and needs score_fn; pass "
                                 "score_fn=... to prepare_quantsim (quantzoo run passes calibration-split top-1)")
        return self.score_fn

    def input_batches(self, num_samples: int | None) -> list[tuple[torch.Tensor, ...]]:
        """Input tensors of the calibration data, on the working device, up to ``num_samples`` samples."""
        batches, seen = [], 0
        for batch in self.calibration_data:
            inputs = tuple(t.to(self.device) for t in batch_inputs(batch))
            if num_samples is not None:
                keep = min(inputs[0].shape[0], num_samples - seen)
                inputs = tuple(t[:keep] for t in inputs)
            batches.append(inputs)
            seen += inputs[0].shape[0]
            if num_samples is not None and seen >= num_samples:
                break
        if not batches:
            raise ValueError("calibration data is empty; give at least one batch")
        return batches


StepFunction = Callable[[PTQContext, Any], Mapping[str, Any]]


@dataclass(frozen=True)
class PTQStep:
    """One registrable PTQ step.

    Attributes:
        name: the name used in ``ptq.steps`` (e.g. ``"cle"``).
        config_cls: a dataclass; ``{"name": ..., **settings}`` builds it, unknown keys raise.
        run: ``run(context, config) -> summary dict``.
        phase: ``"model"`` (runs on ``context.model`` before QuantSim is built) or ``"sim"``
            (runs on the calibrated ``context.sim``).
        description: one line for listings.
        must_precede: names of steps that, when listed too, must come after this one.
        corrective: the step fixes up the sim's current quantization error (bias correction
            measures and subtracts it), so its result is stale once a later step changes the
            quantization; AutoQuant applies later rungs before it and then runs it again.
    """

    name: str
    config_cls: type
    run: StepFunction
    phase: str
    description: str = ""
    must_precede: tuple[str, ...] = ()
    corrective: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"PTQStep {self.name!r}: phase={self.phase!r} is not valid; use one of {', '.join(PHASES)}")
        if not dataclasses.is_dataclass(self.config_cls):
            raise TypeError(f"PTQStep {self.name!r}: config_cls must be a dataclass, got {self.config_cls!r}")
        if not callable(self.run):
            raise TypeError(f"PTQStep {self.name!r}: run must be callable")


class StepRegistry:
    """Step name -> :class:`PTQStep`; :meth:`add` raises on a duplicate name."""

    def __init__(self) -> None:
        self._steps: dict[str, PTQStep] = {}

    def add(self, step: PTQStep) -> PTQStep:
        """Register ``step``; ValueError if its name is taken."""
        if not isinstance(step, PTQStep):
            raise TypeError(f"StepRegistry.add needs a PTQStep, got {type(step).__name__}")
        if step.name in self._steps:
            raise ValueError(f"PTQ step {step.name!r} is already registered; step names must be unique")
        self._steps[step.name] = step
        return step

    def get(self, name: str, where: str = "ptq.steps") -> PTQStep:
        """The step called ``name``; PTQConfigError listing the valid names otherwise."""
        try:
            return self._steps[name]
        except (KeyError, TypeError):
            raise PTQConfigError(f"{where}.name={name!r} is not a PTQ step; use one of {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._steps)

    def __contains__(self, name: object) -> bool:
        return name in self._steps

    def __len__(self) -> int:
        return len(self._steps)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple annotation (bool, int, float, str, Optional, tuple[X, ...])."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except PTQConfigError as err:
                errors.append(err)
        raise PTQConfigError(f"{where}={value!r} must be {' or '.join(_type_name(o) for o in options)}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise PTQConfigError(f"{where}={value!r} is not supported; use one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise PTQConfigError(f"{where}={value!r} must be a list")
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise PTQConfigError(f"{where}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PTQConfigError(f"{where}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PTQConfigError(f"{where}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise PTQConfigError(f"{where}={value!r} must be a string")
        return value
    return value


def config_from_dict(config_cls: type, values: Mapping[str, Any], where: str, step: str = "") -> Any:
    """Build ``config_cls`` from ``values``; unknown keys and wrong types raise PTQConfigError naming ``where.key``.

    Errors raised by the dataclass's own ``__post_init__`` (PTQConfigError or ValueError) are
    prefixed with ``where``, so ``ptq.steps[2].kind='x' is not supported; use ...`` names the setting.
    """
    hints = typing.get_type_hints(config_cls)
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            settings = f"valid keys: {', '.join(sorted(valid))}" if valid else "it takes no settings"
            raise PTQConfigError(f"{where}.{key} is not a setting of step {step!r}; {settings}")
        kwargs[key] = _coerce(value, hints.get(key, Any), f"{where}.{key}")
    try:
        return config_cls(**kwargs)
    except (PTQConfigError, ValueError) as err:
        raise PTQConfigError(f"{where}.{err}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-able dict of a step config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
