"""Training losses of QAT: task loss, knowledge distillation from a teacher, or a weighted sum.

* task: cross-entropy with the labels (optionally label-smoothed).
* distill: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch
  (Hinton, Vinyals and Dean 2015, "Distilling the knowledge in a neural network"); it needs no
  labels, so QAT can run on unlabelled calibration images.
* both: ``(1 - w) * task + w * distill`` with ``w = config.distill_weight``.

All functions are pure: they read tensors and return new ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TrainConfig


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch-mean KL divergence from the teacher's to the student's softened distribution, times ``T^2``."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def training_loss(student: torch.Tensor, labels: torch.Tensor | None, teacher: torch.Tensor | None,
                  config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss ``config.loss`` asks for, and its parts as floats (``task``, ``distill``) for logs.

    Raises ValueError naming ``loss`` when the labels or the teacher logits it needs are missing.
    """
    parts: dict[str, torch.Tensor] = {}
    if config.uses_labels:
        if labels is None:
            raise ValueError(f"loss={config.loss} needs labels but the batches carry none; use loss=distill with a teacher")
        parts["task"] = F.cross_entropy(student.float(), labels, label_smoothing=config.label_smoothing)
    if config.uses_teacher:
        if teacher is None:
            raise ValueError(f"loss={config.loss} needs a teacher; pass train(..., teacher=fp32_model) or use loss=task")
        parts["distill"] = distillation_loss(student, teacher, config.temperature)
    if config.loss == "task":
        total = parts["task"]
    elif config.loss == "distill":
        total = parts["distill"]
    else:
        weights = {"task": 1.0 - config.distill_weight, "distill": config.distill_weight}
        total = sum(weights[name] * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
