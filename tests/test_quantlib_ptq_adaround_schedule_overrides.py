"""AdaRound's per-layer/per-block schedule overrides (``schedule_overrides``)."""

from __future__ import annotations

import pytest
import torch

from quantlib.ptq.adaround import AdaRoundConfig, apply_adaround
from quantlib.ptq.adaround_config import ScheduleOverride, config_for
from quantlib.ptq.pass_config import PassConfigError
from quantlib_reconstruction_helpers import FAST, calibrated_sim
from test_quantlib_ptq_qdrop_and_blocks import residual_net

SHORT = {**FAST, "num_iterations": 40, "num_samples": 256, "reconstruct": "block", "crop": None,
         "keep_nearest_if_worse": False}


def _block_run(overrides):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 8, 8, generator=g)
    sim = calibrated_sim(residual_net(), x, weight_bits=4, activation_bits=8)
    return apply_adaround(sim, [x], {**SHORT, "schedule_overrides": overrides}, progress=False)


def test_an_override_gives_only_the_matching_block_its_longer_schedule():
    short = _block_run([])
    longer = _block_run([{"pattern": "2", "num_iterations": 400}])
    assert [layer.iterations for layer in short.layers] == [40, 40, 40, 40]
    assert [layer.iterations for layer in longer.layers] == [40, 400, 40, 40]
    assert [entry["iterations"] for entry in longer.summary()["per_layer"]] == [40, 400, 40, 40]
    # the longer schedule settles block 2's rounding that 40 steps leave largely undecided
    assert short.layers[1].undecided > 0.5
    assert longer.layers[1].undecided < 0.1
    assert longer.layers[1].mse_adaround < longer.layers[1].mse_nearest
    assert longer.layers[0].mse_adaround == pytest.approx(short.layers[0].mse_adaround)  # block 0 ran as before


def test_the_first_matching_override_applies_and_keeps_the_other_settings():
    config = AdaRoundConfig(num_iterations=500, reg_weight=0.1, schedule_overrides=(
        {"pattern": "blocks.0.*", "num_iterations": 2000},
        {"pattern": "blocks.*", "reg_weight": 1.0}))
    assert config.schedule_overrides[0] == ScheduleOverride(pattern="blocks.0.*", num_iterations=2000)
    first = config_for(config, "blocks.0.0")
    assert (first.num_iterations, first.reg_weight, first.schedule_overrides) == (2000, 0.1, ())
    assert (config_for(config, "blocks.3.1").num_iterations, config_for(config, "blocks.3.1").reg_weight) == (500, 1.0)
    assert config_for(config, "conv_head") is config


@pytest.mark.parametrize("overrides, message", [
    ({"pattern": "x", "num_iterations": 10}, r"schedule_overrides=.* must be a list"),
    (["blocks.0.*"], r"schedule_overrides\[0\] must be a mapping like"),
    ([{"pattern": "blocks.0.*"}], r"schedule_overrides\[0\] \('blocks.0.\*'\) changes nothing; set num_iterations"),
    ([{"pattern": "", "reg_weight": 1.0}], r"schedule_overrides\[0\].pattern='' must be a glob"),
    ([{"pattern": "b", "num_iterations": -5}], r"schedule_overrides \('b'\): num_iterations=-5 must be an integer >= 0"),
    ([{"pattern": "b", "iterations": 5}], r"schedule_overrides\[0\].iterations is not a ScheduleOverride setting"),
])
def test_bad_overrides_name_the_setting(overrides, message):
    with pytest.raises(PassConfigError, match=message):
        AdaRoundConfig(schedule_overrides=overrides)


def test_an_override_that_matches_no_layer_or_block_is_refused_before_any_work():
    with pytest.raises(PassConfigError, match=r"schedule_overrides\[0\].pattern='blocks.9' matches no selected layer or block"):
        _block_run([{"pattern": "blocks.9", "num_iterations": 400}])
