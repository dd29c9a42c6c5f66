"""Observers: calibrate a quantizer's range from the tensors it sees.

Every observer reduces a batch to a per-group range ``(min, max)`` (groups as in
:func:`quantlib.affine.group_view`), and combines the per-batch ranges across batches with the
spec's ``combine`` rule: ``max`` (union of ranges), ``mean``, ``median`` or ``mode`` (the densest
bin of a histogram of the per-batch values). ``moving_average_minmax`` uses an exponential moving
average instead.

Methods:
    minmax: the batch's min and max.
    moving_average_minmax: EMA of batch min/max (``momentum`` is the weight of the running value).
    percentile: the (100-p)th and p-th percentiles of the batch.
    entropy: the clipping threshold whose quantized histogram has the least KL divergence from
        the float histogram (the TensorRT calibration method, Migacz 2017).
    mse: the clipping range with the least expected quantization MSE, searched over
        ``num_candidates`` shrinkages of the min/max range (exact on the data for small tensors such
        as weights, so per-channel weights get a per-channel optimum; on a histogram otherwise).
"""

from __future__ import annotations

import torch

from .affine import compute_qparams, fake_quantize, group_view
from .spec import QuantizerSpec

# Tensors with more elements than this use histogram statistics in the mse/entropy observers.
_EXACT_SEARCH_LIMIT = 1 << 18


class Observer:
    """Base class. Subclasses implement :meth:`batch_range`; this class combines batches."""

    def __init__(self, spec: QuantizerSpec) -> None:
        self.spec = spec
        self.reset()

    def reset(self) -> None:
        """Forget everything observed."""
        self._running: tuple[torch.Tensor, torch.Tensor] | None = None
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Observe one batch (no gradient, input not mutated)."""
        grouped = group_view(x.detach().float(), self.spec)
        batch_min, batch_max = self.batch_range(grouped)
        self.num_batches += 1
        if self.spec.observer.combine == "max":
            if self._running is None:
                self._running = (batch_min, batch_max)
            else:
                self._running = (torch.minimum(self._running[0], batch_min), torch.maximum(self._running[1], batch_max))
        else:
            self._history.append((batch_min, batch_max))

    def batch_range(self, grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (min, max) of one batch given as ``[groups, elements]``."""
        raise NotImplementedError

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The combined per-group range. Raises RuntimeError when nothing was observed."""
        if self._running is not None:
            return self._running
        if not self._history:
            raise RuntimeError("observer has seen no data; run calibration with at least one batch")
        mins = torch.stack([m for m, _ in self._history])
        maxs = torch.stack([m for _, m in self._history])
        combine = self.spec.observer.combine
        if combine == "mean":
            return mins.mean(0), maxs.mean(0)
        if combine == "median":
            return mins.median(0).values, maxs.median(0).values
        return _histogram_mode(mins), _histogram_mode(maxs)


def _histogram_mode(values: torch.Tensor) -> torch.Tensor:
    """Per-column mode of ``[batches, groups]`` continuous values: the mean of the densest bin.

    The bin count is ceil(sqrt(batches)), the usual square-root rule.
    """
    batches = values.shape[0]
    bins = max(1, int(batches**0.5 + 0.999))
    lo, hi = values.min(0).values, values.max(0).values
    width = (hi - lo).clamp_min(1e-12) / bins
    index = ((values - lo) / width).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(bins, values.shape[1]).scatter_add_(0, index, torch.ones_like(values))
    best = counts.argmax(0)
    in_best = (index == best).float()
    return (values * in_best).sum(0) / in_best.sum(0)


class MinMaxObserver(Observer):
    """Range = the batch's min and max."""

    def batch_range(self, grouped):
        return torch.aminmax(grouped, dim=1)


class MovingAverageMinMaxObserver(Observer):
    """Range = exponential moving average of batch min/max (combine is ignored)."""

    def update(self, x: torch.Tensor) -> None:
        grouped = group_view(x.detach().float(), self.spec)
        batch_min, batch_max = torch.aminmax(grouped, dim=1)
        self.num_batches += 1
        if self._running is None:
            self._running = (batch_min, batch_max)
            return
        m = self.spec.observer.momentum
        self._running = (m * self._running[0] + (1 - m) * batch_min, m * self._running[1] + (1 - m) * batch_max)


class PercentileObserver(Observer):
    """Range = [(100 - p)th percentile, p-th percentile] of the batch."""

    def batch_range(self, grouped):
        n = grouped.shape[1]
        p = self.spec.observer.percentile / 100.0
        high_k = min(n, max(1, int(round(p * (n - 1))) + 1))
        low_k = max(1, min(n, n + 1 - high_k))
        return grouped.kthvalue(low_k, dim=1).values, grouped.kthvalue(high_k, dim=1).values


def _histogram(row: torch.Tensor, num_bins: int, lo: float, hi: float) -> torch.Tensor:
    return torch.histc(row, bins=num_bins, min=lo, max=hi if hi > lo else lo + 1e-8)


