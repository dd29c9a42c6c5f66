"""Least-squares re-fit of one conv/linear layer so the compressed model tracks the original one.

AIMET's weight reconstruction after channel pruning (He et al., "Channel Pruning for Accelerating
Very Deep Neural Networks", ICCV 2017): on calibration data, take the layer's input in the
*compressed* model and the matching layer's output in the *original* model, and solve for the
weight and bias that map one to the other. Because the inputs come from the compressed model, the
fit also absorbs the error of every earlier compressed layer. Conv inputs are unfolded into
patches and ``positions_per_image`` output positions per image are sampled (seeded). The normal
equations carry a ridge term pulling towards the current weights, ``ridge * mean(diag(A^T A))``,
so too little data degrades gracefully to no re-fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .capture import batch_inputs, layer_tensor


@dataclass(frozen=True)
class RefitConfig:
    """Sampling and regularisation of :func:`refit_layer`; ``num_batches``: calibration batches used (None: all)."""

    positions_per_image: int = 16
    ridge: float = 1e-3
    num_batches: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.positions_per_image < 1:
            raise ValueError(f"positions_per_image={self.positions_per_image} must be >= 1")
        if self.ridge < 0:
            raise ValueError(f"ridge={self.ridge} must be >= 0")


def _batches(data: Iterable, num_batches: int | None):
    for index, batch in enumerate(data):
        if num_batches is not None and index >= num_batches:
            return
        yield batch_inputs(batch)


def _design(consumer: nn.Module, x: torch.Tensor, y: torch.Tensor, positions: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [P, D+1] with a ones column, Y [P, out]) rows of the consumer's linear map on sampled positions."""
    if isinstance(consumer, nn.Linear):
        a, t = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    else:
        cols = F.unfold(x, consumer.kernel_size, dilation=consumer.dilation, padding=consumer.padding, stride=consumer.stride)
        out = y.flatten(2)  # [B, n, L], same position order as unfold's L
        length = cols.shape[-1]
        take = min(positions, length)
        index = torch.stack([torch.randperm(length, generator=generator)[:take] for _ in range(x.shape[0])]).to(x.device)
        a = torch.gather(cols, 2, index[:, None, :].expand(-1, cols.shape[1], -1)).transpose(1, 2).reshape(-1, cols.shape[1])
        t = torch.gather(out, 2, index[:, None, :].expand(-1, out.shape[1], -1)).transpose(1, 2).reshape(-1, out.shape[1])
    ones = torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)
    return torch.cat([a, ones], 1), t


@torch.no_grad()
def refit_layer(gm: nn.Module, original: nn.Module, consumer_name: str, data: Iterable,
                config: RefitConfig = RefitConfig(), *, target_name: str | None = None) -> dict[str, float]:
    """Re-fit ``gm``'s ``consumer_name`` weight and bias (mutated) by ridge least squares; returns fit statistics.

    Targets: the output of ``target_name`` (default ``consumer_name``) in ``original`` (not mutated);
    inputs: the consumer's input in ``gm``. The consumer must be an ungrouped Conv2d or a Linear
    with as many outputs as the target. Returns ``{"samples", "relative_error_before", "relative_error_after"}`` measured on the rows used.
    """
    consumer = gm.get_submodule(consumer_name)
    generator = torch.Generator().manual_seed(config.seed)
    gram = rhs = None
    target_energy = 0.0
    rows = 0
    for inputs in _batches(data, config.num_batches):
        x = layer_tensor(gm, consumer_name, inputs, which="input")
        y = layer_tensor(original, target_name or consumer_name, inputs, which="output")
        a, t = (v.to(torch.float64) for v in _design(consumer, x, y, config.positions_per_image, generator))
        gram = a.T @ a if gram is None else gram + a.T @ a
        rhs = a.T @ t if rhs is None else rhs + a.T @ t
        target_energy += float(t.pow(2).sum())
        rows += a.shape[0]
    if gram is None:
        raise ValueError("calibration data is empty; the least-squares re-fit needs at least one batch")
    w = consumer.weight.detach()
    bias = consumer.bias.detach() if consumer.bias is not None else torch.zeros(w.shape[0], device=w.device)
    current = torch.cat([w.reshape(w.shape[0], -1), bias[:, None]], 1).T.to(torch.float64)  # [D+1, out]
    lam = config.ridge * float(gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + lam * eye, rhs + lam * current)

    def error(params: torch.Tensor) -> float:  # ||A P - T||^2 from the normal-equation sums
        value = float((params * (gram @ params)).sum() - 2 * (params * rhs).sum()) + target_energy
        return math.sqrt(max(value, 0.0) / max(target_energy, 1e-30))

    stats = {"samples": rows, "relative_error_before": error(current), "relative_error_after": error(solution)}
    new_weight = solution[:-1].T.reshape(w.shape).to(w.dtype)
    consumer.weight.data.copy_(new_weight)
    new_bias = solution[-1].to(w.dtype)
    if consumer.bias is None:
        consumer.bias = nn.Parameter(new_bias.clone())
    else:
        consumer.bias.data.copy_(new_bias)
    return stats
