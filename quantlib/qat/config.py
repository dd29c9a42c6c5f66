"""TrainConfig: every knob of :func:`quantlib.qat.trainer.train`, as one frozen, validated dataclass.

A bad value fails where the config is built, with a message that names the field and the
accepted values (:class:`TrainConfigError`). ``to_dict``/``from_dict`` round-trip through JSON, and
:meth:`TrainConfig.fingerprint` names the settings a resumed run must share with the run that wrote
the checkpoint (everything except ``checkpoint_every_steps``, which does not change the result).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
LOSSES = ("task", "distill", "both")
BATCH_NORM_MODES = ("frozen", "train")
# Settings that may differ between a checkpointed run and the run resuming it.
RESUMABLE_DIFFERENCES = frozenset({"checkpoint_every_steps"})


class TrainConfigError(ValueError):
    """A training setting is invalid; the message names the field and the fix."""


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TrainConfigError(f"{name}={value!r} is not supported; use one of {', '.join(choices)}")


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`quantlib.qat.trainer.train` trains a model.

    Attributes:
        epochs: passes over the training batches (>= 1).
        optimizer: ``sgd`` (with ``momentum``, Nesterov when ``nesterov``), ``adam`` or ``adamw``.
        lr: peak learning rate of the model's weights and biases.
        momentum: SGD momentum (ignored by Adam/AdamW).
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 (SGD/Adam) or decoupled (AdamW) decay of weights with 2+ dimensions;
            biases, norm parameters and quantizer ranges are never decayed.
        quantizer_lr: learning rate of learnable quantizer ranges (LSQ scales and offsets,
            :mod:`quantlib.qat.range_learning`); None: ``lr``.
        schedule: per-step LR schedule after warm-up: ``constant``, ``cosine`` (to 0 at the last
            step) or ``linear`` (to 0).
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many steps.
        loss: ``task`` (cross-entropy with the labels), ``distill`` (KL divergence to the
            teacher's softened logits; needs no labels) or ``both``:
            ``(1 - distill_weight) * task + distill_weight * distill``.
        temperature: softmax temperature of distillation (Hinton et al. 2015); the KL term is
            multiplied by ``temperature**2`` so its gradient scale does not depend on it.
        distill_weight: the distillation share of ``loss=both``, in [0, 1].
        label_smoothing: cross-entropy label smoothing of the task loss.
        grad_clip_norm: clip the global gradient norm to this value; None: no clipping.
        freeze_observers_after: optimizer steps during which the quantizer observers keep
            re-estimating the encodings (activations: moving average of each batch's min/max with
            ``observer_momentum``; weights: recalibrated from the current weights after every
            step). 0 keeps the PTQ encodings fixed from the start (only learnable ranges move).
        observer_momentum: weight of the running range in the activation moving average.
        batch_norm: BatchNorm layers the model still has (QuantSim folds most into the preceding
            conv with frozen statistics): ``frozen`` keeps them in eval mode (running statistics,
            not updated); ``train`` normalises with batch statistics and updates the running ones.
        checkpoint_every_steps: also checkpoint every N optimizer steps (checkpoints are always
            written at the end of every epoch); None: epoch ends only.
        seed: seeds the global torch RNG (dropout, stochastic rounding) at the start of training.
    """

    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    quantizer_lr: float | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    loss: str = "task"
    temperature: float = 1.0
    distill_weight: float = 0.5
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    freeze_observers_after: int = 0
    observer_momentum: float = 0.9
    batch_norm: str = "frozen"
    checkpoint_every_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise TrainConfigError(f"epochs={self.epochs!r} must be an integer >= 1")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("loss", self.loss, LOSSES)
        _choice("batch_norm", self.batch_norm, BATCH_NORM_MODES)
        if not self.lr > 0:
            raise TrainConfigError(f"lr={self.lr} must be > 0")
        if self.quantizer_lr is not None and not self.quantizer_lr >= 0:
            raise TrainConfigError(f"quantizer_lr={self.quantizer_lr} must be >= 0, or null to use lr")
        if not 0.0 <= self.momentum < 1.0:
            raise TrainConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            raise TrainConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise TrainConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not self.temperature > 0:
            raise TrainConfigError(f"temperature={self.temperature} must be > 0")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise TrainConfigError(f"distill_weight={self.distill_weight} must be in [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise TrainConfigError(f"grad_clip_norm={self.grad_clip_norm} must be > 0, or null for no clipping")
        if self.freeze_observers_after < 0:
            raise TrainConfigError(f"freeze_observers_after={self.freeze_observers_after} must be >= 0 (0: keep the PTQ encodings)")
        if not 0.0 <= self.observer_momentum < 1.0:
            raise TrainConfigError(f"observer_momentum={self.observer_momentum} must be in [0, 1)")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise TrainConfigError(f"checkpoint_every_steps={self.checkpoint_every_steps} must be >= 1, or null for epoch ends only")

    @property
    def uses_teacher(self) -> bool:
        """True when the loss needs teacher logits."""
        return self.loss in ("distill", "both") and not (self.loss == "both" and self.distill_weight == 0.0)

    @property
    def uses_labels(self) -> bool:
        """True when the loss needs labels."""
        return self.loss == "task" or (self.loss == "both" and self.distill_weight < 1.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping; an unknown key raises TrainConfigError naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainConfigError(f"unknown training setting {unknown[0]!r}; valid settings: {', '.join(sorted(names))}")
        return cls(**dict(data))

    def fingerprint(self) -> str:
        """sha256 of the settings that decide the result (all but :data:`RESUMABLE_DIFFERENCES`)."""
        kept = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_DIFFERENCES}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """Names of result-deciding fields whose value differs from ``other`` (a ``to_dict``)."""
        mine = self.to_dict()
        return sorted(k for k in set(mine) | set(other)
                      if k not in RESUMABLE_DIFFERENCES and mine.get(k) != other.get(k))
