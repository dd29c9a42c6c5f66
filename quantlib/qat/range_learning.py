"""Learned quantization ranges: quantizer scales (and offsets) trained by gradient descent.

:class:`LearnableQuantizer` is a :class:`~quantlib.quantizer.FakeQuantizer` whose ``scale`` is an
``nn.Parameter`` and, for asymmetric grids with ``learn_offset``, whose zero point is learned as a
float ``offset`` parameter rounded with a straight-through estimator. The gradients are LSQ's
(Esser et al. 2020, "Learned step size quantization"): for ``x_hat = (clamp(round(x/s) + z) - z) * s``,
``d x_hat / d s = round(x/s) - x/s`` inside the grid (end codes included) and ``q_min - z`` or
``q_max - z`` outside, and the offset receives ``-s`` from clipped values only (LSQ+, Bhalgat et al. 2020, learns the
offset too; AIMET's "range learning" QAT learns the equivalent min/max encodings). With
``grad_scale`` the scale gradient is multiplied by ``1 / sqrt(N * Q_p)`` (LSQ section 2.2; ``N``
elements per group, per sample for activations; the offset gradient gets the same factor, as in
torch's kernels). The ranges start from the PTQ calibration. Half-even per-tensor and per-channel
quantizers use torch's fused learnable fake-quantize kernels
(``torch._fake_quantize_learnable_per_{tensor,channel}_affine``, the kernels of
``torch.ao.quantization``'s LSQ module), which save only the input for the backward pass; other
rounding modes and per-block grids use :func:`quantlib.qat.ste.fake_quantize_ste`, which computes
the same values and gradients (tested).

By default the scale is learned in the log domain (``log_scale`` is the parameter, ``scale`` a
buffer that follows ``exp(log_scale)``), as TQT does (Jain et al. 2019, "Trained quantization
thresholds"): with Adam a step then changes a scale by a relative amount, so per-channel scales
that span orders of magnitude train at one learning rate and can never reach zero or turn negative.
(Measured on EfficientNet-Lite0 W4A8: learning ``s`` directly with Adam at 2e-3 drove 1,000+
weight-channel scales to zero within 9 steps, killing those channels.) ``log_scale=False`` learns
``s`` itself, as LSQ does. The gradient reaching ``log s`` is ``s`` times the one above.

Without a gradient (evaluation) the quantizer computes exactly what a plain FakeQuantizer with
the same encoding computes, and its ``version`` follows the parameters' in-place updates, so
cached quantized weights refresh after every optimizer step.

:func:`enable_range_learning` swaps the quantizers of a model (e.g. ``sim.model``) for learnable
ones in place, keeping the weight modules' input/output quantizer links;
:func:`disable_range_learning` swaps plain FakeQuantizers back with the learned encodings, so the
QuantSim exports, saves and loads exactly as after PTQ. Power-of-two, float and disabled
quantizers are left as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..affine import fake_quantize
from ..batchnorm_fold import set_submodule
from ..qmodules import QuantizedWeightMixin
from ..quantizer import FakeQuantizer
from ..spec import QuantizerSpec
from .ste import clamp_ste, fake_quantize_ste, round_ste, scale_gradient

MIN_SCALE = 1e-8  # as quantlib.affine: a scale never reaches 0


def _levels(spec: QuantizerSpec) -> int:
    """LSQ's Q_p: positive levels of a signed symmetric grid, else all steps of the grid."""
    return spec.quant_max if spec.signed and spec.symmetric else spec.quant_max - spec.quant_min


