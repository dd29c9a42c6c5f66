"""Weight clustering (k-means weight sharing) per layer.

Han et al., "Deep Compression" (ICLR 2016), as TFMOT's ``cluster_weights``: each layer's weights
are replaced by the nearest of ``clusters`` centroids found by 1-D k-means (scikit-learn's
``KMeans``, k-means++ initialisation, seeded), so the layer holds at most ``clusters`` distinct
values. With ``preserve_zeros`` (TFMOT's sparsity-preserving clustering), weights that are exactly
zero stay zero and count as one of the values: the non-zero weights get ``clusters - 1`` centroids,
so a pruned-then-clustered layer still has at most ``clusters`` unique values. A layer that already
has no more unique values than that is left alone.

For large layers k-means is fitted on ``max_fit_samples`` weights drawn without replacement
(seeded), then every weight is assigned to its nearest centroid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from .sparsity import sparsity_layers


@torch.no_grad()
def cluster_tensor(weight: torch.Tensor, clusters: int, *, preserve_zeros: bool = True, seed: int = 0,
                   max_fit_samples: int = 100_000) -> torch.Tensor:
    """``weight`` (not mutated) with each entry replaced by its k-means centroid; a new tensor."""
    if clusters < 2:
        raise ValueError(f"clusters={clusters} must be >= 2")
    values = weight.detach().cpu().to(torch.float64).reshape(-1).numpy()
    zero = values == 0 if preserve_zeros else np.zeros(values.shape, dtype=bool)
    k = clusters - 1 if preserve_zeros and zero.any() else clusters
    free = values[~zero]
    if np.unique(free).size <= k:
        return weight.detach().clone()
    rng = np.random.default_rng(seed)
    fit = free if free.size <= max_fit_samples else rng.choice(free, max_fit_samples, replace=False)
    kmeans = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed).fit(fit.reshape(-1, 1))
    centroids = kmeans.cluster_centers_.reshape(-1)
    out = np.zeros_like(values)
    out[~zero] = centroids[kmeans.predict(free.reshape(-1, 1))]
    return torch.from_numpy(out).to(dtype=weight.dtype, device=weight.device).view(weight.shape)


@torch.no_grad()
def cluster_weights(model: nn.Module, clusters: int, *, preserve_zeros: bool = True, seed: int = 0,
                    include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> dict[str, int]:
    """Cluster the matching conv/linear layers of ``model`` (weights mutated); returns layer -> unique values after."""
    unique = {}
    for name, module in sparsity_layers(model, include, exclude).items():
        module.weight.copy_(cluster_tensor(module.weight, clusters, preserve_zeros=preserve_zeros, seed=seed))
        unique[name] = int(torch.unique(module.weight).numel())
    return unique
