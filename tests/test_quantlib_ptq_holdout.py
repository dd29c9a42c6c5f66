"""Held-out calibration chunks (``holdout_chunks``) of the layer-wise passes: they are never
fitted on, the reported held-out errors are measured on them, and AdaRound's keep-or-drop and
AdaQuant's best-iterate decisions are made on them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlib.affine import dequantize
from quantlib.ptq.adaquant import AdaQuantConfig, apply_adaquant
from quantlib.ptq.adaround import AdaRoundConfig, apply_adaround
from quantlib.ptq.pass_config import PassConfigError
from quantlib.ptq.weight_freeze import weight_codes
from quantlib.quantsim import QuantSim
from quantlib_reconstruction_helpers import FAST, calibrated_sim, correlated_inputs, w4_a16_config
from test_quantlib_ptq_qdrop_and_blocks import residual_net


def _linear_sim(x: torch.Tensor) -> tuple[nn.Module, QuantSim]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32)).eval()
    sim = QuantSim(model, x[:1], w4_a16_config())
    sim.calibrate([x], progress=False)
    return model, sim


def _held_out_mse(model: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((F.linear(x, weight, model[0].bias) - model(x)).pow(2).sum() / (x.shape[0] * weight.shape[0]))


def _shifted_data() -> torch.Tensor:
    """Three chunks of 64 strongly correlated samples (where AdaRound beats nearest rounding)
    followed by one chunk of independent features (where nearest rounding is optimal)."""
    g = torch.Generator().manual_seed(3)
    return torch.cat([correlated_inputs(192, seed=3), 2.0 * torch.randn(64, 24, generator=g)])


@pytest.mark.parametrize("blocks", [False, True])
def test_held_out_chunks_are_never_drawn_for_a_step(blocks):
    """A run that holds out the last chunk optimizes exactly as a run given only the other chunks."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 8, 8, generator=g)
    settings = {**FAST, "num_iterations": 60, "batch_size": 64, "crop": None,
                "reconstruct": "block" if blocks else "layer", "keep_nearest_if_worse": False}
    base = calibrated_sim(residual_net(), x, weight_bits=4, activation_bits=8)
    held, fitted_only = copy.deepcopy(base), copy.deepcopy(base)
    result = apply_adaround(held, [x], {**settings, "num_samples": 256, "holdout_chunks": 1}, progress=False)
    apply_adaround(fitted_only, [x[:192]], {**settings, "num_samples": 192}, progress=False)
    for name, module in held.weight_modules().items():
        assert torch.equal(weight_codes(module), weight_codes(fitted_only.weight_modules()[name])), name
    assert all(layer.holdout_mse_nearest is not None for layer in result.layers)


def test_held_out_errors_are_measured_on_the_held_out_samples():
    x = _shifted_data()
    model, sim = _linear_sim(x)
    module = sim.weight_modules()["0"]
    wq = module.weight_quantizer
    nearest = dequantize(weight_codes(module), wq.scale, wq.zero_point, wq.spec)
    result = apply_adaround(sim, [x], {**FAST, "num_samples": 256, "batch_size": 64, "holdout_chunks": 1,
                                       "keep_nearest_if_worse": False}, progress=False)
    (layer,) = result.layers
    adarounded = dequantize(weight_codes(module), wq.scale, wq.zero_point, wq.spec)
    assert layer.holdout_mse_nearest == pytest.approx(_held_out_mse(model, nearest, x[192:]), rel=1e-3)
    assert layer.holdout_mse_adaround == pytest.approx(_held_out_mse(model, adarounded, x[192:]), rel=1e-3)
    summary = result.summary()
    assert summary["holdout_mse_nearest_sum"] == layer.holdout_mse_nearest
    assert summary["per_layer"][0]["holdout_mse_adaround"] == layer.holdout_mse_adaround


