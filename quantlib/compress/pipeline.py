"""Run a list of compression steps on a float model: prune -> cluster -> (quantize elsewhere).

:func:`compress_model` copies and prepares the model (:func:`~quantlib.compress.prepare.prepare_for_compression`:
traced, BatchNorm folded), then applies each step with its method's handler from a
:class:`MethodRegistry` (one handler per method name, duplicates refused). After a step with
``finetune`` the model is trained with :func:`quantlib.qat.trainer.train`; its step hooks keep the
structure of *earlier* steps (sparsity, clusters: :func:`~quantlib.compress.preserve.structure_preserver`)
and run the step's own schedule (gradual pruning). This is TFMOT's collaborative optimization:
later stages never undo earlier ones. The QuantSim and QAT that follow take
:attr:`CompressResult.structure` as ``qat.preserve``.

Greedy ratio selection and the sensitivity figure score models with ``CompressContext.eval_fn``
(labelled calibration data, never the eval split).
"""

from __future__ import annotations

import copy
import glob
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .channel_pruning import ChannelPruningConfig
from .clustering import cluster_weights
from .plot import SensitivityPanel
from .prepare import prepare_for_compression
from .refit import RefitConfig
from .preserve import structure_preserver
from .schedule import GradualPruningHook, PolynomialDecay
from .selection import Selection, greedy_selection, manual_selection
from .sparsity import sparsify, sparsity_layers
from .spaces import ChannelPruningSpace, SvdSpace
from .steps import ChannelPruningStep, ClusteringStep, CompressConfigError, SparsityStep, SvdStep, parse_step

Hook = Callable[[nn.Module, int], None]


@dataclass
class CompressContext:
    """What the steps need besides the model.

    Attributes:
        example_input: one input sample with batch axis (shapes, MAC counts).
        calibration: re-iterable batches (inputs or (inputs, labels)) for channel importance and
            the least-squares re-fit.
        eval_fn: model -> score (higher is better) for greedy selection and sensitivity; None
            forbids greedy selection.
        train_data: re-iterable (inputs, labels) batches with ``len()`` for fine-tuning; None
            forbids ``finetune``.
        train_config: a :class:`quantlib.qat.config.TrainConfig` for fine-tuning.
        sensitivity: also measure a one-column sensitivity table for steps without greedy selection.
        device: fine-tuning device (None: the model's).
        progress: show progress bars.
    """

    example_input: torch.Tensor
    calibration: Iterable | None = None
    eval_fn: Callable[[nn.Module], float] | None = None
    train_data: Any = None
    train_config: Any = None
    sensitivity: bool = True
    device: torch.device | str | None = None
    progress: bool = True


@dataclass
class StepOutcome:
    """What a handler returns: the new model, a JSON-able report, an optional sensitivity panel and step hooks."""

    model: fx.GraphModule
    report: dict[str, Any]
    panel: SensitivityPanel | None = None
    hooks: list[Hook] = field(default_factory=list)
    finish: Callable[[nn.Module], None] | None = None  # run after fine-tuning (e.g. reach the final sparsity)


Handler = Callable[[fx.GraphModule, Any, CompressContext, int], StepOutcome]


