"""Structured-config schema of the ``qat`` recipe group (quantization-aware training).

``recipes/qat/none.yaml`` leaves QAT off; a QAT recipe turns it on and sets the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QatConf:
    enabled: bool = False  # true: fine-tune the calibrated QuantSim before evaluating and exporting it
