"""``digits_mlp``: a two-layer MLP on scikit-learn's 8x8 digits, trained here in seconds.

Data: ``evaluators``' ``digits`` dataset (``sklearn.datasets.load_digits``,
fixed split 1,437 train / 360 test), images ``1x8x8`` scaled by 1/16 and
normalized with mean 0.5 / std 0.5. The weights (~18 KB) ship in ``zoo/weights/``.
This is the model tests use when they need a real, fast, trained network.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.card import ArchitectureSource, ModelCard, PreprocessingSpec, TrainingRecipe, WeightsSource

__all__ = ["CARDS", "DIGITS_MLP", "DigitsMLP", "digits_mlp"]


class DigitsMLP(nn.Module):
    """Flatten - Linear(in_features -> hidden) - ReLU - Linear(hidden -> num_classes)."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flatten(x))))


def digits_mlp(num_classes: int = 10, in_features: int = 64, hidden: int = 64) -> DigitsMLP:
    """The ``digits_mlp`` architecture (randomly initialised)."""
    return DigitsMLP(num_classes=num_classes, in_features=in_features, hidden=hidden)


_SHA256 = "0c711db97a770ce59d01f0a86276c1a5b70e155a83707003c466899e8d7ee029"
_FILENAME = f"digits_mlp-{_SHA256[:8]}.safetensors"

DIGITS_MLP = ModelCard(
    name="digits_mlp",
    task="classification",
    architecture=ArchitectureSource(
        kind="local", name="zoo.models.digits:digits_mlp", kwargs={"in_features": 64, "hidden": 64}
    ),
    num_classes=10,
    input_size=(1, 8, 8),
    preprocessing=PreprocessingSpec(
        resize=None, crop=None, interpolation="bilinear", mean=(0.5,), std=(0.5,), in_chans=1
    ),
    weights=WeightsSource(sha256=_SHA256, filename=_FILENAME, path=_FILENAME),
    dataset="digits",
    license="Apache-2.0",
    training_dataset="digits train split (1,437 of scikit-learn's 1,797 8x8 digits; evaluators' fixed split)",
    training=TrainingRecipe(
        seed=0, epochs=30, batch_size=32, lr=0.003, optimizer="adamw", weight_decay=0.01
    ),
    tags=("digits", "mlp", "tiny", "trained-here"),
    description="Two-layer MLP (4.8k parameters) on scikit-learn's 8x8 digits; trains in seconds.",
)

CARDS: tuple[ModelCard, ...] = (DIGITS_MLP,)
