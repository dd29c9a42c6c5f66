"""AdaRound's settings and schedule: :class:`AdaRoundConfig` (with per-layer/per-block
:class:`ScheduleOverride` entries), :func:`config_for` (the settings one layer or block runs
with) and :func:`beta_at` (the regularizer's annealed exponent). The pass itself is
:mod:`quantlib.ptq.adaround`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .layerwise import LayerwiseConfig
from .pass_config import PassConfigError, check_choice, check_int, check_positive, config_from_mapping

BETA_SCHEDULES = ("cosine", "linear")
RECONSTRUCT = ("layer", "block")


@dataclass(frozen=True)
class ScheduleOverride:
    """A different optimization schedule for the layers (``reconstruct="layer"``) or blocks
    (``"block"``) whose name matches the fnmatch glob ``pattern``; the settings left None keep
    the pass-wide value. The first matching override applies.

    Attributes:
        pattern: glob over layer names (``blocks.0.0.conv_dw``) or block names (``blocks.0.0``).
        num_iterations, reg_weight, learning_rate: as in :class:`AdaRoundConfig`.
    """

    pattern: str
    num_iterations: int | None = None
    reg_weight: float | None = None
    learning_rate: float | None = None

    def settings(self) -> dict[str, Any]:
        """The settings this override changes."""
        return {name: getattr(self, name) for name in ("num_iterations", "reg_weight", "learning_rate")
                if getattr(self, name) is not None}


def _schedule_override(value: Any, index: int) -> ScheduleOverride:
    where = f"schedule_overrides[{index}]"
    if isinstance(value, ScheduleOverride):
        return value
    if not isinstance(value, Mapping):
        raise PassConfigError(f"{where} must be a mapping like {{pattern: 'blocks.0.*', num_iterations: 2000}}, "
                              f"got {value!r}")
    override = config_from_mapping(ScheduleOverride, value, where)
    if not isinstance(override.pattern, str) or not override.pattern:
        raise PassConfigError(f"{where}.pattern={override.pattern!r} must be a glob over layer or block names, e.g. 'blocks.0.*'")
    if not override.settings():
        raise PassConfigError(f"{where} ({override.pattern!r}) changes nothing; set num_iterations, reg_weight or learning_rate")
    try:
        check_schedule(**override.settings())
    except PassConfigError as err:
        raise PassConfigError(f"schedule_overrides ({override.pattern!r}): {err}") from None
    return override


def check_schedule(num_iterations: Any = None, reg_weight: Any = None, learning_rate: Any = None) -> None:
    """Raise :class:`PassConfigError` for a schedule setting out of range (None: not given)."""
    if num_iterations is not None:
        check_int("num_iterations", num_iterations, 0)
    if reg_weight is not None:
        check_positive("reg_weight", reg_weight, allow_zero=True)
    if learning_rate is not None:
        check_positive("learning_rate", learning_rate)


@dataclass(frozen=True)
class AdaRoundConfig(LayerwiseConfig):
    """Settings of :func:`apply_adaround`; defaults follow AIMET. The caching, layer selection and
    input-source settings are those of :class:`~quantlib.ptq.layerwise.LayerwiseConfig`.

    Attributes:
        num_iterations: optimization steps per layer (AIMET: 10000; 500-2000 is usually enough).
        reg_weight: weight of the rounding regularizer (AIMET default_reg_param 0.01).
        beta_start, beta_end: annealing range of the regularizer's exponent (20 -> 2).
        warm_start: fraction of the iterations without the regularizer (0.2).
        beta_schedule: cosine (AIMET) or linear (the paper's reference code).
        learning_rate: Adam learning rate for V (1e-3).
        history_points: how many (iteration, beta, losses) records to keep per layer.
        keep_nearest_if_worse: when the AdaRounded layer's output MSE is above round-to-nearest's,
            keep round-to-nearest for that layer (the soft rounding may not have converged in a
            short schedule). Judged on the held-out chunks with ``holdout_chunks``, otherwise on
            the first cached chunk (whole feature maps), which the optimization also fitted on.
        schedule_overrides: :class:`ScheduleOverride` entries (mappings in a recipe) giving the
            layers or blocks whose name matches a glob their own ``num_iterations``,
            ``reg_weight`` or ``learning_rate``: a block whose rounding is still undecided at the
            end of the pass-wide schedule (see :attr:`AdaRoundLayerResult.undecided`) can get a
            longer one without lengthening every other block's. A pattern that matches no selected
            layer and no block of them is an error.
        reconstruct: "layer" (the paper and AIMET: each layer's output) or "block" (BRECQ, Li et
            al. 2021: the roundings of all layers of a block, e.g. an inverted-residual block with
            its skip connection, are optimized jointly on the block's output, with the activation
            quantizers inside the block on; see :func:`~quantlib.ptq.regions.block_regions`). A
            block step runs whole feature maps, so ``crop`` must be unset, and the block output is
            compared as it is (``through_activation`` does not apply).
        holdout_checkpoints: early stopping on the held-out chunks (needs ``holdout_chunks``).
            At this many evenly spaced points of each layer's or block's schedule, the last one
            being its end, the hard rounding ``[V >= 0]`` of that moment is scored by its output
            MSE on the held-out chunks, and the best one is kept instead of the end's: a late
            layer whose rounding fits the calibration images ever closer while its error on unseen
            ones rises stops where the unseen error was lowest. 0 (the default) keeps the end's
            rounding. ``keep_nearest_if_worse`` then compares the kept rounding with nearest.
        fisher_samples: BRECQ's Fisher-weighted block loss (needs ``reconstruct="block"``). Each
            element of a block's squared output error is weighted by ``1 + F / mean(F)``, where
            ``F`` is the diagonal Fisher information of the float model's prediction with respect
            to the block output, estimated per sample with this many labels drawn from the float
            model's softmax (:mod:`quantlib.ptq.output_fisher`; costs one forward and this many
            backward passes of the float model over the cached samples). The weighted error is
            also what ``keep_nearest_if_worse`` and ``holdout_checkpoints`` compare, and what the
            result's block MSEs report. 0 (the default): plain MSE.
        restarts: run the whole pass this many times with seeds ``seed``, ``seed + 1``, ... and
            keep the run whose logits are closest to FP32's (KL) on the samples of the held-out
            chunks (needs ``holdout_chunks``; :mod:`quantlib.ptq.adaround_restarts`). Costs that
            many passes. 1 (the default): one pass.

    The AIMET defaults suit 10,000 iterations. For short CPU schedules a larger step and
    regularizer converge ``h(V)`` to 0/1 in time: on EfficientNet-Lite0 W4A8, 500 iterations with
    ``learning_rate=0.01, reg_weight=0.1`` lowered the output MSE of all of its first six layers
    against nearest rounding, where the defaults left two of them worse.
    """

    num_iterations: int = 10000
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    beta_schedule: str = "cosine"
    learning_rate: float = 1e-3
    history_points: int = 20
    keep_nearest_if_worse: bool = True
    reconstruct: str = "layer"
    schedule_overrides: tuple[ScheduleOverride, ...] = ()
    holdout_checkpoints: int = 0
    fisher_samples: int = 0
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        overrides = self.schedule_overrides
        if isinstance(overrides, (str, Mapping)) or not isinstance(overrides, (tuple, list)):
            raise PassConfigError(f"schedule_overrides={overrides!r} must be a list of "
                                  "{pattern: GLOB, num_iterations: N, ...} mappings")
        object.__setattr__(self, "schedule_overrides",
                           tuple(_schedule_override(value, i) for i, value in enumerate(overrides)))
        check_choice("reconstruct", self.reconstruct, RECONSTRUCT)
        if self.reconstruct == "block" and self.crop is not None:
            raise PassConfigError(f"crop={self.crop} crops one layer's output; reconstruct='block' runs whole "
                                  "feature maps through a block, so set crop: null")
        check_schedule(self.num_iterations, self.reg_weight, self.learning_rate)
        check_positive("beta_end", self.beta_end)
        if not self.beta_start >= self.beta_end:
            raise PassConfigError(f"beta_start={self.beta_start} must be >= beta_end={self.beta_end} (beta anneals downwards)")
        if not 0.0 <= self.warm_start < 1.0:
            raise PassConfigError(f"warm_start={self.warm_start} must be a fraction in [0, 1)")
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_int("history_points", self.history_points, 0)
        check_int("holdout_checkpoints", self.holdout_checkpoints, 0)
        if self.holdout_checkpoints and not self.holdout_chunks:
            raise PassConfigError(f"holdout_checkpoints={self.holdout_checkpoints} scores roundings on held-out chunks, "
                                  "and holdout_chunks=0 holds none out; set holdout_chunks >= 1 or holdout_checkpoints=0")
        check_int("fisher_samples", self.fisher_samples, 0)
        if self.fisher_samples and self.reconstruct != "block":
            raise PassConfigError(f"fisher_samples={self.fisher_samples} weights a block's output error; it needs "
                                  f"reconstruct='block', not {self.reconstruct!r} (or set fisher_samples=0)")
        check_int("restarts", self.restarts, 1)
        if self.restarts > 1 and not self.holdout_chunks:
            raise PassConfigError(f"restarts={self.restarts} picks a run on held-out chunks, and holdout_chunks=0 "
                                  "holds none out; set holdout_chunks >= 1 or restarts=1")


def config_for(config: AdaRoundConfig, name: str) -> AdaRoundConfig:
    """The settings for the layer or block ``name``: the first matching schedule override applied."""
    for override in config.schedule_overrides:
        if fnmatch.fnmatchcase(name, override.pattern):
            return dataclasses.replace(config, schedule_overrides=(), **override.settings())
    return config


def check_overrides_match(config: AdaRoundConfig, layers: list[str]) -> None:
    """Raise :class:`PassConfigError` for a schedule override whose pattern matches none of
    ``layers`` and none of the blocks they belong to (a typo would silently change nothing)."""
    names = set(layers) | {layer.rsplit(".", 1)[0] for layer in layers if "." in layer}
    for index, override in enumerate(config.schedule_overrides):
        if not any(fnmatch.fnmatchcase(name, override.pattern) for name in names):
            raise PassConfigError(f"schedule_overrides[{index}].pattern={override.pattern!r} matches no selected layer "
                                  f"or block; names look like {sorted(names)[0]!r}")


def checkpoint_iterations(num_iterations: int, checkpoints: int) -> tuple[int, ...]:
    """Step counts (1-based: the number of steps taken) at which ``holdout_checkpoints`` scores
    the rounding: ``checkpoints`` evenly spaced ones ending at ``num_iterations`` (fewer when the
    schedule has fewer steps; none for 0 steps or 0 checkpoints)."""
    if num_iterations == 0 or checkpoints == 0:
        return ()
    return tuple(sorted({max(1, round(i * num_iterations / checkpoints)) for i in range(1, checkpoints + 1)}))


def beta_at(config: AdaRoundConfig, iteration: int) -> float | None:
    """The regularizer exponent at ``iteration`` (0-based), or None while the warm start lasts."""
    warm = int(config.warm_start * config.num_iterations)
    if iteration < warm:
        return None
    span = max(config.num_iterations - 1 - warm, 1)
    progress = min((iteration - warm) / span, 1.0)
    if config.beta_schedule == "linear":
        return config.beta_start + (config.beta_end - config.beta_start) * progress
    return config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1.0 + math.cos(math.pi * progress))
