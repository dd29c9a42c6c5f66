"""AdaRound's early stopping on held-out chunks (``holdout_checkpoints``): the hard rounding is
scored on the held-out chunks at evenly spaced points of the schedule and the best one is kept."""

from __future__ import annotations

import copy

import pytest
import torch

from quantlib.affine import dequantize
from quantlib.ptq.adaround import AdaRoundConfig, apply_adaround
from quantlib.ptq.adaround_config import checkpoint_iterations
from quantlib.ptq.pass_config import PassConfigError
from quantlib.ptq.weight_freeze import weight_codes
from quantlib_reconstruction_helpers import FAST, calibrated_sim
from test_quantlib_ptq_holdout import _held_out_mse, _linear_sim, _shifted_data
from test_quantlib_ptq_qdrop_and_blocks import residual_net

SETTINGS = {**FAST, "num_samples": 256, "batch_size": 64, "holdout_chunks": 1, "keep_nearest_if_worse": False}


def _checkpoint_scores(layer) -> list[dict]:
    return [entry for entry in layer.history if "holdout_mse" in entry]


def test_checkpoint_iterations_are_evenly_spaced_and_end_at_the_schedule_end():
    assert checkpoint_iterations(500, 10) == tuple(range(50, 501, 50))
    assert checkpoint_iterations(400, 3) == (133, 267, 400)
    assert checkpoint_iterations(3, 10) == (1, 2, 3)
    assert checkpoint_iterations(0, 10) == ()
    assert checkpoint_iterations(500, 0) == ()


def test_the_rounding_with_the_lowest_held_out_error_is_kept():
    """Fitted on correlated inputs, the rounding ends worse on the independent held-out chunk than
    it was earlier in the schedule: early stopping keeps the earlier one, whose held-out error is
    the lowest of the checkpoints and below the end's."""
    x = _shifted_data()
    model, ended = _linear_sim(x)
    (end,) = apply_adaround(ended, [x], SETTINGS, progress=False).layers
    model, stopped = _linear_sim(x)
    (layer,) = apply_adaround(stopped, [x], {**SETTINGS, "holdout_checkpoints": 8}, progress=False).layers

    scores = _checkpoint_scores(layer)
    assert [entry["iteration"] for entry in scores] == list(checkpoint_iterations(400, 8))
    assert scores[-1]["holdout_mse"] == pytest.approx(end.holdout_mse_adaround, rel=1e-6)  # same trajectory
    best = min(scores, key=lambda entry: entry["holdout_mse"])
    assert layer.selected_iteration == best["iteration"] < 400
    assert layer.holdout_mse_adaround == pytest.approx(best["holdout_mse"], rel=1e-6)
    assert layer.holdout_mse_adaround < end.holdout_mse_adaround
    module = stopped.weight_modules()["0"]
    wq = module.weight_quantizer
    kept = dequantize(weight_codes(module), wq.scale, wq.zero_point, wq.spec)
    assert _held_out_mse(model, kept, x[192:]) == pytest.approx(layer.holdout_mse_adaround, rel=1e-3)
    summary = apply_adaround(_linear_sim(x)[1], [x], {**SETTINGS, "holdout_checkpoints": 8}, progress=False).summary()
    assert summary["layers_stopped_early"] == 1 and summary["per_layer"][0]["selected_iteration"] == layer.selected_iteration


def test_block_checkpoints_score_the_block_output_and_keep_the_best():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 8, 8, generator=g)
    settings = {**SETTINGS, "num_iterations": 60, "crop": None, "reconstruct": "block"}
    base = calibrated_sim(residual_net(), x, weight_bits=4, activation_bits=8)
    ended, stopped = copy.deepcopy(base), copy.deepcopy(base)
    end_blocks = apply_adaround(ended, [x], settings, progress=False).layers
    blocks = apply_adaround(stopped, [x], {**settings, "holdout_checkpoints": 4}, progress=False).layers
    assert [b.name for b in blocks] == [b.name for b in end_blocks]
    for block in blocks:
        scores = _checkpoint_scores(block)
        assert [entry["iteration"] for entry in scores] == [15, 30, 45, 60]
        best = min(entry["holdout_mse"] for entry in scores)
        assert block.holdout_mse_adaround == pytest.approx(best, rel=1e-6), block.name
    # the first block sees the same inputs in both runs (later ones see what earlier choices give)
    first, first_end = blocks[0], end_blocks[0]
    assert _checkpoint_scores(first)[-1]["holdout_mse"] == pytest.approx(first_end.holdout_mse_adaround, rel=1e-6)
    assert first.holdout_mse_adaround <= first_end.holdout_mse_adaround
    if first.selected_iteration == 60:  # the end was best: the same codes as without checkpoints
        for name in first.layers:
            assert torch.equal(weight_codes(stopped.weight_modules()[name]), weight_codes(ended.weight_modules()[name]))


def test_without_checkpoints_nothing_is_selected():
    x = _shifted_data()
    (layer,) = apply_adaround(_linear_sim(x)[1], [x], SETTINGS, progress=False).layers
    assert layer.selected_iteration is None and not _checkpoint_scores(layer)


@pytest.mark.parametrize("settings, message", [
    ({"holdout_checkpoints": -1, "holdout_chunks": 1}, r"holdout_checkpoints=-1 must be an integer >= 0"),
    ({"holdout_checkpoints": 10}, r"holdout_checkpoints=10 scores roundings on held-out chunks, and holdout_chunks=0 "
                                  r"holds none out; set holdout_chunks >= 1 or holdout_checkpoints=0"),
])
def test_bad_checkpoint_settings_name_the_setting(settings, message):
    with pytest.raises(PassConfigError, match=message):
        AdaRoundConfig(**settings)
