"""Structured-config schema of the ``qat`` recipe group (quantization-aware training).

``recipes/qat/none.yaml`` leaves QAT off; a QAT recipe turns it on and sets the trainer. After
calibration and the PTQ steps, ``quantzoo run`` trains the QuantSim on the calibration split
(:func:`zoo.cli.qat_stage.run_qat`) and then evaluates and exports it as for PTQ. The trainer
settings map one to one onto :class:`quantlib.qat.TrainConfig` (see its docstring for each);
the rest say what the stage does around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

LEARN_RANGES = ("none", "weights", "activations", "all")


@dataclass
class QatConf:
    enabled: bool = False  # true: fine-tune the calibrated QuantSim before evaluating and exporting it
    # -- data: the calibration split (never the eval split) -------------------------------------
    batch_size: int = 32
    shuffle: bool = True  # a fresh permutation per epoch, fixed by (seed, epoch)
    cache_data: bool = True  # decode the training images once into memory
    # -- quantlib.qat.TrainConfig ---------------------------------------------------------------
    epochs: int = 1
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    quantizer_lr: Optional[float] = None  # learnable ranges' LR; null: lr
    schedule: str = "cosine"  # constant | cosine | linear (per step, after warm-up)
    warmup_steps: int = 0
    loss: str = "task"  # task (labels) | distill (FP32 teacher, no labels) | both
    temperature: float = 1.0
    distill_weight: float = 0.5  # loss=both: (1 - w) * task + w * distill
    label_smoothing: float = 0.0
    grad_clip_norm: Optional[float] = None
    freeze_observers_after: int = 0  # steps during which observers re-estimate encodings; 0: PTQ encodings kept
    observer_momentum: float = 0.9
    batch_norm: str = "frozen"  # BNs QuantSim did not fold: frozen (running stats) | train (batch stats)
    checkpoint_every_steps: Optional[int] = None  # besides every epoch end
    seed: int = 0
    # -- around the trainer ---------------------------------------------------------------------
    learn_ranges: str = "none"  # none | weights | activations | all: LSQ scales (and offsets) learned
    learn_offset: bool = True  # asymmetric grids also learn their zero point (LSQ+)
    learn_log_scale: bool = True  # learn log(scale) (TQT): relative Adam steps, scales stay > 0; false: scale itself (LSQ)
    lsq_grad_scale: bool = True  # LSQ's 1/sqrt(N*Qp) scale-gradient factor
    reestimate_bn: bool = False  # re-estimate unfolded BNs' running stats on the training data afterwards
    preserve: list[str] = field(default_factory=list)  # subset of [sparsity, clusters] kept by every step
    checkpoint_dir: str = "${artifacts_dir}/qat/${model.name}/${recipe}"
    resume: bool = False  # continue from checkpoint_dir/last.pt when it exists
