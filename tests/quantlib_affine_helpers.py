"""Shared by the quantlib.affine tests: the two common 8-bit specs and a float32 tensor shorthand."""

from __future__ import annotations

import torch

from quantlib.spec import QuantizerSpec

ASYM_U8 = QuantizerSpec(bitwidth=8, symmetric=False, signed=False)
SYM_S8 = QuantizerSpec(bitwidth=8, symmetric=True, signed=True)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)