class EntropyObserver(Observer):
    """Range from the KL-optimal clipping threshold (TensorRT-style entropy calibration).

    Non-negative data (e.g. after ReLU) is thresholded on ``[0, max]`` with 2^b levels; data with
    both signs on ``|x|`` with 2^(b-1) levels, giving a symmetric threshold intersected with the
    observed range.
    """

    def batch_range(self, grouped):
        mins, maxs = torch.aminmax(grouped, dim=1)
        out_min, out_max = mins.clone(), maxs.clone()
        for g in range(grouped.shape[0]):
            lo, hi = float(mins[g]), float(maxs[g])
            non_negative = lo >= 0
            values = grouped[g] if non_negative else grouped[g].abs()
            top = hi if non_negative else max(-lo, hi)
            if top <= 0:
                continue
            levels = 2**self.spec.bitwidth if non_negative else 2 ** (self.spec.bitwidth - 1)
            hist = _histogram(values, self.spec.observer.num_bins, 0.0, top)
            threshold = _kl_threshold(hist, top, levels)
            out_max[g] = min(hi, threshold)
            if not non_negative:
                out_min[g] = max(lo, -threshold)
        return out_min, out_max


def _kl_threshold(hist: torch.Tensor, top: float, levels: int) -> float:
    """Threshold (in data units) minimising KL(P || Q) over candidate bin cut-offs."""
    num_bins = hist.numel()
    hist = hist.double()
    if levels >= num_bins:
        return top
    candidates = torch.unique(torch.linspace(levels, num_bins, steps=min(128, num_bins - levels + 1)).round().long())
    best_kl, best_cut = float("inf"), num_bins
    for cut in candidates.tolist():
        p = hist[:cut].clone()
        p[cut - 1] += hist[cut:].sum()
        # merge the cut bins into `levels` quantization bins, then spread each back over its non-empty bins
        edges = torch.linspace(0, cut, levels + 1).round().long()
        index = torch.bucketize(torch.arange(cut), edges[1:], right=True).clamp(max=levels - 1)
        nonzero = (hist[:cut] > 0).double()
        merged = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, index, hist[:cut])
        support = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, index, nonzero)
        q = torch.where(nonzero > 0, merged[index] / support[index].clamp_min(1), torch.zeros_like(p))
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum <= 0 or q_sum <= 0:
            continue
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum())
        if kl < best_kl:
            best_kl, best_cut = kl, cut
    return top * best_cut / num_bins


class MSEObserver(Observer):
    """Range with the least quantization MSE among shrinkages alpha * (min, max), alpha in (0, 1]."""

    def batch_range(self, grouped):
        mins, maxs = torch.aminmax(grouped, dim=1)
        alphas = torch.linspace(1.0 / self.spec.observer.num_candidates, 1.0, self.spec.observer.num_candidates)
        if grouped.numel() <= _EXACT_SEARCH_LIMIT:
            errors = self._exact_errors(grouped, mins, maxs, alphas)
        else:
            errors = self._histogram_errors(grouped, mins, maxs, alphas)
        best = errors.argmin(0)  # [groups]
        best_alpha = alphas[best]
        return mins * best_alpha, maxs * best_alpha

    def _candidate_spec(self) -> QuantizerSpec:
        # the candidates are scored per group on the flattened [groups, elements] view
        granularity = "per_tensor" if self.spec.granularity == "per_tensor" else "per_channel"
        return self.spec.replace(granularity=granularity, axis=0, rounding="half_even")

    def _exact_errors(self, grouped, mins, maxs, alphas):
        spec = self._candidate_spec()
        errors = []
        for alpha in alphas.tolist():
            scale, zero_point = compute_qparams(mins * alpha, maxs * alpha, spec)
            if spec.granularity == "per_tensor":
                scale, zero_point = scale.reshape(1), zero_point.reshape(1)
            err = (fake_quantize(grouped, scale, zero_point, spec) - grouped).pow(2).mean(1)
            errors.append(err)
        return torch.stack(errors)  # [candidates, groups]

    def _histogram_errors(self, grouped, mins, maxs, alphas):
        spec = self._candidate_spec()
        num_bins = self.spec.observer.num_bins
        errors = torch.empty(len(alphas), grouped.shape[0])
        for g in range(grouped.shape[0]):
            lo, hi = float(mins[g]), float(maxs[g])
            hist = _histogram(grouped[g], num_bins, lo, hi).double()
            width = (hi - lo) / num_bins if hi > lo else 1e-8
            centers = (lo + width * (torch.arange(num_bins, dtype=torch.float64) + 0.5)).float()
            for i, alpha in enumerate(alphas.tolist()):
                scale, zero_point = compute_qparams(torch.tensor([lo * alpha]), torch.tensor([hi * alpha]), spec)
                qc = fake_quantize(centers, scale.reshape(()), zero_point.reshape(()),
                                   spec.replace(granularity="per_tensor"))
                errors[i, g] = float(((qc.double() - centers.double()) ** 2 * hist).sum() / hist.sum().clamp_min(1))
        return errors


def build_observer(spec: QuantizerSpec) -> Observer:
    """The observer named by ``spec.observer.name``, configured by ``spec``."""
    classes = {
        "minmax": MinMaxObserver,
        "moving_average_minmax": MovingAverageMinMaxObserver,
        "percentile": PercentileObserver,
        "entropy": EntropyObserver,
        "mse": MSEObserver,
    }
    return classes[spec.observer.name](spec)
