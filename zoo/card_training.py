"""The training part of a model card: how ``quantzoo train`` reproduces its weights.

:class:`TrainingRecipe` only describes the procedure; :mod:`zoo.training`
runs it. It is frozen, validates itself on construction and raises
:class:`zoo.card_fields.CardError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from zoo.card_fields import check_choice, check_int, check_number, fail, set_field

__all__ = ["OPTIMIZERS", "TrainingRecipe"]

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainingRecipe:
    """How ``quantzoo train`` reproduces the card's weights on the CPU.

    Fixed parts of the procedure (see :mod:`zoo.training`): cross-entropy loss,
    per-step cosine learning-rate decay after a linear warm-up, SGD with
    Nesterov momentum 0.9 or AdamW. ``translate`` is the largest random shift
    (pixels, zero padded) applied to training images; ``num_train_samples``
    uses only the first N samples of the train split (``None``: all).
    """

    seed: int
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    num_train_samples: int | None = None
    translate: int = 0
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        self._validate("training")

    def _validate(self, where: str) -> None:
        check_int(f"{where}.seed", self.seed, minimum=0)
        check_int(f"{where}.epochs", self.epochs, minimum=1)
        check_int(f"{where}.batch_size", self.batch_size, minimum=1)
        set_field(self, "lr", check_number(f"{where}.lr", self.lr, positive=True))
        check_choice(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        set_field(self, "weight_decay", check_number(f"{where}.weight_decay", self.weight_decay, non_negative=True))
        if self.num_train_samples is not None:
            check_int(f"{where}.num_train_samples", self.num_train_samples, minimum=1)
        check_int(f"{where}.translate", self.translate, minimum=0)
        warmup = check_number(f"{where}.warmup_epochs", self.warmup_epochs, non_negative=True)
        if warmup > self.epochs:
            fail(f"{where}.warmup_epochs", f"must be <= epochs={self.epochs}, got {warmup}")
        set_field(self, "warmup_epochs", warmup)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
