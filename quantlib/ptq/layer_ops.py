"""Run one weight layer with explicitly given weights on its cached data (for reconstruction passes).

AdaRound and AdaQuant evaluate a layer many times with candidate weights that are not the layer's
own. :func:`layer_forward` does that for Conv1d/Conv2d/ConvTranspose2d/Linear (and their quantized
subclasses) without touching the module. :class:`ReconstructionBatches` draws random mini-batches
of (input, float target) from a :class:`~quantlib.ptq.layer_cache.LayerData`; with ``crop`` set, a
convolution sees a random ``crop x crop`` window of its output per mini-batch (and exactly the
input window that produces it, zero padding included), an unbiased estimate of the full-map
reconstruction loss at a fraction of the cost for layers with large feature maps. With
``input_drop`` it mixes the float reference's inputs into the quantized ones (QDrop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .chunk_store import take

if TYPE_CHECKING:
    from .layer_cache import LayerData


def layer_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  *, windowed: bool = False) -> torch.Tensor:
    """``module``'s operation on ``x`` with ``weight``/``bias`` in place of its own parameters.

    ``windowed`` runs a convolution without padding (``x`` is an already padded window, see
    :class:`ReconstructionBatches`). Raises TypeError for other module types.
    """
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, nn.ConvTranspose2d):
        output_padding = module._output_padding(x, None, module.stride, module.padding, module.kernel_size, 2, module.dilation)
        return F.conv_transpose2d(x, weight, bias, module.stride, module.padding, output_padding, module.groups, module.dilation)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if windowed:
            conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
            return conv(x, weight, bias, module.stride, 0, module.dilation, module.groups)
        return module._conv_forward(x, weight, bias)
    raise TypeError(f"layer_forward supports Conv1d, Conv2d, ConvTranspose2d and Linear, not {type(module).__name__}")


def mix_inputs(quantized: torch.Tensor, float_input: torch.Tensor, drop: float,
               generator: torch.Generator) -> torch.Tensor:
    """QDrop's mixed input: ``quantized`` with each element replaced by ``float_input``'s with
    probability ``drop`` (the mask is drawn on the CPU from ``generator``)."""
    keep_float = torch.rand(quantized.shape, generator=generator) < drop
    return torch.where(keep_float.to(quantized.device), float_input, quantized)


def can_window(module: nn.Module) -> bool:
    """True when :class:`ReconstructionBatches` can crop the layer's output (zero-padded Conv1d/2d)."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


class ReconstructionBatches:
    """Random mini-batches of one layer's cached (input, float target) pairs.

    Each :meth:`sample` picks one cached chunk uniformly at random (``generator`` makes the
    sequence reproducible). With ``crop`` and a zero-padded convolution whose output is larger
    than ``crop`` in some spatial dimension, it returns a random output window of side ``crop``
    and the padded input window that produces it; :meth:`forward` then runs the layer without
    padding, giving exactly the corresponding window of the full output. With ``activation``
    (e.g. ``layer.activation``), targets and outputs are both passed through it.

    ``input_drop`` in [0, 1] is QDrop's activation-quantization drop (Wei et al., ICLR 2022,
    "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization"):
    each element of a sampled input is replaced by the float reference's input at that position
    with this probability (a fresh mask per sample), so the rounding is fitted to a neighbourhood
    of the quantized inputs instead of exactly the calibration set's (the paper's argument: a
    flatter loss surface that carries over to unseen data). 0 gives the quantized inputs unchanged (AIMET); 1 gives the float
    inputs (``input_source="fp32"``).

    ``fit_chunks`` limits the draw to the first that many chunks (the rest are held out); None
    draws from all of them.
    """

    def __init__(self, data: LayerData, crop: int | None, generator: torch.Generator,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 input_drop: float = 0.0, fit_chunks: int | None = None) -> None:
        if not 0.0 <= input_drop <= 1.0:
            raise ValueError(f"input_drop={input_drop} must be a probability in [0, 1]")
        self.data = data
        self.fit_chunks = data.num_chunks if fit_chunks is None else fit_chunks
        self.module = data.module
        self.crop = crop
        self.generator = generator
        self.activation = activation
        self.input_drop = input_drop if data.float_input_key != data.input_key else 0.0
        self.device = data.device()
        view = data.target_view(0)
        spatial = tuple(view.shape[2:]) if len(view.shape) > 2 else ()
        self.windowed = bool(crop) and can_window(self.module) and any(size > crop for size in spatial)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of one random chunk, or of a random window of it."""
        x, y = self._window()
        return x, (self.activation(y) if self.activation is not None else y)

    def _window(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._randint(self.fit_chunks)
        mixing = self.input_drop > 0.0
        if not self.windowed:
            x, y = self.data.inputs(index), self.data.targets(index)
            return (mix_inputs(x, self.data.float_inputs(index), self.input_drop, self.generator) if mixing else x), y
        x_view, y_view = self.data.input_view(index), self.data.target_view(index)
        in_slices, out_slices, pads = self._window_slices(tuple(y_view.shape[2:]), tuple(x_view.shape[2:]))
        x = take(x_view, (slice(None), slice(None), *in_slices), self.device)
        if mixing:
            x_float = take(self.data.float_input_view(index), (slice(None), slice(None), *in_slices), self.device)
            x = mix_inputs(x, x_float, self.input_drop, self.generator)
        y = take(y_view, (slice(None), slice(None), *out_slices), self.device)
        flat_pad = [p for before_after in reversed(pads) for p in before_after]
        if any(flat_pad):
            x = F.pad(x, flat_pad)
        return x, y

    def _window_slices(self, out_shape: tuple[int, ...], in_shape: tuple[int, ...]
                       ) -> tuple[list[slice], list[slice], list[tuple[int, int]]]:
        """Input slices, output slices and (before, after) zero padding of one random output window."""
        module = self.module
        in_slices, out_slices, pads = [], [], []
        for dim, out_size in enumerate(out_shape):
            size = min(self.crop, out_size)
            start = self._randint(out_size - size + 1)
            stride, pad, dilation, kernel = (module.stride[dim], module.padding[dim],
                                             module.dilation[dim], module.kernel_size[dim])
            first = start * stride - pad
            last = (start + size - 1) * stride - pad + dilation * (kernel - 1) + 1  # exclusive
            lo, hi = max(first, 0), min(last, in_shape[dim])
            in_slices.append(slice(lo, hi))
            out_slices.append(slice(start, start + size))
            pads.append((lo - first, last - hi))
        return in_slices, out_slices, pads

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output on a sampled input with the given weights (after ``activation``)."""
        out = layer_forward(self.module, x, weight, bias, windowed=self.windowed)
        return self.activation(out) if self.activation is not None else out


@torch.no_grad()
def reconstruction_mse(data: LayerData, weight: torch.Tensor, bias: torch.Tensor | None, chunks: Sequence[int] = (0,),
                       activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean squared error between the layer's output with ``weight``/``bias`` and the float
    targets, over the cached chunks with the indices ``chunks`` (whole feature maps), both after
    ``activation`` when one is given."""
    total, count = 0.0, 0
    for index in chunks:
        out = layer_forward(data.module, data.inputs(index), weight, bias)
        target = data.targets(index)
        if activation is not None:
            out, target = activation(out), activation(target)
        total += float((out - target).double().pow(2).sum())
        count += target.numel()
    return total / max(count, 1)
