"""Structured-config schema of the ``compress`` recipe group (SVD, pruning, sparsity, clustering).

``recipes/compress/none.yaml`` (``steps: []``) compresses nothing. Otherwise, after the FP32
evaluation, ``quantzoo run`` compresses the FP32 model (:func:`zoo.cli.compress_stage.run_compression`),
evaluates it as metric ``compressed``, then quantizes, (QAT's,) exports and evaluates it as usual.

* ``steps``: the passes, in order; each a mapping with a ``method`` and that method's settings
  (:mod:`quantlib.compress.steps`: ``weight_svd``, ``spatial_svd``, ``channel_pruning``,
  ``magnitude_sparsity``, ``n_m_sparsity``, ``channel_sparsity``, ``clustering``). A wrong method or
  setting fails when the run starts, naming it.
* ``greedy``: how greedy ratio selection and the sensitivity figure score a candidate model: top-1
  (or minus the loss) on the first ``num_samples`` images of the labelled calibration split, never
  the eval split.
* ``refit_samples``: calibration samples for channel importance and the least-squares re-fit.
* ``finetune``: FP32 fine-tuning after steps with ``finetune: true``, by :func:`quantlib.qat.train`
  on ``split`` (``train`` for MNIST/digits, ``calibration`` where there is no train split; never
  the eval split). ``train`` holds :class:`quantlib.qat.TrainConfig` settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class CompressGreedyConf:
    num_samples: Optional[int] = None  # first n calibration samples scored per candidate (null: all)
    batch_size: int = 50
    score: str = "top1"  # top1 | neg_loss
    sensitivity: bool = True  # also score each layer alone for steps without greedy selection (figure)


@dataclass
class CompressFinetuneConf:
    split: str = "train"  # dataset split fine-tuning trains on; never data.eval_split
    num_samples: Optional[int] = None
    batch_size: int = 64
    train: dict[str, Any] = field(default_factory=dict)  # quantlib.qat.TrainConfig settings (epochs, lr, ...)


@dataclass
class CompressConf:
    steps: list[Any] = field(default_factory=list)  # compression passes applied to the FP32 model, in order
    greedy: CompressGreedyConf = field(default_factory=CompressGreedyConf)
    refit_samples: Optional[int] = None  # calibration samples for channel pruning importance and re-fit (null: all)
    refit_batch_size: int = 50
    finetune: CompressFinetuneConf = field(default_factory=CompressFinetuneConf)
