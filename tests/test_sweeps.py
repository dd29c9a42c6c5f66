"""`quantzoo sweep`: one Hydra multirun over models and recipes; launchers; parallel workers share results/runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from zoo.cli import _recipes, main
from zoo.cli.schema import register_schemas
from zoo.cli.sweep import (
    GROUP,
    SWEEP_CONFIG,
    SweepError,
    absolute_path_overrides,
    expand_targets,
    register_sweep_configs,
)
from zoo.results import result_rows

RECIPES = _recipes()


def test_targets_expand_sorted_with_wildcards_and_bare_models():
    assert expand_targets(["digits_mlp/w8a8_*"], RECIPES) == ["digits_mlp/w8a8_per_channel", "digits_mlp/w8a8_per_tensor"]
    every_digits = expand_targets(["digits_mlp"], RECIPES)
    assert every_digits == [f"digits_mlp/{r}" for r in sorted(RECIPES["digits_mlp"])]
    both = expand_targets(["mnist_cnn/w4a8", "*/w4a8", "mnist_cnn/w4a8"], RECIPES)
    assert both == sorted(f"{m}/w4a8" for m in RECIPES) and len(both) == len(set(both))
    with pytest.raises(SweepError, match="'nope/\\*' matches no recipe"):
        expand_targets(["nope/*"], RECIPES)


def test_result_folders_become_absolute_so_all_workers_share_them(tmp_path):
    assert absolute_path_overrides(["seed=1"], tmp_path) == [
        "seed=1", f"results_dir={tmp_path / 'results'}", f"artifacts_dir={tmp_path / 'artifacts'}"]
    given = absolute_path_overrides(["results_dir=out/r"], tmp_path)
    assert given[0] == f"results_dir={tmp_path / 'out' / 'r'}" and given[1] == f"artifacts_dir={tmp_path / 'artifacts'}"
    with pytest.raises(SweepError, match="results_dir"):
        absolute_path_overrides(["results_dir=a,b"], tmp_path)


def test_dry_run_prints_the_one_multirun(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "digits_mlp/w8a8_*", "mnist_cnn/w4a8", "hydra/launcher=joblib", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 recipe(s): digits_mlp/w8a8_per_channel digits_mlp/w8a8_per_tensor mnist_cnn/w4a8" in out
    assert (f"--multirun {GROUP}=digits_mlp/w8a8_per_channel,digits_mlp/w8a8_per_tensor,mnist_cnn/w4a8 "
            f"hydra/launcher=joblib results_dir={tmp_path / 'results'}") in out


def test_bad_sweep_arguments_are_one_line_errors(capsys):
    assert main(["sweep", "nope/*"]) == 2
    assert main(["sweep", "digits_mlp", "zoo=mnist_cnn/w4a8"]) == 2
    assert main(["sweep", "seed=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("quantzoo: error: ") for line in err)


@pytest.fixture
def sweep_configs():
    register_sweep_configs(RECIPES, default="digits_mlp/w8a8_per_channel")
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        yield


@pytest.mark.parametrize("target", ["digits_mlp/w4a8", "mnist_cnn/w8a8_per_tensor", "efficientnet_lite0/w8a16"])
def test_a_sweep_choice_composes_exactly_the_recipe_file(target, sweep_configs, monkeypatch):
    monkeypatch.setenv("QUANTZOO_DATA_DIR", "/data")
    via_sweep = compose(config_name=SWEEP_CONFIG, overrides=[f"{GROUP}={target}", "evaluator.batch_size=7"])
    direct = compose(config_name=target, overrides=["evaluator.batch_size=7"])
    assert OmegaConf.to_container(via_sweep, resolve=True) == OmegaConf.to_container(direct, resolve=True)
    with pytest.raises(ConfigCompositionException):  # the typed schema still checks every key
        compose(config_name=SWEEP_CONFIG, overrides=[f"{GROUP}={target}", "quant.weight_bitz=4"])


@pytest.mark.parametrize("launcher, target", [
    ("joblib", "JoblibLauncher"), ("submitit_local", "LocalLauncher"),
    ("submitit_slurm", "SlurmLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher, target, sweep_configs):
    cfg = compose(config_name=SWEEP_CONFIG, overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":  # the shipped example: a complete, overridable cluster config
        assert cfg.hydra.launcher.cpus_per_task == 8 and cfg.hydra.launcher.partition is None
        assert cfg.hydra.launcher.array_parallelism == 32


def _sweep_records(tmp_path: Path, monkeypatch, launcher: list[str], seeds: str) -> list[dict]:
    monkeypatch.chdir(tmp_path)
    register_schemas()
    main(["sweep", "digits_mlp/w8a8_per_channel", f"seed={seeds}", "evaluator.progress=false",
          f"hydra.sweep.dir={tmp_path / 'sweep'}", *launcher])
    runs = tmp_path / "results" / "runs"
    assert not list(runs.glob(".*.tmp")), "a temporary record file was left behind"
    return [json.loads(path.read_text()) for path in sorted(runs.glob("*.json"))]


@pytest.mark.slow  # two loky worker processes each import torch: about a minute on 2 shared cores
def test_joblib_workers_write_separate_records_into_one_results_folder(tmp_path, monkeypatch):
    records = _sweep_records(tmp_path, monkeypatch, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], "0,1")
    assert len(records) == 2 and len({r["run_id"] for r in records}) == 2
    assert sorted(r["provenance"]["config"]["seed"] for r in records) == [0, 1]
    for record in records:
        assert record["model"] == "digits_mlp" and record["metrics"]["quantsim"]["num_samples"] == 360
        assert Path(record["provenance"]["config"]["results_dir"]) == tmp_path / "results"
        for artifact in record["artifacts"].values():
            assert Path(artifact["path"]).is_file() and Path(artifact["path"]).is_relative_to(tmp_path / "artifacts")
    rows, count = result_rows(tmp_path / "results" / "runs", {})
    newest = max(records, key=lambda r: (r["run_id"].split("__")[2], r["run_id"]))
    assert count == 2 and [row.run_id for row in rows] == [newest["run_id"]]


@pytest.mark.slow  # submitit starts a fresh Python per job: 20-40 s
def test_submitit_local_launcher_runs_a_zoo_job(tmp_path, monkeypatch):
    records = _sweep_records(tmp_path, monkeypatch, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], "0")
    assert len(records) == 1 and records[0]["recipe"] == "w8a8_per_channel"
    assert (tmp_path / "sweep" / ".submitit").is_dir()
