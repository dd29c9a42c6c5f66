"""Freeze a weight layer's encoding after a PTQ pass has chosen its integer codes.

QuantSim recomputes weight encodings from the current weights whenever it calibrates
(``QuantSim.calibrate`` -> ``compute_weight_encodings`` -> ``calibrate_weight`` ->
``FakeQuantizer.calibrate_from``). After AdaRound or AdaQuant the weights and codes were chosen
for one particular scale, so a later calibration must not move it. :func:`freeze_weight_encoding`
swaps the layer's weight quantizer for a :class:`FrozenWeightQuantizer`: the same quantizer
(same spec, buffers, name and state_dict keys, still a ``FakeQuantizer``) whose calibration
methods do nothing. ``set_qparams`` still works, so loading saved encodings or a quantized
checkpoint behaves as before.

:func:`write_weight_codes` stores integer codes as the float weight ``(codes - zero_point) *
scale``. The weight quantizer maps that value back to exactly ``codes`` (``k * s / s`` rounds to
``k`` for every code a 16-bit grid holds), so simulation, ``QuantSim.encodings()``, the
quantized checkpoint and the ONNX export all carry the chosen integers. Replacing the weight
in place bumps its version counter and the new quantizer bumps ``version``, which invalidates the
quantize-dequantized weight and int32 bias that the quantized module caches.

The float weight the layer had when it was first frozen is kept as the non-persistent buffer
``float_weight`` of the frozen quantizer (not in ``state_dict``, so checkpoints and exports are
unchanged). :func:`unfreeze_weight` puts it back, for passes that change a frozen layer's format
(mixed precision moving an AdaRounded 4-bit layer to 8 bits re-quantizes the float weight).
"""

from __future__ import annotations

import torch
from torch import nn

from ..affine import dequantize, quantize
from ..quantizer import FakeQuantizer


class FrozenWeightQuantizer(FakeQuantizer):
    """A weight quantizer whose encoding was fixed by a PTQ pass (``frozen_by`` names it).

    ``compute_encoding`` and ``calibrate_from`` are no-ops; everything else is inherited.
    """

    frozen_by: str

    @classmethod
    def wrap(cls, quantizer: FakeQuantizer, frozen_by: str) -> "FrozenWeightQuantizer":
        """A frozen quantizer with ``quantizer``'s state (its tensors are shared, not copied)."""
        frozen = cls.__new__(cls)
        frozen.__dict__ = quantizer.__dict__.copy()
        frozen._parameters = quantizer._parameters.copy()
        frozen._buffers = quantizer._buffers.copy()
        frozen._modules = quantizer._modules.copy()
        frozen._non_persistent_buffers_set = set(quantizer._non_persistent_buffers_set)
        frozen.frozen_by = frozen_by
        return frozen

    def compute_encoding(self) -> None:
        """Keep the frozen encoding."""

    def calibrate_from(self, tensor: torch.Tensor) -> None:
        """Keep the frozen encoding (the weight was written for it)."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen_by={self.frozen_by}"


def is_frozen(quantizer: FakeQuantizer) -> bool:
    """True when ``quantizer``'s encoding is frozen."""
    return isinstance(quantizer, FrozenWeightQuantizer)


def freeze_weight_encoding(module: nn.Module, frozen_by: str) -> FrozenWeightQuantizer:
    """Make ``module.weight_quantizer`` frozen (in place on ``module``); returns the new quantizer.

    The first freeze keeps a copy of the current (float) weight as ``float_weight``; freezing an
    already frozen layer again (AdaQuant after AdaRound) keeps the original copy.
    """
    current = module.weight_quantizer
    if not current.has_encoding:
        raise ValueError(f"{current.name}: cannot freeze a weight quantizer without an encoding; calibrate the sim first")
    if is_frozen(current):
        frozen = current
    else:
        frozen = FrozenWeightQuantizer.wrap(current, frozen_by)
        frozen.register_buffer("float_weight", module.weight.detach().clone(), persistent=False)
    frozen.frozen_by = frozen_by
    frozen.version += 1
    module.weight_quantizer = frozen
    return frozen


def weight_codes(module: nn.Module) -> torch.Tensor:
    """The integer codes (int32) the layer's weight quantizer gives its current weight."""
    wq = module.weight_quantizer
    return quantize(module.weight.detach(), wq.scale, wq.zero_point, wq.spec)


@torch.no_grad()
def write_weight_codes(module: nn.Module, codes: torch.Tensor, frozen_by: str) -> None:
    """Set the weight to the grid values of ``codes`` and freeze the encoding (mutates ``module``).

    Raises RuntimeError if the quantizer would not reproduce ``codes`` (it always does for
    half_even/half_up/half_down rounding; stochastic rounding can flip a code).
    """
    wq = freeze_weight_encoding(module, frozen_by)
    values = dequantize(codes, wq.scale, wq.zero_point, wq.spec)
    module.weight.copy_(values.to(module.weight.dtype))
    if not torch.equal(weight_codes(module), codes.to(torch.int32)):
        raise RuntimeError(f"{wq.name}: the weight quantizer does not reproduce the written codes "
                           f"(rounding={wq.spec.rounding}); use half_even rounding for weights")


@torch.no_grad()
def unfreeze_weight(module: nn.Module) -> FakeQuantizer:
    """Undo :func:`freeze_weight_encoding` on ``module`` (mutated): the float weight kept at the first
    freeze is written back and a plain :class:`FakeQuantizer` with the same spec and encoding takes
    the frozen one's place (a later calibration recomputes it). Returns the new quantizer; a layer
    that is not frozen is left as it is.
    """
    current = module.weight_quantizer
    if not is_frozen(current):
        return current
    plain = FakeQuantizer(current.spec, name=current.name)
    plain.set_qparams(current.scale, current.zero_point)
    plain.exact = current.exact
    plain.version = current.version + 1  # differs from every cache key taken with the frozen one
    module.weight.copy_(current.float_weight.to(module.weight.dtype))
    module.weight_quantizer = plain.to(current.scale.device)
    return plain
