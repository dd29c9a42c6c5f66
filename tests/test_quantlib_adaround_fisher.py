"""BRECQ's Fisher-weighted block loss (``fisher_samples``): the weights estimate the diagonal
output Fisher of the float model, and block AdaRound optimizes the weighted error with them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import quantlib.ptq.layerwise as layerwise
from quantlib.ptq.adaround import apply_adaround
from quantlib.ptq.output_fisher import output_fisher_weights
from quantlib.ptq.pass_config import PassConfigError
from quantlib_reconstruction_helpers import FAST, calibrated_sim
from test_quantlib_ptq_qdrop_and_blocks import residual_net

BLOCKS = {**FAST, "num_samples": 256, "batch_size": 64, "num_iterations": 60, "crop": None, "reconstruct": "block"}


def _mlp() -> fx.GraphModule:
    torch.manual_seed(0)
    return fx.symbolic_trace(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).eval())


def _node(gm: fx.GraphModule, target: str) -> str:
    return next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _exact_fisher(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (d log p_c / dz)^2 at the Tanh output z, one class at a time."""
    hidden = torch.tanh(gm.get_submodule("0")(x)).detach().requires_grad_(True)
    log_probs = gm.get_submodule("2")(hidden).log_softmax(1)
    fisher = torch.zeros_like(hidden)
    for c in range(log_probs.shape[1]):
        (grad,) = torch.autograd.grad(log_probs[:, c].sum(), hidden, retain_graph=True)
        fisher += log_probs[:, c].exp().detach().unsqueeze(1) * grad.pow(2)
    return fisher


def test_weights_estimate_one_plus_the_normalized_diagonal_output_fisher():
    gm = _mlp()
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    node = _node(gm, "1")
    (weights,) = output_fisher_weights(gm, [x], [node], 4000, torch.Generator().manual_seed(0))[node]
    exact = _exact_fisher(gm, x)
    expected = 1.0 + exact / exact.mean()
    assert weights.shape == x[:, :1].expand(-1, 6).shape
    assert float(weights.mean()) == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(weights, expected, atol=0.06), float((weights - expected).abs().max())
    assert not any(p.requires_grad is False for p in gm.parameters())  # left as they were


def test_an_output_the_prediction_ignores_gets_weight_one():
    gm = _mlp()
    with torch.no_grad():
        gm.get_submodule("2").weight[:, 0] = 0.0  # the head never reads hidden unit 0
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(4))
    chunks = list(x.split(16))
    node = _node(gm, "1")
    weights = output_fisher_weights(gm, chunks, [node], 4, torch.Generator().manual_seed(0))[node]
    assert len(weights) == 4
    stacked = torch.cat(weights)
    assert torch.equal(stacked[:, 0], torch.ones(64))
    assert float(stacked[:, 1:].mean()) > 2.0
    assert float(stacked.mean()) == pytest.approx(2.0, rel=1e-5)


def test_bad_arguments_are_named():
    gm = _mlp()
    with pytest.raises(ValueError, match="label_samples=0"):
        output_fisher_weights(gm, [torch.zeros(2, 4)], [_node(gm, "1")], 0, torch.Generator())
    with pytest.raises(ValueError, match="'nope' is not in the model graph"):
        output_fisher_weights(gm, [torch.zeros(2, 4)], ["nope"], 1, torch.Generator())


def _block_codes(sim) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().clone() for name, module in sim.weight_modules().items()}


def test_block_adaround_optimizes_the_fisher_weighted_error(monkeypatch):
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    base = calibrated_sim(residual_net(), x, weight_bits=4, activation_bits=8)
    plain, fisher, unit = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    plain_blocks = apply_adaround(plain, [x], BLOCKS, progress=False).layers
    fisher_blocks = apply_adaround(fisher, [x], {**BLOCKS, "fisher_samples": 4}, progress=False).layers

    # the weighted error is what is optimized and reported: every weight is >= 1, so on the first
    # block (the same inputs in both runs) it is above the plain MSE
    assert fisher_blocks[0].mse_nearest > plain_blocks[0].mse_nearest
    assert any(f.mse_adaround < f.mse_nearest for f in fisher_blocks)
    assert _block_codes(fisher).keys() == _block_codes(plain).keys()
    assert any(not torch.equal(a, b) for a, b in zip(_block_codes(fisher).values(), _block_codes(plain).values()))

    def unit_weights(model, chunks, nodes, label_samples, generator):
        return {name: [torch.ones_like(out) for out in _outputs(model, chunks, name)] for name in nodes}

    monkeypatch.setattr(layerwise, "output_fisher_weights", unit_weights)
    unit_blocks = apply_adaround(unit, [x], {**BLOCKS, "fisher_samples": 4}, progress=False).layers
    for u, p in zip(unit_blocks, plain_blocks):  # all-ones weights are the plain loss
        assert u.mse_adaround == pytest.approx(p.mse_adaround, rel=1e-6), u.name
    for a, b in zip(_block_codes(unit).values(), _block_codes(plain).values()):
        assert torch.equal(a, b)


def _outputs(model: fx.GraphModule, chunks, name: str) -> list[torch.Tensor]:
    captured = []

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == name:
                captured.append(out)
            return out

    with torch.no_grad():
        for chunk in chunks:
            Capture(model).run(chunk)
    return captured


def test_fisher_samples_needs_block_reconstruction():
    with pytest.raises(PassConfigError, match="fisher_samples=4 weights a block's output error; it needs reconstruct='block'"):
        apply_adaround(calibrated_sim(residual_net(), torch.randn(8, 3, 8, 8), 4, 8), [torch.randn(8, 3, 8, 8)],
                       {**BLOCKS, "reconstruct": "layer", "fisher_samples": 4}, progress=False)
    with pytest.raises(PassConfigError, match="fisher_samples"):
        apply_adaround(calibrated_sim(residual_net(), torch.randn(8, 3, 8, 8), 4, 8), [torch.randn(8, 3, 8, 8)],
                       {**BLOCKS, "fisher_samples": -1}, progress=False)
