"""Keep sparsity and weight clusters intact while a model is fine-tuned (PQAT, CQAT, PCQAT).

TensorFlow Model Optimization's collaborative optimization ("prune -> cluster -> quantize",
https://www.tensorflow.org/model_optimization/guide/combine/collaborative_optimization) trains a
pruned and/or clustered model without losing that structure: sparsity-preserving QAT keeps the
zeros at zero, cluster-preserving QAT keeps each weight in its cluster and trains the cluster
centroids, and PCQAT does both. Here that is a projection applied after every optimizer step:

* ``"sparsity"``: weights that were exactly zero when the hook was recorded are set back to zero;
* ``"clusters"``: every weight keeps the cluster (the unique value) it had when recorded; after a
  step each cluster is replaced by the mean of its members' updated values, which is the centroid
  update of TFMOT's CQAT (the gradient of a shared centroid is the sum of its members' gradients;
  with plain SGD the mean of the members' steps is that step divided by the member count). The
  cluster of the value 0 stays at exactly 0, so clustering that kept zeros at zero also keeps the
  sparsity. Distinct centroids that collide after an update are a float coincidence, not a design
  case; :func:`structure_counts` reports the counts so tests and run records can check them.

Layers are matched by qualified module name, so a hook recorded on a QuantSim's model (or on the
FP32 model it was built from, which has the same names) can be applied to either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .layers import layer_by_name, weight_layers

PRESERVE_KINDS = ("sparsity", "clusters")


@dataclass(frozen=True)
class _LayerStructure:
    """What one layer must keep: its zero mask and/or its cluster labels (CPU tensors)."""

    keep: torch.Tensor | None  # bool, True where the weight may be non-zero
    labels: torch.Tensor | None  # int64, cluster index of every weight (flattened)
    num_clusters: int
    zero_cluster: int | None  # the label of the value 0.0, pinned at 0


def _check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    kinds = frozenset(kinds)
    unknown = sorted(kinds - set(PRESERVE_KINDS))
    if unknown:
        raise ValueError(f"preserve kind {unknown[0]!r} is not supported; use a subset of {list(PRESERVE_KINDS)}")
    return kinds


@torch.no_grad()
def _record(weight: torch.Tensor, kinds: frozenset[str]) -> _LayerStructure | None:
    w = weight.detach().cpu()
    keep = labels = zero_cluster = None
    num_clusters = 0
    if "sparsity" in kinds:
        mask = w != 0
        keep = None if bool(mask.all()) else mask
    if "clusters" in kinds:
        values, inverse = torch.unique(w.flatten(), return_inverse=True)
        labels, num_clusters = inverse, int(values.numel())
        zeros = (values == 0).nonzero()
        zero_cluster = int(zeros[0, 0]) if zeros.numel() else None
    if keep is None and labels is None:
        return None
    return _LayerStructure(keep, labels, num_clusters, zero_cluster)


@torch.no_grad()
def _project(weight: torch.Tensor, structure: _LayerStructure) -> None:
    w = weight.data
    flat = w.reshape(-1)  # logical order, as recorded (also for channels-last weights)
    if structure.labels is not None:
        labels = structure.labels.to(w.device)
        sums = torch.zeros(structure.num_clusters, dtype=torch.float64, device=w.device)
        sums.index_add_(0, labels, flat.to(torch.float64))
        counts = torch.bincount(labels, minlength=structure.num_clusters).to(torch.float64)
        centroids = (sums / counts).to(w.dtype)
        if structure.zero_cluster is not None:
            centroids[structure.zero_cluster] = 0
        flat = centroids[labels]
    if structure.keep is not None:
        flat = flat * structure.keep.to(w.device).reshape(-1)
    w.copy_(flat.view(w.shape))


def structure_preserver(model: nn.Module, kinds: Iterable[str]) -> Callable[[nn.Module, int], None]:
    """Record the structure of ``model``'s conv/linear weights now; return ``hook(model, step)`` restoring it.

    Args:
        model: an FP32 model or a QuantSim's ``sim.model`` (not mutated). Every Conv/ConvTranspose/
            Linear module is recorded by qualified name.
        kinds: a subset of ``{"sparsity", "clusters"}``; empty gives a hook that does nothing.

    Returns:
        ``hook(model, global_step)``, meant for the QAT trainer's ``step_hooks`` (called after every
        optimizer step). It mutates the weights of the recorded layers of the ``model`` it is given
        in place (projection described in the module docstring) and returns None; a recorded layer
        missing from that model raises KeyError naming it. ``global_step`` is not used: the
        projection is the same at every step.
    """
    kinds = _check_kinds(kinds)
    structures: dict[str, _LayerStructure] = {}
    if kinds:
        for name, module in weight_layers(model).items():
            structure = _record(module.weight, kinds)
            if structure is not None:
                structures[name] = structure

    def hook(target: nn.Module, global_step: int) -> None:
        for name, structure in structures.items():
            _project(layer_by_name(target, name).weight, structure)

    return hook


@torch.no_grad()
def structure_counts(model: nn.Module) -> dict[str, dict[str, float | int]]:
    """Per conv/linear layer of ``model`` (not mutated): ``zeros``, ``numel``, ``sparsity`` and ``unique`` values."""
    counts = {}
    for name, module in weight_layers(model).items():
        w = module.weight.detach()
        zeros = int((w == 0).sum())
        counts[name] = {"zeros": zeros, "numel": w.numel(), "sparsity": zeros / w.numel(),
                        "unique": int(torch.unique(w).numel())}
    return counts
