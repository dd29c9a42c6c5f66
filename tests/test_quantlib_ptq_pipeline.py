"""quantlib.ptq.pipeline / registry: step validation, ordering, execution and the report.

Every bad step list must fail before any work with one line that names ``ptq.steps[i]`` (and the
key); a valid list must run its steps in order, and ``[]`` must give exactly plain QuantSim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from quantlib.ptq.pipeline import default_registry, parse_steps, prepare_fp32_model, prepare_quantsim
from quantlib.ptq.registry import PTQConfigError, PTQContext, PTQStep, StepRegistry
from quantlib.quantsim import QuantSim

from quantlib_models import DepthwiseNet

DFQ_STEP_NAMES = ("bias_correction", "bn_fold", "bn_reestimation", "cle", "high_bias_absorption")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _data(batches: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=generator) for _ in range(batches)]


# ------------------------------------------------------------------------------ validation


def test_default_registry_holds_the_dfq_steps_with_their_phases():
    registry = default_registry()
    for name in DFQ_STEP_NAMES:
        assert name in registry
    phases = {name: registry.get(name).phase for name in DFQ_STEP_NAMES}
    assert phases == {"bias_correction": "sim", "bn_fold": "model", "bn_reestimation": "model",
                      "cle": "model", "high_bias_absorption": "model"}


def test_registry_refuses_a_duplicate_name():
    @dataclass(frozen=True)
    class NoSettings:
        pass

    registry = StepRegistry()
    registry.add(PTQStep("mine", NoSettings, lambda context, config: {}, "model"))
    with pytest.raises(ValueError, match="'mine' is already registered"):
        registry.add(PTQStep("mine", NoSettings, lambda context, config: {}, "sim"))
    with pytest.raises(ValueError, match="phase='later' is not valid"):
        PTQStep("other", NoSettings, lambda context, config: {}, "later")


@pytest.mark.parametrize("steps, message", [
    ([{"name": "bn_fold"}, {"name": "clee"}], r"ptq.steps\[1\].name='clee' is not a PTQ step; use one of .*cle"),
    ([{"name": "cle", "relu_6": "relu"}], r"ptq.steps\[0\].relu_6 is not a setting of step 'cle'; valid keys: .*relu6"),
    ([{"name": "cle", "relu6": "relu7"}], r"ptq.steps\[0\].relu6='relu7' is not supported; use one of per_channel_clip, relu, skip"),
    ([{"name": "cle", "max_iterations": "ten"}], r"ptq.steps\[0\].max_iterations='ten' must be an integer"),
    ([{"name": "cle", "max_iterations": 0}], r"ptq.steps\[0\].max_iterations=0 must be at least 1"),
    (["bn_fold", {"name": "bias_correction", "kind": "magic"}],
     r"ptq.steps\[1\].kind='magic' is not supported; use one of empirical, analytical"),
    ([{"name": "bias_correction", "num_samples": 0}], r"ptq.steps\[0\].num_samples=0 must be at least 1"),
    ([{"name": "bn_reestimation", "fold": "yes"}], r"ptq.steps\[0\].fold='yes' must be true or false"),
    ([{"name": "high_bias_absorption", "num_std": -1}], r"ptq.steps\[0\].num_std=-1.0 must be 0 or more"),
    ([{"relu6": "relu"}], r"ptq.steps\[0\] needs a 'name'"),
    ([3], r"ptq.steps\[0\] must be a step name or a mapping"),
    ("cle", r"ptq.steps must be a list of steps"),
])
def test_bad_step_lists_name_the_step_and_key(steps, message):
    with pytest.raises(PTQConfigError, match=message):
        parse_steps(steps)


def test_model_step_after_a_sim_step_is_refused():
    with pytest.raises(PTQConfigError, match=r"ptq.steps\[1\] \(cle\) changes the FP32 model, so it must come before "
                                             r"ptq.steps\[0\] \(bias_correction\)"):
        parse_steps(["bias_correction", "cle"])


def test_bn_reestimation_must_precede_bn_fold_and_cle():
    with pytest.raises(PTQConfigError, match=r"ptq.steps\[1\] \(bn_reestimation\) must come before ptq.steps\[0\] \(bn_fold\)"):
        parse_steps(["bn_fold", "bn_reestimation"])
    planned = parse_steps(["bn_reestimation", "bn_fold", "cle", "high_bias_absorption", "bias_correction"])
    assert [p.step.name for p in planned] == ["bn_reestimation", "bn_fold", "cle", "high_bias_absorption",
                                              "bias_correction"]
    assert [p.where for p in planned] == [f"ptq.steps[{i}]" for i in range(5)]


def test_validation_happens_before_any_work():
    calls = []

    def forward(model, batch, device):
        calls.append(1)
        return model(batch)

    with pytest.raises(PTQConfigError, match=r"ptq.steps\[2\]"):
        prepare_quantsim(_model(), _data()[0], "per_tensor", ["bn_fold", "cle", "nonsense"], _data(),
                         progress=False, forward_fn=forward)
    assert calls == []


def test_a_one_shot_iterator_is_refused():
    with pytest.raises(PTQConfigError, match="one-shot iterator; pass a DataLoader or a list"):
        prepare_quantsim(_model(), _data()[0], "per_tensor", ["bn_fold"], iter(_data()), progress=False)


def test_prepare_fp32_model_refuses_sim_steps():
    with pytest.raises(PTQConfigError, match=r"ptq.steps\[1\] \(bias_correction\) runs on a QuantSim"):
        prepare_fp32_model(_model(), _data()[0], ["bn_fold", "bias_correction"], _data(), progress=False)


# ------------------------------------------------------------------------------ execution


def test_no_steps_gives_plain_quantsim():
    model, data = _model(), _data()
    sim, report = prepare_quantsim(model, data[0], "per_tensor", [], data, progress=False)
    plain = QuantSim(model, data[0], "per_tensor")
    plain.calibrate(data, progress=False)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(sim.model(x), plain.model(x))
    assert report.steps == [] and report.calibration_batches == 3


def test_steps_run_in_order_and_the_report_is_json():
    model, data = _model(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = ["bn_fold", {"name": "cle", "max_plots": 0}, {"name": "bias_correction", "num_samples": 16}]
    sim, report = prepare_quantsim(model, data[0], "per_tensor", steps, data, progress=False)
    assert [(s.name, s.phase) for s in report.steps] == [("bn_fold", "model"), ("cle", "model"),
                                                         ("bias_correction", "sim")]
    assert report.steps[0].summary["folded_batch_norms"] == 1
    assert report.steps[1].summary["pairs"] == 2
    assert report.steps[2].summary["samples"] == 16
    assert report.steps[1].config["relu6"] == "per_channel_clip"
    decoded = json.loads(json.dumps(report.to_dict()))
    assert [s["name"] for s in decoded["steps"]] == ["bn_fold", "cle", "bias_correction"]
    assert "bias_correction" in report.format()
    for key, value in model.state_dict().items():  # the caller's model is not mutated
        assert torch.equal(value, before[key]), key


def test_custom_step_sees_the_context_and_a_score_fn():
    @dataclass(frozen=True)
    class Settings:
        factor: float = 1.0

    seen = {}

    def run(context: PTQContext, config: Settings) -> dict:
        seen["score"] = context.require_score_fn("probe")(context.model)
        seen["sim"] = context.sim is not None
        return {"factor": config.factor}

    registry = default_registry()
    registry.add(PTQStep("probe", Settings, run, "sim"))
    sim, report = prepare_quantsim(_model(), _data()[0], "per_tensor", [{"name": "probe", "factor": 2}], _data(),
                                   progress=False, registry=registry, score_fn=lambda model: 42.0)
    assert seen == {"score": 42.0, "sim": True}
    assert report.steps[0].summary == {"factor": 2.0}


def test_cle_plots_are_written_next_to_the_record(tmp_path):
    sim, report = prepare_quantsim(_model(), _data()[0], "per_tensor", ["bn_fold", {"name": "cle", "max_plots": 2}],
                                   _data(), progress=False, plots_dir=tmp_path)
    assert len(report.plots) == 2
    for path in report.plots:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.rsplit("/", 1)[-1] for p in report.plots)
