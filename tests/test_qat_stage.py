"""The QAT stage of `quantzoo run`: record, metrics log, curve, export, resume, errors, preserved sparsity."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from zoo.cli import main
from zoo.cli.errors import RunConfigError
from zoo.cli.qat_stage import CURVES_PNG, METRICS_LOG, qat_train_config, run_qat
from zoo.cli.schema_qat import QatConf
from zoo.hub import sha256_file

from test_quantlib_qat_fixtures import accuracy, digits, quantized, trained_mlp

QUIET = ["hydra.run.dir=.", "evaluator.progress=false"]


def _records(tmp_path):
    return sorted((json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")),
                  key=lambda r: r["run_id"])


def test_qat_run_records_history_log_curve_and_exports_like_ptq(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    main(["run", "digits_mlp/qat_w4a4", *QUIET])
    (record,) = _records(tmp_path)
    qat = record["qat"]
    assert qat["epochs"] == 3 and len(qat["history"]) == 3 and qat["world_size"] == 1 and not qat["resumed"]
    assert qat["global_steps"] == 3 * 4 and qat["train_samples"] == 256  # 256 calibration digits, batches of 64
    assert qat["learned_ranges"] == record["quantsim"]["activation_quantizers"] + record["quantsim"]["weight_quantizers"]
    assert qat["history"][-1]["loss"] < qat["history"][0]["loss"]
    log = [json.loads(line) for line in open(qat["metrics_log"])]
    assert log == qat["history"]
    with open(qat["curves_png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    run_folder = tmp_path / "results" / "runs" / record["run_id"]
    assert {p.name for p in run_folder.iterdir()} >= {METRICS_LOG, CURVES_PNG}
    assert record["timings"]["qat"] > 0 and record["agreement"]["quantsim_vs_onnxruntime_top1"] >= 99.0
    for artifact in record["artifacts"].values():
        assert sha256_file(artifact["path"]) == artifact["sha256"]
    assert record["metrics"]["quantsim"]["top1"] > 90.0


@pytest.mark.slow
def test_qat_resume_true_after_a_finished_run_gives_the_same_model(monkeypatch, tmp_path):
    """qat.resume=true finds the finished checkpoint: no step is taken and the predictions are the same."""
    monkeypatch.chdir(tmp_path)
    main(["run", "digits_mlp/qat_w4a4", "evaluator.onnxruntime=false", *QUIET])
    main(["run", "digits_mlp/qat_w4a4", "qat.resume=true", "evaluator.onnxruntime=false", *QUIET])
    first, second = _records(tmp_path)
    assert second["qat"]["resumed"] and second["qat"]["resumed_from_step"] == first["qat"]["global_steps"]
    assert second["qat"]["history"] == first["qat"]["history"]
    assert second["metrics"]["quantsim"]["predictions_sha256"] == first["metrics"]["quantsim"]["predictions_sha256"]


def test_bad_qat_settings_are_one_line_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    for override, message in (("qat.optimizer=lamb", "qat.optimizer='lamb' is not supported; use one of sgd, adam, adamw"),
                              ("qat.learn_ranges=some", "qat.learn_ranges='some' is not supported"),
                              ("qat.preserve=[zeros]", "qat.preserve lists 'zeros'")):
        with pytest.raises(SystemExit):
            main(["run", "digits_mlp/qat_w4a4", override, "evaluator.onnxruntime=false", *QUIET])
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("results/runs/*.json"))


def test_train_config_comes_from_the_qat_group_field_by_field():
    qat = asdict(QatConf(enabled=True, epochs=7, optimizer="adamw", lr=0.25, loss="both", distill_weight=0.3,
                         checkpoint_every_steps=11))
    config = qat_train_config(qat)
    assert (config.epochs, config.optimizer, config.lr, config.loss, config.distill_weight, config.checkpoint_every_steps) == \
        (7, "adamw", 0.25, "both", 0.3, 11)
    with pytest.raises(RunConfigError, match=r"qat.temperature=0"):
        qat_train_config({**qat, "temperature": 0})


def test_run_qat_keeps_the_sparsity_of_a_pruned_model(tmp_path):
    pytest.importorskip("quantlib.compress.preserve")
    model = trained_mlp()
    with torch.no_grad():
        weight = model[0].weight
        weight.mul_(weight.abs() > weight.abs().median())
    zeros = int((model[0].weight == 0).sum())
    sim = quantized(model, weight_bits=4, activation_bits=4)
    train_set, _ = digits()
    qat = {**asdict(QatConf(enabled=True, epochs=2, batch_size=200, lr=0.05, learn_ranges="all")),
           "preserve": ["sparsity"], "checkpoint_dir": str(tmp_path / "ckpt")}
    resolved = {"qat": qat, "recipe": "qat_test", "model": {"name": "mlp"}}
    summary = run_qat(sim, model, resolved, train_set, tmp_path / "record", torch.device("cpu"), progress=False)
    assert summary["preserve"] == ["sparsity"] and summary["global_steps"] == 14
    assert int((sim.weight_modules()["0"].weight == 0).sum()) == zeros
    assert (tmp_path / "record" / METRICS_LOG).exists() and (tmp_path / "record" / CURVES_PNG).exists()
    assert accuracy(sim.model) > 80.0
    assert not any(type(q).__name__ == "LearnableQuantizer" for q in sim.quantizers().values())


@pytest.mark.slow
def test_a_published_qat_run_reloads_to_the_same_predictions(monkeypatch, tmp_path):
    """publish/checkpoint= treat QAT artifacts as PTQ ones: the reloaded model predicts exactly as the trained one."""
    monkeypatch.chdir(tmp_path)
    main(["run", "digits_mlp/qat_w4a4", *QUIET])
    assert main(["publish", "digits_mlp/qat_w4a4", "--to", str(tmp_path / "pub")]) == 0
    main(["run", "digits_mlp/qat_w4a4", f"checkpoint={tmp_path / 'pub'}", "qat=none", *QUIET])
    trained, reloaded = _records(tmp_path)
    assert reloaded["source"]["kind"] == "published_checkpoint" and reloaded["qat"] is None
    for backend in ("quantsim", "onnxruntime"):
        assert reloaded["metrics"][backend]["predictions_sha256"] == trained["metrics"][backend]["predictions_sha256"]
