"""Every recipe composes against the schema; a bad key fails naming it; a quick recipe runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from zoo.cli import _recipes, main
from zoo.cli.records import RECORD_SCHEMA_VERSION
from zoo.cli.schema import register_schemas
from zoo.hub import sha256_file
from zoo.registry import default_registry

RECIPES = [f"{m}/{r}" for m, rs in _recipes().items() for r in rs]


@pytest.fixture
def hydra_recipes():
    register_schemas()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        yield


def test_every_zoo_model_has_recipes():
    registry = default_registry()
    assert set(_recipes()) == set(registry.list())
    for model, recipes in _recipes().items():
        assert {"w8a8_per_tensor", "w8a8_per_channel", "w4a8", "w8a16"} <= set(recipes), model


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe, hydra_recipes, monkeypatch):
    monkeypatch.setenv("QUANTZOO_DATA_DIR", "/data")
    cfg = compose(config_name=recipe)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    model, name = recipe.split("/")
    assert resolved["model"]["name"] == model and resolved["recipe"] == name
    assert resolved["data"]["name"] == default_registry().get(model).dataset
    assert resolved["data"]["calibration_split"] != resolved["data"]["eval_split"]


def test_wrong_key_fails_at_compose_time_naming_it(hydra_recipes):
    with pytest.raises(ConfigCompositionException) as err:
        compose(config_name="digits_mlp/w8a8_per_channel", overrides=["quant.weight_bitz=4"])
    assert "weight_bitz" in str(err.value.__cause__ or err.value)


def test_checkpoint_setting_defaults_to_calibration_and_a_typo_fails_at_compose_time(hydra_recipes):
    assert compose(config_name="digits_mlp/w8a8_per_channel").checkpoint is None
    cfg = compose(config_name="digits_mlp/w8a8_per_channel", overrides=["checkpoint=download"])
    assert cfg.checkpoint == "download"
    assert compose(config_name="digits_mlp/w8a8_per_channel", overrides=["checkpoint=/pub/x"]).checkpoint == "/pub/x"
    with pytest.raises(ConfigCompositionException) as err:
        compose(config_name="digits_mlp/w8a8_per_channel", overrides=["checkpoints=download"])
    assert "checkpoints" in str(err.value.__cause__ or err.value)


def test_wrong_type_fails_at_compose_time(hydra_recipes):
    with pytest.raises(ConfigCompositionException):
        compose(config_name="digits_mlp/w8a8_per_channel", overrides=["quant.weight_bits=four"])


def test_missing_data_dir_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("QUANTZOO_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "efficientnet_lite0/w8a8_per_channel", "hydra.run.dir=."])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "QUANTZOO_DATA_DIR" in err and "data.root" in err


def test_unsupported_bitwidth_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["run", "digits_mlp/w8a8_per_channel", "quant.weight_bits=1", "hydra.run.dir=.", "evaluator.progress=false"])
    err = capsys.readouterr().err
    assert "bitwidth=1" in err and "Traceback" not in err


def test_run_writes_a_complete_record(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    main(["run", "digits_mlp/w8a8_per_channel", "hydra.run.dir=.", "evaluator.progress=false"])
    out = capsys.readouterr().out
    assert "fp32" in out and "quantsim" in out and "onnxruntime" in out
    (record_path,) = (tmp_path / "results" / "runs").glob("digits_mlp__w8a8_per_channel__*.json")
    record = json.loads(record_path.read_text())
    assert record["schema_version"] == RECORD_SCHEMA_VERSION
    for backend in ("fp32", "quantsim", "onnxruntime"):
        m = record["metrics"][backend]
        assert m["num_samples"] == 360 and 0 <= m["top1"] <= 100 and "top5" in m
        assert m["top1_ci95"][0] <= m["top1"] <= m["top1_ci95"][1]
    assert record["metrics"]["fp32"]["top1"] > 90
    assert abs(record["metrics"]["quantsim"]["top1"] - record["metrics"]["fp32"]["top1"]) < 2.0
    assert record["agreement"]["quantsim_vs_onnxruntime_top1"] >= 99.0
    for artifact in record["artifacts"].values():
        assert sha256_file(artifact["path"]) == artifact["sha256"]
    prov = record["provenance"]
    assert prov["config"]["quant"]["weight_bits"] == 8 and prov["seed"] == 0
    assert len(prov["dataset_fingerprint"]["eval"]) == 64 and len(prov["checkpoint_sha256"]) == 64
    assert len(prov["calibration_sample_ids"]) == 256 and {"sha", "dirty"} <= set(prov["git"])
    assert {"build_fp32", "calibrate", "eval_quantsim", "export", "eval_onnxruntime"} <= set(record["timings"])
    assert record["source"] == {"kind": "calibration"} and record["skipped_stages"] == {}
    assert prov["quantized_checkpoint_sha256"] is None
    digests = {backend: record["metrics"][backend]["predictions_sha256"] for backend in ("fp32", "quantsim", "onnxruntime")}
    assert all(len(d) == 64 for d in digests.values())
    # 100% agreement between simulation and ORT means the same predictions, hence the same digest
    assert (digests["quantsim"] == digests["onnxruntime"]) == (record["agreement"]["quantsim_vs_onnxruntime_top1"] == 100.0)


def test_list_and_show(capsys):
    assert main(["list", "mnist_*"]) == 0
    out = capsys.readouterr().out
    assert "mnist_cnn" in out and "digits_mlp" not in out
    assert main(["show", "efficientnet_lite0"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == "efficientnet_lite0" and "w8a8_per_channel" in card["recipes"]


def test_unknown_ptq_step_is_refused_not_ignored(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["run", "digits_mlp/w8a8_per_channel", "ptq.steps=[cle_typo]", "hydra.run.dir=.", "evaluator.progress=false"])
    err = capsys.readouterr().err
    assert "ptq.steps[0]" in err and "cle_typo" in err and "Traceback" not in err
    assert not list(tmp_path.glob("results/runs/*.json"))


def test_ptq_steps_run_and_are_recorded_with_timings(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    main(["run", "digits_mlp/w8a8_per_channel", "ptq.steps=[{name: bias_correction}]", "hydra.run.dir=.",
          "evaluator.progress=false", "evaluator.onnxruntime=false"])
    (record_path,) = (tmp_path / "results" / "runs").glob("digits_mlp__w8a8_per_channel__*.json")
    record = json.loads(record_path.read_text())
    assert [s["name"] for s in record["ptq"]["steps"]] == ["bias_correction"]
    assert record["timings"]["ptq_bias_correction"] >= 0 and record["timings"]["calibrate"] > 0
    assert record["cost"]["macs"] > 0 and record["qat"] is None and record["compress"] is None


def test_bad_quant_arithmetic_is_one_line_naming_the_setting(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["run", "digits_mlp/w8a8_per_channel", "quant.arithmetic=fixed", "hydra.run.dir=.", "evaluator.progress=false"])
    err = capsys.readouterr().err
    assert "quant.arithmetic='fixed'" in err and "integer" in err and "Traceback" not in err


SENSITIVITY = "ptq.steps=[{name: sensitivity, modes: [both], score_top: 2, num_samples: 16, plot_top: 1}]"


def test_plots_move_next_to_the_record_when_it_lands(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    main(["run", "digits_mlp/w8a8_per_channel", SENSITIVITY, "hydra.run.dir=.", "evaluator.progress=false",
          "evaluator.onnxruntime=false"])
    runs = tmp_path / "results" / "runs"
    (record_path,) = runs.glob("digits_mlp__w8a8_per_channel__*.json")
    record = json.loads(record_path.read_text())
    plots = record["ptq"]["plots"]
    assert plots and all(Path(p).parent.resolve() == (runs / record["run_id"]).resolve() and Path(p).is_file()
                         for p in plots)
    assert not (runs / ".partial" / record["run_id"]).exists()


def test_a_run_killed_before_its_record_leaves_no_run_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill between the PTQ plots and the record looks like to the run

    monkeypatch.setattr("zoo.cli.run.export", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["run", "digits_mlp/w8a8_per_channel", SENSITIVITY, "hydra.run.dir=.", "evaluator.progress=false"])
    runs = tmp_path / "results" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [".partial"]  # no record, no run folder
    (staged,) = (runs / ".partial").iterdir()
    assert any(staged.glob("*.png"))  # the plots were written, in the ignored staging folder
