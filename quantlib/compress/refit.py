"""Least-squares re-fit of one conv/linear layer so the compressed model tracks the original one.

AIMET's weight reconstruction after channel pruning (He et al., "Channel Pruning for Accelerating
Very Deep Neural Networks", ICCV 2017): on calibration data, take the layer's input in the
*compressed* model and the matching layer's output in the *original* model, and solve for the
weight and bias that map one to the other. Because the inputs come from the compressed model, the
fit also absorbs the error of every earlier compressed layer. Conv inputs are unfolded into
patches and ``positions_per_image`` output positions per image are sampled (seeded). The normal
equations carry a ridge term pulling towards the current weights, ``ridge * mean(diag(A^T A))``,
so too little data degrades gracefully to no re-fit.

:func:`refit_layer` re-fits one layer (the consumer after channel pruning, or the second factor of
an SVD-factorized layer); :func:`refit_low_rank` re-fits both factors of a factorized 1x1 conv or
linear layer at once, by reduced-rank regression.
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


@dataclass
class _NormalEquations:
    """Sums over calibration rows: ``gram`` = A^T A and ``rhs`` = A^T T (A with a ones column), ||T||^2 and the row count."""

    gram: torch.Tensor
    rhs: torch.Tensor
    target_energy: float
    rows: int

    def error(self, params: torch.Tensor) -> float:
        """Relative error ||A P - T|| / ||T|| of the affine map ``params`` ([D+1, out], bias last), from the sums."""
        value = float((params * (self.gram @ params)).sum() - 2 * (params * self.rhs).sum()) + self.target_energy
        return math.sqrt(max(value, 0.0) / max(self.target_energy, 1e-30))

    def ridge(self, config: RefitConfig) -> float:
        return config.ridge * float(self.gram.diagonal().mean())


@torch.no_grad()
def _normal_equations(gm: nn.Module, original: nn.Module, input_name: str, target_name: str, geometry: nn.Module,
                      data: Iterable, config: RefitConfig) -> _NormalEquations:
    """Accumulate the least-squares sums of ``geometry``'s linear map from ``input_name``'s input in ``gm`` to
    ``target_name``'s output in ``original``, over ``config.num_batches`` calibration batches."""
    generator = torch.Generator().manual_seed(config.seed)
    gram = rhs = None
    target_energy, rows = 0.0, 0
    for inputs in _batches(data, config.num_batches):
        x = layer_tensor(gm, input_name, inputs, which="input")
        y = layer_tensor(original, target_name, inputs, which="output")
        a, t = (v.to(torch.float64) for v in _design(geometry, x, y, config.positions_per_image, generator))
        gram = a.T @ a if gram is None else gram + a.T @ a
        rhs = a.T @ t if rhs is None else rhs + a.T @ t
        target_energy += float(t.pow(2).sum())
        rows += a.shape[0]
    if gram is None:
        raise ValueError("calibration data is empty; the least-squares re-fit needs at least one batch")
    return _NormalEquations(gram, rhs, target_energy, rows)


