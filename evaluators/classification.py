"""Top-1 / top-5 / cross-entropy evaluation of a classifier over a dataset.

:func:`evaluate_classification` is backend-agnostic: it takes any
:class:`~evaluators.backends.InferenceBackend` (torch module, simulated
quantization, ONNX Runtime) and any dataset yielding ``(image, label)``.

Ranking rules (deterministic, identical for every backend):

* the top-1 prediction is ``argmax`` (the first index among tied maxima);
* a sample is top-k correct when fewer than ``k`` classes have a logit strictly
  greater than the label's logit (and the label's logit is finite), with
  ``k = min(5, number of logits)``; so top-1 correct implies top-5 correct.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from evaluators.backends import InferenceBackend

__all__ = [
    "ClassificationMetrics",
    "evaluate_classification",
    "prediction_agreement",
    "wilson_interval",
]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval, in percent, for ``k`` successes out of ``n`` trials.

    ``z = 1.96`` gives the 95% interval; e.g. ``wilson_interval(80, 100)`` is
    about ``(71.1, 86.7)``. Raises ``ValueError`` unless ``0 <= k <= n`` and ``n > 0``.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


@dataclass
class ClassificationMetrics:
    """Result of :func:`evaluate_classification`.

    ``top1``/``top5`` are percentages (0..100), ``loss`` the mean cross-entropy
    (nats), ``seconds`` the wall time of the evaluation loop, ``predictions``
    the top-1 class of every evaluated sample in dataset order.
    """

    top1: float
    top5: float
    loss: float
    num_samples: int
    num_correct_top1: int
    num_correct_top5: int
    seconds: float
    topk: int = 5
    backend: str = ""
    predictions: list[int] = field(default_factory=list, repr=False)

    @property
    def top1_ci95(self) -> tuple[float, float]:
        """95% Wilson interval of ``top1``, in percent."""
        return wilson_interval(self.num_correct_top1, self.num_samples)

    def to_dict(self, *, include_predictions: bool = False) -> dict[str, Any]:
        """JSON-ready dict of the metrics plus ``top1_ci95: [lo, hi]``.

        ``predictions`` is left out unless ``include_predictions`` is true.
        """
        out = asdict(self)
        if not include_predictions:
            out.pop("predictions")
        out["top1_ci95"] = list(self.top1_ci95)
        return out


def prediction_agreement(
    a: ClassificationMetrics | Sequence[int], b: ClassificationMetrics | Sequence[int]
) -> float:
    """Percentage of samples on which ``a`` and ``b`` predict the same top-1 class.

    Accepts metrics objects or plain prediction lists; they must have the same
    non-zero length (i.e. come from the same dataset), else ``ValueError``.
    """
    pa = a.predictions if isinstance(a, ClassificationMetrics) else list(a)
    pb = b.predictions if isinstance(b, ClassificationMetrics) else list(b)
    if len(pa) != len(pb) or not pa:
        raise ValueError(
            f"prediction_agreement needs two non-empty prediction lists of equal length, got {len(pa)} and {len(pb)}"
        )
    same = sum(int(x) == int(y) for x, y in zip(pa, pb))
    return 100.0 * same / len(pa)


def _check_logits(logits: torch.Tensor, labels: torch.Tensor, backend_name: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"backend {backend_name!r} returned logits of shape {shape}; expected ({labels.shape[0]}, num_classes)"
        )
    if labels.numel() and int(labels.max()) >= logits.shape[1]:
        raise ValueError(
            f"label {int(labels.max())} is out of range for backend {backend_name!r} with {logits.shape[1]} logits; "
            f"the model and the dataset disagree on the number of classes"
        )


def evaluate_classification(
    backend: InferenceBackend,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "eval",
    progress: bool = True,
    max_batches: int | None = None,
) -> ClassificationMetrics:
    """Evaluate ``backend`` on ``dataset`` and return :class:`ClassificationMetrics`.

    The dataset is read in order (``shuffle=False``) in batches of
    ``batch_size``; ``max_batches`` stops early (for smoke runs). Loss and
    counts are accumulated in float64 / Python ints. Neither the backend nor the
    dataset is mutated (a :class:`TorchBackend` was already put in eval mode).
    """
    if batch_size <= 0:
        raise ValueError(f"evaluator.batch_size={batch_size} must be a positive integer")
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"evaluator.max_batches={max_batches} must be a positive integer or null")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False)
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    name = getattr(backend, "name", type(backend).__name__)

    loss_sum = 0.0
    n = correct1 = correct5 = 0
    k_used = 5
    predictions: list[int] = []
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, disable=not progress, unit="batch", leave=False) as bar:
        for batch_index, (images, labels) in enumerate(loader):
            if batch_index >= total:
                break
            labels = torch.as_tensor(labels, dtype=torch.long)
            logits = backend(images)
            _check_logits(logits, labels, name)
            logits = logits.detach().to("cpu", torch.float64)
            k_used = min(5, logits.shape[1])
            label_logit = logits.gather(1, labels[:, None])
            rank = (logits > label_logit).sum(dim=1)  # classes strictly above the label
            finite = torch.isfinite(label_logit[:, 0])
            top1 = logits.argmax(dim=1)
            correct1 += int(((top1 == labels) & finite).sum())
            correct5 += int(((rank < k_used) & finite).sum())
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            n += labels.shape[0]
            predictions.extend(top1.tolist())
            bar.update(1)
            bar.set_postfix(top1=f"{100.0 * correct1 / n:.2f}")
    seconds = time.perf_counter() - start
    if n == 0:
        raise ValueError(f"dataset {dataset!r} is empty; nothing to evaluate (check data.num_samples)")
    return ClassificationMetrics(
        top1=100.0 * correct1 / n,
        top5=100.0 * correct5 / n,
        loss=loss_sum / n,
        num_samples=n,
        num_correct_top1=correct1,
        num_correct_top5=correct5,
        seconds=seconds,
        topk=k_used,
        backend=name,
        predictions=predictions,
    )
