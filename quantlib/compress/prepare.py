"""Turn a float model into the form every compression pass edits: a traced, BatchNorm-folded copy.

Compression changes weights (SVD, pruning, clustering) and QuantSim later folds BatchNorm into the
preceding layer, which rescales every output channel. Folding first makes the two agree: weights
that were pruned or clustered stay exactly as compressed in the simulated and exported model
(per-layer sparsity and unique-value counts survive), and channel pruning only has to slice
conv/linear layers. In eval mode the fold is exact (Jacob et al. 2018, section 3.2).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..batchnorm_fold import fold_batch_norms
from ..graph import trace


def prepare_for_compression(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """A traced copy of ``model`` (not mutated) in eval mode, BatchNorms folded, shapes recorded on its nodes.

    ``example_input`` (one sample is enough) propagates shapes into ``node.meta["tensor_meta"]``,
    which channel pruning reads. The copy's module paths are those of ``model``.
    """
    gm = trace(copy.deepcopy(model).eval())
    fold_batch_norms(gm)
    record_shapes(gm, example_input)
    return gm


def record_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """(Re)run shape propagation on ``gm`` (its nodes' ``tensor_meta`` are mutated), without gradients."""
    device = next(gm.parameters()).device
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input.to(device))
