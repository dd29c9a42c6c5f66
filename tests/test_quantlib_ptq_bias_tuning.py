"""Bias tuning (Hubara et al. 2021): the biases of a quantized model are trained end to end on
the KL to the float logits; weights and encodings stay, and held-out samples pick the epoch."""

from __future__ import annotations

import copy

import pytest
import torch

from quantlib.ptq.bias_tuning import apply_bias_tuning
from quantlib.ptq.pass_config import PassConfigError
from quantlib.ptq.pipeline import prepare_quantsim
from quantlib.ptq.quantizer_groups import fp32_reference
from quantlib.qat.losses import distillation_loss
from quantlib_reconstruction_helpers import calibrated_sim
from test_quantlib_ptq_qdrop_and_blocks import residual_net

SETTINGS = {"epochs": 10, "learning_rate": 1e-2, "batch_size": 32, "num_samples": 512}


def _data(count: int = 768, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _kl(sim, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(distillation_loss(sim.model(x), fp32_reference(sim)(x), 1.0))


def _state(sim) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in sim.model.state_dict().items()}


def test_tuning_lowers_the_kl_on_unseen_samples_and_changes_only_biases():
    x = _data()
    sim = calibrated_sim(residual_net(), x[:512], weight_bits=4, activation_bits=8)
    before, encodings = _state(sim), copy.deepcopy(sim.encodings())
    kl_before = _kl(sim, x[512:])
    result = apply_bias_tuning(sim, [x[:512]], SETTINGS)

    assert _kl(sim, x[512:]) < 0.5 * kl_before  # samples 512.. were never trained on
    after = _state(sim)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(".bias") for name in changed), sorted(changed)
    assert sim.encodings() == encodings
    assert result.num_parameters == sum(m.bias.numel() for m in sim.weight_modules().values())
    assert [entry["epoch"] for entry in result.history] == list(range(11)) and result.selected_epoch == 10
    assert all(p.requires_grad for p in sim.model.parameters())  # the flags as they were
    # the float reference of a later pass still has the biases from before tuning
    reference = fp32_reference(sim)
    assert all(torch.equal(reference.get_submodule(name).bias, before[f"{name}.bias"])
               for name in sim.weight_modules())


def test_held_out_samples_pick_the_epoch_and_undo_tuning_that_does_not_carry_over():
    x = _data()
    sim = calibrated_sim(residual_net(), x[:512], weight_bits=4, activation_bits=8)
    result = apply_bias_tuning(sim, [x[:512]], {**SETTINGS, "holdout_samples": 128})
    scores = [entry["holdout_kl"] for entry in result.history]
    assert result.selected_epoch == min(range(len(scores)), key=lambda epoch: (scores[epoch], -epoch))
    assert _kl(sim, x[384:512]) == pytest.approx(scores[result.selected_epoch], rel=1e-4)
    assert result.samples == 384 and result.holdout_samples == 128

    undone = calibrated_sim(residual_net(), x[:512], weight_bits=4, activation_bits=8)
    before = _state(undone)
    # a step size that wrecks the biases: epoch 0 (no tuning) must win and the biases come back
    wrecked = apply_bias_tuning(undone, [x[:512]], {**SETTINGS, "epochs": 2, "learning_rate": 50.0, "holdout_samples": 128})
    assert wrecked.selected_epoch == 0
    assert all(torch.equal(before[name], value) for name, value in _state(undone).items())


def test_bad_settings_are_named():
    x = _data(64)
    sim = calibrated_sim(residual_net(), x, weight_bits=4, activation_bits=8)
    with pytest.raises(PassConfigError, match="holdout_samples=64 leaves nothing to train on with num_samples=64"):
        apply_bias_tuning(sim, [x], {"num_samples": 64, "holdout_samples": 64})
    with pytest.raises(PassConfigError, match="holdout_samples=100 leaves nothing to train on: the data gave 64"):
        apply_bias_tuning(sim, [x], {"num_samples": 256, "holdout_samples": 100})
    with pytest.raises(PassConfigError, match="no selected weight layer has a bias"):
        apply_bias_tuning(sim, [x], {"include": ["nothing*"]})
    with pytest.raises(PassConfigError, match="epochs"):
        apply_bias_tuning(sim, [x], {"epochs": 0})


def test_the_pipeline_step_runs_from_a_step_list():
    x = _data(256)
    model = residual_net()
    sim, report = prepare_quantsim(model, x[:1], "per_channel", [{"name": "bias_tuning", "epochs": 2, "num_samples": 256}],
                                   [x], progress=False)
    (record,) = report.steps
    assert record.name == "bias_tuning" and record.summary["selected_epoch"] == 2
    assert record.summary["recalibrated"] is False