class MethodRegistry:
    """Method name -> handler ``(model, step, context, index) -> StepOutcome``; a name registers once."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        if name in self._handlers:
            raise ValueError(f"compression method {name!r} is already registered; pick another name")
        self._handlers[name] = handler

    def get(self, name: str) -> Handler:
        if name not in self._handlers:
            raise CompressConfigError(f"compression method {name!r} has no handler; registered: {', '.join(sorted(self._handlers))}")
        return self._handlers[name]

    def names(self) -> list[str]:
        return sorted(self._handlers)


def _need_eval(ctx: CompressContext, what: str) -> Callable[[nn.Module], float]:
    if ctx.eval_fn is None:
        raise CompressConfigError(f"{what} needs an eval callback (labelled calibration data); use selection=manual")
    return ctx.eval_fn


def _select(space, step, ctx: CompressContext, label: str) -> tuple[Selection, SensitivityPanel | None]:
    if step.selection == "greedy":
        selection = greedy_selection(space, _need_eval(ctx, f"{label} selection=greedy"), step.target, step.candidates,
                                     baseline_model=space.model, progress=ctx.progress)
        return selection, SensitivityPanel(label, selection.table, selection.ratios, selection.baseline_score)
    selection = manual_selection(space, step.ratios)
    panel = None
    if ctx.sensitivity and ctx.eval_fn is not None:
        table = {layer: {ratio: float(ctx.eval_fn(space.apply({layer: ratio})))} for layer, ratio in selection.ratios.items()}
        panel = SensitivityPanel(label, table, selection.ratios, float(ctx.eval_fn(space.model)))
    return selection, panel


def _svd(model: fx.GraphModule, step: SvdStep, ctx: CompressContext, index: int) -> StepOutcome:
    space = SvdSpace(model, step.method, ctx.example_input, metric=step.metric, include=step.include, exclude=step.exclude)
    selection, panel = _select(space, step, ctx, step.method)
    model = space.apply(selection.ratios)
    layers = space.describe(selection.ratios)
    if step.refit:
        if ctx.calibration is None:
            raise CompressConfigError(f"{step.method}.refit=true needs calibration data for the least-squares re-fit")
        fits = space.refit(model, selection.ratios, ctx.calibration,
                           RefitConfig(step.positions_per_image, step.ridge, step.num_batches), factors=step.refit_factors)
        for name, fit in fits.items():
            layers[name].update(fit)
    return StepOutcome(model, {"selection": selection.to_dict(), "layers": layers}, panel)


def _channel_pruning(model: fx.GraphModule, step: ChannelPruningStep, ctx: CompressContext, index: int) -> StepOutcome:
    if ctx.calibration is None:
        raise CompressConfigError("channel_pruning needs calibration data for channel importance and the re-fit")
    config = ChannelPruningConfig(importance=step.importance, refit=step.refit, multiple_of=step.multiple_of,
                                  positions_per_image=step.positions_per_image, ridge=step.ridge, num_batches=step.num_batches)
    space = ChannelPruningSpace(model, ctx.example_input, ctx.calibration, config, metric=step.metric,
                                include=step.include, exclude=step.exclude)
    selection, panel = _select(space, step, ctx, "channel_pruning")
    pruned = space.apply(selection.ratios)
    return StepOutcome(pruned, {"selection": selection.to_dict(), "layers": space.last_report}, panel)


def _single_layer_table(model: fx.GraphModule, layers: Sequence[str], key: Any, compress_one: Callable[[nn.Module, str], None],
                        ctx: CompressContext, label: str) -> SensitivityPanel | None:
    """Score ``model`` with each layer alone compressed by ``compress_one`` (for steps without a greedy table)."""
    if not (ctx.sensitivity and ctx.eval_fn is not None):
        return None
    table = {}
    for layer in layers:
        trial = copy.deepcopy(model)
        compress_one(trial, layer)
        table[layer] = {key: float(ctx.eval_fn(trial))}
    return SensitivityPanel(label, table, {layer: key for layer in layers}, float(ctx.eval_fn(model)))


def _sparsity(model: fx.GraphModule, step: SparsityStep, ctx: CompressContext, index: int) -> StepOutcome:
    kept = step.n / step.m if step.kind == "n_m" else round(1 - step.sparsity, 6)
    layers = list(sparsity_layers(model, step.include, step.exclude))

    def one(trial: nn.Module, layer: str) -> None:
        sparsify(trial, step.kind, sparsity=step.sparsity, n=step.n, m=step.m, include=(glob.escape(layer),))

    panel = _single_layer_table(model, layers, kept, one, ctx, step.method)
    if step.schedule == "polynomial":
        total = len(ctx.train_data) * ctx.train_config.epochs
        begin = round(step.begin_fraction * total)
        end = max(begin + 1, round(step.end_fraction * total))
        schedule = PolynomialDecay(step.initial_sparsity, step.sparsity, begin, end, step.power, step.frequency)
        hook = GradualPruningHook(model, schedule, include=step.include, exclude=step.exclude)
        hook.update_masks(model, schedule.sparsity(0))

        def finish(trained: nn.Module) -> None:
            if not hook.history or hook.history[-1][1] != step.sparsity:
                hook.update_masks(trained, step.sparsity)

        report = {"schedule": {"begin_step": begin, "end_step": end, "frequency": step.frequency, "power": step.power,
                               "initial_sparsity": step.initial_sparsity, "final_sparsity": step.sparsity}}
        return StepOutcome(model, report, panel, hooks=[hook], finish=finish)
    reached = sparsify(model, step.kind, sparsity=step.sparsity, n=step.n, m=step.m, include=step.include, exclude=step.exclude)
    hooks = [structure_preserver(model, ["sparsity"])] if step.finetune else []
    return StepOutcome(model, {"layers": {k: {"sparsity": v} for k, v in reached.items()}}, panel, hooks=hooks)


def _clustering(model: fx.GraphModule, step: ClusteringStep, ctx: CompressContext, index: int) -> StepOutcome:
    layers = list(sparsity_layers(model, step.include, step.exclude))

    def one(trial: nn.Module, layer: str) -> None:
        cluster_weights(trial, step.clusters, preserve_zeros=step.preserve_zeros, seed=step.seed, include=(glob.escape(layer),))

    panel = _single_layer_table(model, layers, step.clusters, one, ctx, "clustering (x: clusters)")
    unique = cluster_weights(model, step.clusters, preserve_zeros=step.preserve_zeros, seed=step.seed,
                             include=step.include, exclude=step.exclude)
    hooks = [structure_preserver(model, sorted(step.structure))] if step.finetune else []
    return StepOutcome(model, {"layers": {k: {"unique": v} for k, v in unique.items()}}, panel, hooks=hooks)


def default_methods() -> MethodRegistry:
    """A fresh registry with the built-in methods (the ``method`` names of :data:`quantlib.compress.steps.STEP_TYPES`)."""
    registry = MethodRegistry()
    for name in ("weight_svd", "spatial_svd"):
        registry.register(name, _svd)
    registry.register("channel_pruning", _channel_pruning)
    for name in ("magnitude_sparsity", "n_m_sparsity", "channel_sparsity"):
        registry.register(name, _sparsity)
    registry.register("clustering", _clustering)
    return registry


@dataclass
class CompressResult:
    """The compressed float model, per-step reports, sensitivity panels and the structure kinds to preserve."""

    model: fx.GraphModule
    steps: list[dict[str, Any]]
    panels: list[SensitivityPanel]
    structure: tuple[str, ...]


def _finetune(model: nn.Module, teacher: nn.Module | None, ctx: CompressContext, hooks: list[Hook]) -> dict[str, Any]:
    """Train ``model`` in place; a distilling ``train_config.loss`` follows ``teacher``, the prepared uncompressed model."""
    from ..qat.trainer import train

    if ctx.train_data is None or ctx.train_config is None:
        raise CompressConfigError("finetune=true needs training data and a TrainConfig (compress.finetune settings)")
    report = train(model, ctx.train_data, ctx.train_config, teacher=teacher, step_hooks=hooks, progress=ctx.progress,
                   device=ctx.device)
    return report.to_dict()


def compress_model(model: nn.Module, steps: Sequence[Any], ctx: CompressContext,
                   registry: MethodRegistry | None = None) -> CompressResult:
    """Apply ``steps`` (step configs or dicts for :func:`parse_step`) to a prepared copy of ``model`` (not mutated).

    Returns a :class:`CompressResult`; the model is an ``fx.GraphModule`` in eval mode.
    """
    registry = registry or default_methods()
    configs = [s if not isinstance(s, dict) else parse_step(s, i) for i, s in enumerate(steps)]
    current = prepare_for_compression(model, ctx.example_input)
    distill = ctx.train_config is not None and ctx.train_config.uses_teacher
    teacher = copy.deepcopy(current) if distill else None  # the uncompressed model (handlers mutate theirs)
    structure: set[str] = set()
    reports, panels = [], []
    for index, step in enumerate(configs):
        start = time.perf_counter()
        outcome = registry.get(step.method)(current, step, ctx, index)
        current = outcome.model
        report = {"method": step.method, **outcome.report}
        if step.finetune:
            hooks = ([structure_preserver(current, sorted(structure))] if structure else []) + outcome.hooks
            report["finetune"] = _finetune(current, teacher, ctx, hooks)
        if outcome.finish is not None:
            outcome.finish(current)
        structure |= step.structure
        # re-trace: layers an earlier step split (SVD factors) become graph nodes a later step can see
        current = prepare_for_compression(current, ctx.example_input)
        report["seconds"] = round(time.perf_counter() - start, 3)
        reports.append(report)
        if outcome.panel is not None:
            panels.append(outcome.panel)
    return CompressResult(current, reports, panels, tuple(sorted(structure)))

