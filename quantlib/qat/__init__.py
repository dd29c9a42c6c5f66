"""Quantization-aware training (QAT) and the shared training loop.

* :mod:`.config`: :class:`TrainConfig`, every training knob, frozen and validated.
* :mod:`.trainer`: :func:`train` (any ``nn.Module``: a QuantSim's model or an FP32 model) and
  :class:`TrainReport`.
* :mod:`.range_learning`: LSQ-style learnable scales/offsets swapped into a QuantSim and back.
* :mod:`.observe`: observers that follow the ranges for the first steps, then freeze.
* :mod:`.losses`, :mod:`.optim`, :mod:`.data`, :mod:`.checkpointing`, :mod:`.distributed`,
  :mod:`.curves`, :mod:`.ste`: one job each (see their docstrings).
"""

from .checkpointing import CheckpointError
from .config import TrainConfig, TrainConfigError
from .range_learning import LearnableQuantizer, disable_range_learning, enable_range_learning
from .trainer import TrainReport, train

__all__ = ["CheckpointError", "LearnableQuantizer", "TrainConfig", "TrainConfigError", "TrainReport",
           "disable_range_learning", "enable_range_learning", "train"]