def test_keep_nearest_is_judged_on_the_held_out_chunks():
    """AdaRound fitted on correlated inputs beats nearest on them but loses on independent held-out
    inputs: judged on the first chunk it is kept, judged on the held-out chunk nearest is kept."""
    x = _shifted_data()
    settings = {**FAST, "num_samples": 256, "batch_size": 64}
    _, first_chunk = _linear_sim(x)
    _, held_out = _linear_sim(x)
    nearest = weight_codes(held_out.weight_modules()["0"]).clone()
    # without held-out chunks the independent chunk is fitted on too: drop it to keep the same fit data
    (judged_on_fit,) = apply_adaround(first_chunk, [x[:192]], {**settings, "num_samples": 192}, progress=False).layers
    (judged_held_out,) = apply_adaround(held_out, [x], {**settings, "holdout_chunks": 1}, progress=False).layers
    _, unjudged = _linear_sim(x)
    (not_kept,) = apply_adaround(unjudged, [x], {**settings, "holdout_chunks": 1, "keep_nearest_if_worse": False},
                                 progress=False).layers
    assert not judged_on_fit.kept_nearest and judged_on_fit.mse_adaround < judged_on_fit.mse_nearest
    assert not_kept.holdout_mse_adaround > not_kept.holdout_mse_nearest  # the same rounding loses on held-out data
    assert judged_held_out.kept_nearest and judged_held_out.flipped == 0.0
    assert judged_held_out.holdout_mse_adaround == judged_held_out.holdout_mse_nearest  # the kept weights' error
    assert torch.equal(weight_codes(held_out.weight_modules()["0"]), nearest)


def test_adaquant_chooses_its_best_iterate_on_the_held_out_chunks():
    """Checked on the first (fitted) chunk, AdaQuant keeps weights that are worse than nearest on
    the independent held-out inputs; checked on the held-out chunk, it never ends worse there."""
    x = _shifted_data()
    settings = {"num_iterations": 200, "learning_rate": 0.05, "batch_size": 64, "check_every": 20, "optimize_bias": False}

    def run(data, **extra):
        model, sim = _linear_sim(x)
        module = sim.weight_modules()["0"]
        wq = module.weight_quantizer
        nearest = _held_out_mse(model, dequantize(weight_codes(module), wq.scale, wq.zero_point, wq.spec), x[192:])
        (layer,) = apply_adaquant(sim, [data], {**settings, **extra}, progress=False).layers
        final = _held_out_mse(model, dequantize(weight_codes(module), wq.scale, wq.zero_point, wq.spec), x[192:])
        return layer, nearest, final

    _, nearest, checked_on_fit = run(x[:192], num_samples=192)
    layer, _, checked_held_out = run(x, num_samples=256, holdout_chunks=1)
    assert checked_on_fit > nearest
    assert layer.mse_before == pytest.approx(nearest, rel=1e-3)
    assert layer.mse_after == pytest.approx(checked_held_out, rel=1e-3)
    assert checked_held_out <= nearest


@pytest.mark.parametrize("settings, message", [
    ({"holdout_chunks": -1}, r"holdout_chunks=-1 must be an integer >= 0"),
    ({"holdout_chunks": 4, "num_samples": 256, "batch_size": 64},
     r"holdout_chunks=4 leaves nothing to fit on: num_samples=256 with batch_size=64 caches 4 chunks"),
    ({"holdout_chunks": 1, "mirror": True}, r"holdout_chunks=1 with mirror=true would hold out mirror images"),
])
@pytest.mark.parametrize("config_cls", [AdaRoundConfig, AdaQuantConfig])
def test_bad_holdout_settings_name_the_setting(config_cls, settings, message):
    with pytest.raises(PassConfigError, match=message):
        config_cls(**settings)


def test_too_little_calibration_data_for_the_held_out_chunks_is_a_clear_error():
    x = _shifted_data()
    _, sim = _linear_sim(x)
    with pytest.raises(PassConfigError, match=r"holdout_chunks=2 leaves nothing to fit on: the calibration data filled only 2 chunks"):
        apply_adaround(sim, [x[:128]], {**FAST, "num_samples": 256, "batch_size": 64, "holdout_chunks": 2}, progress=False)
