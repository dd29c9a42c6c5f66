"""Structured-config schema of the ``compress`` recipe group (SVD, pruning, sparsity, clustering).

``recipes/compress/none.yaml`` (``steps: []``) compresses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompressConf:
    steps: list[Any] = field(default_factory=list)  # compression passes applied to the FP32 model, in order
