"""Per-element loss weights for block reconstruction from the float model's output Fisher.

A block's rounding error ``d`` at its output changes the model's prediction by
``KL(p(z) || p(z + d)) ~ 1/2 d^T F d``, where ``F`` is the Fisher information of the model's
predictive distribution with respect to the block output ``z``:
``F = E_{y ~ p(y|x)}[g_y g_y^T]`` with ``g_y = d(-log p(y|x))/dz``. BRECQ (Li et al., ICLR 2021,
section 3.3) weights the block's squared error by the diagonal of such a Fisher matrix, so the
elements that move the prediction count more than those the rest of the network ignores.

:func:`output_fisher_weights` estimates the diagonal, per sample and element, on the float
model: ``label_samples`` labels are drawn for each sample from the model's own softmax (the true
Fisher, which needs no labels, rather than the empirical one with dataset labels), each one's
gradient is taken with respect to every requested node's output, and their squares are averaged.
A node's weights are then ``1 + F / mean(F)``, the mean over all its cached elements: on average
half of a block's loss stays plain MSE (as BRECQ's ``(1 + |g|)^2`` keeps a unit floor), so an
element the prediction ignores still counts once and the loss scale does not depend on the block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx


class _ProbedInterpreter(fx.Interpreter):
    """Runs a GraphModule and adds a zero tensor that requires grad to the outputs of the probed
    nodes: the gradient of a loss with respect to that zero tensor is the gradient with respect
    to the node's output, and the values that flow on are unchanged."""

    def __init__(self, gm: fx.GraphModule, probed: set[str]) -> None:
        super().__init__(gm)
        self.probed = probed
        self.probes: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.probed:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise ValueError(f"node {n.name} does not output a float tensor; its Fisher weights are undefined")
            probe = torch.zeros_like(out, requires_grad=True)
            self.probes[n.name] = probe
            out = out + probe
        return out


def output_fisher_weights(model: fx.GraphModule, chunks: Sequence[torch.Tensor], nodes: Sequence[str],
                          label_samples: int, generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
    """Loss weights ``1 + F / mean(F)`` for the outputs of ``nodes`` (fx node names of ``model``),
    one tensor per input chunk shaped like the node's output on it.

    Args:
        model: the float model (eval mode); its output must be class logits ``(batch, classes)``.
        chunks: input batches, as the reconstruction pass caches them.
        nodes: names of the nodes whose outputs are weighted.
        label_samples: labels drawn per sample from the model's softmax (>= 1).
        generator: draws the labels (CPU generator).

    Raises ValueError for an unknown node name, a node whose output is not a float tensor, or a
    model output that is not 2-D logits. The model's parameters are left as they were.
    """
    if label_samples < 1:
        raise ValueError(f"label_samples={label_samples} must be >= 1")
    known = {n.name for n in model.graph.nodes}
    missing = [name for name in nodes if name not in known]
    if missing:
        raise ValueError(f"node {missing[0]!r} is not in the model graph")
    fisher: dict[str, list[torch.Tensor]] = {name: [] for name in nodes}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            for chunk in chunks:
                interpreter = _ProbedInterpreter(model, set(nodes))
                logits = interpreter.run(chunk.clone())
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise ValueError("output Fisher weights need a model that returns (batch, classes) logits")
                probes = [interpreter.probes[name] for name in nodes]
                probs = logits.detach().float().softmax(1).cpu()
                sums = [torch.zeros_like(p) for p in probes]
                for draw in range(label_samples):
                    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
                    loss = F.cross_entropy(logits, labels, reduction="sum")  # per-sample gradients stay separate
                    grads = torch.autograd.grad(loss, probes, retain_graph=draw < label_samples - 1)
                    for total, grad in zip(sums, grads):
                        total.add_(grad.detach().pow(2))
                for name, total in zip(nodes, sums):
                    fisher[name].append(total / label_samples)
    finally:
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)
    weights = {}
    for name, pieces in fisher.items():
        mean = sum(float(piece.double().sum()) for piece in pieces) / max(sum(piece.numel() for piece in pieces), 1)
        weights[name] = [1.0 + piece / mean if mean > 0 else torch.ones_like(piece) for piece in pieces]
    return weights