def _affine(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[D+1, out] parameter matrix (bias last row) of a layer with ``weight`` [out, ...]."""
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return torch.cat([weight.detach().reshape(weight.shape[0], -1), bias.detach()[:, None]], 1).T.to(torch.float64)


def _set_bias(layer: nn.Module, bias: torch.Tensor) -> None:
    bias = bias.to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.clone())
    else:
        layer.bias.data.copy_(bias)


@torch.no_grad()
def refit_layer(gm: nn.Module, original: nn.Module, consumer_name: str, data: Iterable,
                config: RefitConfig = RefitConfig(), *, target_name: str | None = None) -> dict[str, float]:
    """Re-fit ``gm``'s ``consumer_name`` weight and bias (mutated) by ridge least squares; returns fit statistics.

    Targets: the output of ``target_name`` (default ``consumer_name``) in ``original`` (not mutated);
    inputs: the consumer's input in ``gm``. The consumer must be an ungrouped Conv2d or a Linear
    with as many outputs as the target. Returns ``{"samples", "relative_error_before", "relative_error_after"}`` measured on the rows used.
    """
    consumer = gm.get_submodule(consumer_name)
    sums = _normal_equations(gm, original, consumer_name, target_name or consumer_name, consumer, data, config)
    w = consumer.weight.detach()
    current = _affine(w, consumer.bias)
    eye = torch.eye(sums.gram.shape[0], dtype=sums.gram.dtype, device=sums.gram.device)
    lam = sums.ridge(config)
    solution = torch.linalg.solve(sums.gram + lam * eye, sums.rhs + lam * current)
    stats = {"samples": sums.rows, "relative_error_before": sums.error(current), "relative_error_after": sums.error(solution)}
    consumer.weight.data.copy_(solution[:-1].T.reshape(w.shape).to(w.dtype))
    _set_bias(consumer, solution[-1])
    return stats


def low_rank_eligible(layer: nn.Module) -> bool:
    """True for layers :func:`refit_low_rank` can re-fit: Linear, and ungrouped 1x1 Conv2d with stride 1 and no padding."""
    if type(layer) is nn.Linear:
        return True
    return (type(layer) is nn.Conv2d and layer.groups == 1 and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0))


@torch.no_grad()
def refit_low_rank(gm: nn.Module, original: nn.Module, name: str, data: Iterable,
                   config: RefitConfig = RefitConfig()) -> dict[str, float]:
    """Re-fit both factors of ``gm``'s factorized layer ``name`` (``nn.Sequential(first, second)``, mutated) by reduced-rank regression.

    Data-aware low-rank approximation (Zhang et al., "Accelerating Very Deep Convolutional Networks
    for Classification and Detection", TPAMI 2016, section 3.3, the asymmetric reconstruction):
    with X the layer's input in ``gm`` and Y the uncompressed layer's output in ``original`` (both
    centred), the rank-k map minimising ||X W - Y|| is the ridge least-squares solution W projected
    onto the top-k principal directions V_k of its predictions X W (Reinsel and Velu, *Multivariate
    Reduced-Rank Regression*, 1998). The first factor becomes (W V_k)^T, the second V_k with the bias
    mean(Y) - mean(X) W V_k V_k^T. ``original``'s ``name`` must satisfy :func:`low_rank_eligible`.
    Returns ``{"samples", "relative_error_before", "relative_error_after"}`` on the rows used.
    """
    target = original.get_submodule(name)
    if not low_rank_eligible(target):
        raise ValueError(f"{name!r} ({type(target).__name__}) cannot be re-fit as a low-rank pair; only Linear and 1x1 "
                         "stride-1 unpadded Conv2d can (use the second-factor re-fit)")
    first, second = gm.get_submodule(f"{name}.0"), gm.get_submodule(f"{name}.1")
    rank = first.weight.shape[0]
    sums = _normal_equations(gm, original, f"{name}.0", name, target, data, config)
    n = float(sums.rows)
    mean_x, mean_y = sums.gram[-1, :-1] / n, sums.rhs[-1] / n
    gxx = sums.gram[:-1, :-1] - n * torch.outer(mean_x, mean_x)
    gxy = sums.rhs[:-1] - n * torch.outer(mean_x, mean_y)
    current = _affine(target.weight, target.bias)
    eye = torch.eye(gxx.shape[0], dtype=gxx.dtype, device=gxx.device)
    lam = config.ridge * float(gxx.diagonal().mean())
    w_ls = torch.linalg.solve(gxx + lam * eye, gxy + lam * current[:-1])  # [D, out]
    _, vectors = torch.linalg.eigh(w_ls.T @ gxx @ w_ls)  # ascending eigenvalues of the predictions' scatter
    v_k = vectors[:, -rank:]  # [out, k]
    down = w_ls @ v_k  # [D, k]
    bias = mean_y - mean_x @ down @ v_k.T
    before = _affine(second.weight.reshape(second.weight.shape[0], -1) @ first.weight.reshape(rank, -1), second.bias)
    after = torch.cat([down @ v_k.T, bias[None]], 0)
    stats = {"samples": sums.rows, "relative_error_before": sums.error(before), "relative_error_after": sums.error(after)}
    first.weight.data.copy_(down.T.reshape(first.weight.shape).to(first.weight.dtype))
    second.weight.data.copy_(v_k.reshape(second.weight.shape).to(second.weight.dtype))
    _set_bias(second, bias)
    return stats
