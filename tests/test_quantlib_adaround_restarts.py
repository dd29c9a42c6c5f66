"""AdaRound ``restarts``: several passes with different seeds, the one whose logits are closest to
FP32 on the held-out calibration samples is kept."""

from __future__ import annotations

import copy

import pytest
import torch

from quantlib.ptq.adaround import apply_adaround
from quantlib.ptq.pass_config import PassConfigError
from quantlib.ptq.quantizer_groups import fp32_reference
from quantlib.ptq.weight_freeze import is_frozen, weight_codes
from quantlib.qat.losses import distillation_loss
from quantlib_reconstruction_helpers import FAST, calibrated_sim
from test_quantlib_ptq_qdrop_and_blocks import residual_net

SETTINGS = {**FAST, "num_iterations": 40, "num_samples": 256, "batch_size": 32, "crop": None,
            "reconstruct": "block", "holdout_chunks": 2}


def _codes(sim) -> dict[str, torch.Tensor]:
    return {name: weight_codes(module) for name, module in sim.weight_modules().items()}


def test_the_run_with_the_lowest_held_out_kl_is_kept():
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    base = calibrated_sim(residual_net(), x, weight_bits=4, activation_bits=8)
    sim = copy.deepcopy(base)
    result = apply_adaround(sim, [x], {**SETTINGS, "restarts": 3, "seed": 5}, progress=False)

    assert [entry["seed"] for entry in result.restarts] == [5, 6, 7]
    kls = [entry["holdout_kl"] for entry in result.restarts]
    assert len(set(kls)) == 3  # the seeds give different roundings
    assert result.selected_restart == kls.index(min(kls))
    with torch.no_grad():
        kept = float(distillation_loss(sim.model(x[192:]), fp32_reference(sim)(x[192:]), 1.0))
    assert kept == pytest.approx(min(kls), rel=1e-5)
    # the same codes as a single pass with the selected seed, frozen like one
    single = copy.deepcopy(base)
    apply_adaround(single, [x], {**SETTINGS, "seed": 5 + result.selected_restart}, progress=False)
    for name, codes in _codes(single).items():
        assert torch.equal(codes, _codes(sim)[name]), name
        assert is_frozen(sim.weight_modules()[name].weight_quantizer)
    summary = result.summary()
    assert summary["restarts"] == result.restarts and summary["selected_restart"] == result.selected_restart


def test_restarts_need_held_out_chunks():
    with pytest.raises(PassConfigError, match="restarts=3 picks a run on held-out chunks, and holdout_chunks=0 holds none out"):
        apply_adaround(None, [], {"restarts": 3})
    with pytest.raises(PassConfigError, match="restarts"):
        apply_adaround(None, [], {"restarts": 0})
