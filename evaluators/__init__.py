"""quantzoo evaluators: datasets, preprocessing, inference backends and metrics.

Independent of ``zoo`` / ``quantlib`` / hydra. Typical use::

    from evaluators import Preprocessing, build_dataset, TorchBackend, evaluate_classification

    pre = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = build_dataset("imagenet_sample", "eval", root=None, preprocessing=pre)
    metrics = evaluate_classification(TorchBackend(model), ds, batch_size=50)
    print(metrics.to_dict())
"""

from evaluators.backends import InferenceBackend, OnnxRuntimeBackend, TorchBackend, resolve_device
from evaluators.classification import (
    ClassificationMetrics,
    evaluate_classification,
    prediction_agreement,
    wilson_interval,
)
from evaluators.datasets import DatasetRegistry, build_dataset, default_registry, list_datasets
from evaluators.errors import EvaluatorConfigError
from evaluators.preprocessing import Preprocessing, build_transform

__all__ = [
    "ClassificationMetrics",
    "DatasetRegistry",
    "EvaluatorConfigError",
    "InferenceBackend",
    "OnnxRuntimeBackend",
    "Preprocessing",
    "TorchBackend",
    "build_dataset",
    "build_transform",
    "default_registry",
    "evaluate_classification",
    "list_datasets",
    "prediction_agreement",
    "resolve_device",
    "wilson_interval",
]