class LearnableQuantizer(FakeQuantizer):
    """A FakeQuantizer with a learnable scale and, optionally, a learnable offset (module docstring)."""

    def __init__(self, spec: QuantizerSpec, name: str = "", *, learn_offset: bool = True, grad_scale: bool = True,
                 per_sample: bool = True, log_scale: bool = True) -> None:
        super().__init__(spec, name)
        self.learn_offset = learn_offset and not spec.symmetric
        self.grad_scale = grad_scale
        self.per_sample = per_sample  # activations: the first dimension is the batch
        self.log_domain = log_scale
        self.register_parameter("offset", None)
        self.register_parameter("log_scale", None)
        self._synced_log_version: int | None = None

    @classmethod
    def from_quantizer(cls, quantizer: FakeQuantizer, *, learn_offset: bool = True, grad_scale: bool = True,
                       per_sample: bool = True, log_scale: bool = True) -> "LearnableQuantizer":
        """A learnable copy of a calibrated ``quantizer`` (not mutated): same spec, name, encoding and observer."""
        if not quantizer.has_encoding:
            raise ValueError(f"quantizer {quantizer.name} has no encoding; calibrate the QuantSim before enabling range learning")
        new = cls(quantizer.spec, quantizer.name, learn_offset=learn_offset, grad_scale=grad_scale, per_sample=per_sample,
                  log_scale=log_scale)
        new.observer = quantizer.observer
        new.exact = quantizer.exact
        scale = quantizer.scale.detach().clone()
        if log_scale:
            new.scale = scale  # a buffer that follows exp(log_scale)
            new.log_scale = nn.Parameter(torch.log(scale.clamp_min(MIN_SCALE)))
            new._synced_log_version = new.log_scale._version
        else:
            del new.scale
            new.scale = nn.Parameter(scale)
        new.zero_point = quantizer.zero_point.detach().clone()
        if new.learn_offset:
            new.offset = nn.Parameter(quantizer.zero_point.detach().float().clone())
        new.version = quantizer.version + 1
        new.train(quantizer.training)
        return new

    @property
    def scale_parameter(self) -> nn.Parameter:
        """The trained parameter: ``log_scale`` in the log domain, else ``scale``."""
        return self.log_scale if self.log_domain else self.scale

    # -- version: bumped by set_qparams *and* by in-place parameter updates ----------------------
    def _parameter_versions(self) -> int:
        params = self.__dict__.get("_parameters", {})
        return sum(p._version for p in (params.get("scale"), params.get("log_scale"), params.get("offset")) if p is not None)

    def _follow_log_scale(self) -> None:
        """Keep the ``scale`` buffer equal to ``exp(log_scale)`` (others read it, e.g. for the int32 bias grid)."""
        if self.log_domain and self._synced_log_version != self.log_scale._version:
            with torch.no_grad():
                self._buffers["scale"] = torch.exp(self.log_scale.detach()).clamp_min(MIN_SCALE)
            self._synced_log_version = self.log_scale._version

    @property
    def version(self) -> int:  # type: ignore[override]
        return self._base_version + self._parameter_versions()

    @version.setter
    def version(self, value: int) -> None:
        self._base_version = value - self._parameter_versions()

    # -- simulation ----------------------------------------------------------------------------
    def learned_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, int32 zero point) as an evaluation pass uses them (no gradient)."""
        spec = self.spec
        self._follow_log_scale()
        with torch.no_grad():
            scale = self.scale.detach().clamp_min(MIN_SCALE)
            zero_point = self.zero_point
            if self.offset is not None:
                zero_point = torch.round(self.offset.detach()).clamp(spec.quant_min, spec.quant_max)
        return scale, zero_point.to(torch.int32)

    def gradient_factor(self, x: torch.Tensor) -> float:
        """LSQ's ``1 / sqrt(N * Q_p)`` (``N``: elements per group, per sample for activations), or 1."""
        if not self.grad_scale:
            return 1.0
        elements = x.numel() / self.scale.numel() / (x.shape[0] if self.per_sample and x.dim() > 1 else 1)
        return 1.0 / math.sqrt(max(elements, 1.0) * _levels(self.spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if self.calibrating or self.exporting or not spec.enabled or spec.is_float:
            return super().forward(x)
        if not torch.is_grad_enabled():
            return fake_quantize(x, *self.learned_qparams(), spec, exact=self.exact)  # what a plain FakeQuantizer does
        self._follow_log_scale()
        scale = torch.exp(self.log_scale).clamp_min(MIN_SCALE) if self.log_domain else self.scale.clamp_min(MIN_SCALE)
        zero_point = self.offset if self.offset is not None else self.zero_point.to(x.dtype)
        factor = self.gradient_factor(x)
        if spec.rounding == "half_even" and x.dtype == torch.float32 and spec.granularity != "per_block":
            # torch's fused LSQ kernels: the same values and gradients as fake_quantize_ste, saving only x
            if spec.granularity == "per_tensor":
                return torch._fake_quantize_learnable_per_tensor_affine(
                    x, scale, zero_point, spec.quant_min, spec.quant_max, factor)
            return torch._fake_quantize_learnable_per_channel_affine(
                x, scale, zero_point, spec.axis % x.dim(), spec.quant_min, spec.quant_max, factor)
        zero_point = clamp_ste(round_ste(zero_point), spec.quant_min, spec.quant_max)
        return fake_quantize_ste(x, scale_gradient(scale, factor), scale_gradient(zero_point, factor), spec)

    # -- encodings -----------------------------------------------------------------------------
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install an encoding; the learnable parameters take its values."""
        super().set_qparams(scale, zero_point)
        if self.offset is not None:
            self.offset.data = self.zero_point.float().clone()
        if self.log_scale is not None:
            self.log_scale.data = torch.log(self.scale.detach().clamp_min(MIN_SCALE))
            self._synced_log_version = self.log_scale._version

    @torch.no_grad()
    def sync(self) -> None:
        """Write the learned values into the integer ``zero_point`` buffer and clamp the scale."""
        FakeQuantizer.set_qparams(self, *self.learned_qparams())

    def representable_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._follow_log_scale()
        return super().representable_range()

    def encoding(self) -> list[dict]:
        self.sync()
        return super().encoding()

    def begin_export(self) -> None:
        self.sync()
        super().begin_export()

    def to_fake_quantizer(self) -> FakeQuantizer:
        """A plain FakeQuantizer holding the learned encoding (self is not mutated except by :meth:`sync`)."""
        self.sync()
        plain = FakeQuantizer(self.spec, self.name)
        plain.observer = self.observer
        plain.exact = self.exact
        plain.to(self.scale.device)
        plain.set_qparams(self.scale.detach().clone(), self.zero_point.clone())
        plain.version = self.version + 1
        plain.train(self.training)
        return plain


def _learnable(quantizer: FakeQuantizer) -> bool:
    spec = quantizer.spec
    return spec.enabled and not spec.is_float and spec.scale_type == "float" and quantizer.has_encoding


def _swap(model: nn.Module, replace) -> list[str]:
    """Replace FakeQuantizers of ``model`` by ``replace(name, quantizer, is_weight)`` (None: keep); relink refs."""
    weight_modules = [m for m in model.modules() if isinstance(m, QuantizedWeightMixin)]
    weight_quantizers = {id(m.weight_quantizer) for m in weight_modules}
    swapped: dict[int, FakeQuantizer] = {}
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizer):
            new = replace(name, module, id(module) in weight_quantizers)
            if new is not None:
                set_submodule(model, name, new)
                swapped[id(module)] = new
                names.append(name)
    for module in weight_modules:
        for attr in ("input_quantizer_ref", "output_quantizer_ref"):
            ref = getattr(module, attr, None)
            if ref is not None and id(ref[0]) in swapped:
                setattr(module, attr, (swapped[id(ref[0])],))
    return names


def enable_range_learning(model: nn.Module, *, weights: bool = True, activations: bool = True,
                          learn_offset: bool = True, grad_scale: bool = True, log_scale: bool = True) -> list[str]:
    """Swap ``model``'s calibrated integer quantizers for :class:`LearnableQuantizer` (mutated); returns their names.

    ``weights``/``activations`` choose which quantizers learn; ``log_scale`` learns ``log(s)``
    (default) instead of ``s``. Call it before wrapping the model
    in DDP or building an optimizer, so the new parameters are seen by both.
    """
    def replace(name: str, quantizer: FakeQuantizer, is_weight: bool):
        if isinstance(quantizer, LearnableQuantizer) or not _learnable(quantizer):
            return None
        if (is_weight and not weights) or (not is_weight and not activations):
            return None
        return LearnableQuantizer.from_quantizer(quantizer, learn_offset=learn_offset, grad_scale=grad_scale,
                                                 per_sample=not is_weight, log_scale=log_scale)

    return _swap(model, replace)


def disable_range_learning(model: nn.Module) -> list[str]:
    """Swap every :class:`LearnableQuantizer` of ``model`` back to a FakeQuantizer with the learned encoding."""
    return _swap(model, lambda name, q, is_weight: q.to_fake_quantizer() if isinstance(q, LearnableQuantizer) else None)


def learnable_quantizers(model: nn.Module) -> dict[str, LearnableQuantizer]:
    """Module name -> LearnableQuantizer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LearnableQuantizer)}
