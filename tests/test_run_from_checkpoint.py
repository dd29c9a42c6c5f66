"""`quantzoo run ... checkpoint=...`: start from published artifacts, skip calibration, reproduce the numbers.

run -> publish -> serve over a local HTTP mirror -> run with checkpoint=download (and from the
folder, and offline from the cache): identical quantsim and ONNX Runtime metrics and predictions;
the published W8A8 checkpoint rebuilds the calibrated simulated model bit for bit; a corrupted
artifact or artifacts of another recipe give a one-line error and no record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hub_server import ArtifactServer
from quantlib.quantsim import QuantSim
from zoo.builder import build_architecture, build_fp32_model
from zoo.card import PublishedArtifact
from zoo.cli import main
from zoo.cli.distribution import PublishedArtifacts, fetch_published
from zoo.cli.run import RunConfigError, load_published_checkpoint, quant_config, recipe_datasets
from zoo.hub import sha256_file
from zoo.registry import ModelRegistry, default_registry

MODEL, RECIPE = "digits_mlp", "w8a8_per_channel"
TARGET = f"{MODEL}/{RECIPE}"
QUIET = ["hydra.run.dir=.", "evaluator.progress=false"]
BACKENDS = ("fp32", "quantsim", "onnxruntime")


def _run(workdir: Path, target: str, *overrides: str) -> dict:
    """``quantzoo run target`` inside ``workdir``; returns the one record it wrote."""
    runs = workdir / "results" / "runs"
    before = set(runs.glob("*.json")) if runs.is_dir() else set()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        main(["run", target, *QUIET, *overrides])
    finally:
        os.chdir(cwd)
    (path,) = set(runs.glob("*.json")) - before
    return json.loads(path.read_text())


def _fails(workdir: Path, capsys, target: str, *overrides: str) -> str:
    """``quantzoo run`` that must exit 2 with a one-line error and write no record; returns the error."""
    runs = workdir / "results" / "runs"
    before = set(runs.glob("*.json")) if runs.is_dir() else set()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["run", target, *QUIET, *overrides])
    finally:
        os.chdir(cwd)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert (set(runs.glob("*.json")) if runs.is_dir() else set()) == before
    return err


def _without_seconds(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


def _assert_same_numbers(original: dict, reproduced: dict) -> None:
    for backend in BACKENDS:
        assert _without_seconds(reproduced["metrics"][backend]) == _without_seconds(original["metrics"][backend]), backend
        assert len(reproduced["metrics"][backend]["predictions_sha256"]) == 64
    assert reproduced["agreement"] == original["agreement"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """One calibrated W8A8 run of digits_mlp, published: record, folder and the served files."""
    work = tmp_path_factory.mktemp("original")
    record = _run(work, TARGET)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["publish", TARGET, "--to", str(work / "pub")]) == 0
    finally:
        os.chdir(cwd)
    folder = work / "pub" / MODEL / RECIPE
    files = {"/" + str(p.relative_to(work / "pub")): p.read_bytes() for p in sorted(folder.iterdir())}
    return {"record": record, "root": work / "pub", "folder": folder, "files": files,
            "manifest": json.loads((folder / "manifest.json").read_text())}


def test_manifest_records_the_settings_the_artifacts_were_made_with(published):
    manifest, record = published["manifest"], published["record"]
    assert manifest["config"]["quant"] == record["provenance"]["config"]["quant"]
    assert manifest["config"]["ptq"] == {"steps": []}
    assert manifest["fp32_sha256"] == record["provenance"]["checkpoint_sha256"]
    assert record["source"] == {"kind": "calibration"} and record["skipped_stages"] == {}
    assert record["provenance"]["quantized_checkpoint_sha256"] is None


def test_run_from_downloaded_checkpoint_reproduces_the_run(published, tmp_path, monkeypatch):
    original = published["record"]
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "cache"))
    with ArtifactServer(files=dict(published["files"])) as server:
        monkeypatch.setenv("QUANTZOO_MIRROR", server.url)
        record = _run(tmp_path, TARGET, "checkpoint=download")
    fetched = sorted(path for path, _ in server.requests)
    assert fetched == sorted(published["files"])  # the manifest and the three artifacts, each once

    _assert_same_numbers(original, record)
    assert record["metrics"]["quantsim"]["predictions_sha256"] == original["metrics"]["quantsim"]["predictions_sha256"]
    # calibration (and export) did not run; loading did, and the record says so
    assert "calibrate" not in record["timings"] and "export" not in record["timings"]
    assert {"fetch_checkpoint", "load_checkpoint", "eval_quantsim", "eval_onnxruntime"} <= set(record["timings"])
    assert set(record["skipped_stages"]) == {"calibrate", "export"}
    assert record["provenance"]["calibration_sample_ids"] == []
    shas = {kind: artifact["sha256"] for kind, artifact in original["artifacts"].items()}
    assert record["provenance"]["quantized_checkpoint_sha256"] == shas
    assert record["source"]["kind"] == "published_checkpoint" and record["source"]["checkpoint"] == "download"
    assert record["source"]["published_run_id"] == original["run_id"] and record["source"]["sha256"] == shas
    assert record["source"]["location"].startswith(server.url)
    # ONNX Runtime evaluated the published file itself
    assert {kind: a["sha256"] for kind, a in record["artifacts"].items()} == shas
    assert sha256_file(record["artifacts"]["onnx"]["path"]) == shas["onnx"]

    # offline, from the verified cache: no server, same numbers
    monkeypatch.delenv("QUANTZOO_MIRROR")
    monkeypatch.setenv("QUANTZOO_OFFLINE", "1")
    _assert_same_numbers(original, _run(tmp_path, TARGET, "checkpoint=download"))


@pytest.mark.parametrize("where", ["root", "folder", "manifest"])
def test_run_from_published_folder_reproduces_the_run(where, published, tmp_path):
    source = {"root": published["root"], "folder": published["folder"],
              "manifest": published["folder"] / "manifest.json"}[where]
    record = _run(tmp_path, TARGET, f"checkpoint={source}")
    _assert_same_numbers(published["record"], record)
    assert record["source"]["location"] == str(published["folder"].resolve())


def _same_sims(record: dict, published: PublishedArtifacts, source: str):
    """(calibrated like the run, loaded from the checkpoint onto the FP32 net, loaded onto a random net)."""
    config = record["provenance"]["config"]
    card = default_registry().get(record["model"])
    calibration, evaluation = recipe_datasets(card, config["data"])
    assert list(calibration.sample_ids) == record["provenance"]["calibration_sample_ids"]
    example = calibration[0][0].unsqueeze(0)
    calibrated = QuantSim(build_fp32_model(card), example, quant_config(config["quant"]))
    loader = torch.utils.data.DataLoader(calibration, batch_size=config["data"]["calibration_batch_size"], shuffle=False)
    calibrated.calibrate(loader, progress=False)
    loaded = QuantSim(build_fp32_model(card), example, quant_config(config["quant"]))
    load_published_checkpoint(loaded, published, source)
    torch.manual_seed(1234)  # different weights and biases: the checkpoint alone must decide the model
    from_random = QuantSim(build_architecture(card).eval(), example, quant_config(config["quant"]))
    load_published_checkpoint(from_random, published, source)
    inputs = torch.stack([evaluation[i][0] for i in range(len(evaluation))])
    return calibrated, loaded, from_random, inputs


def _assert_bit_for_bit(calibrated: QuantSim, others: list[QuantSim], inputs: torch.Tensor) -> None:
    with torch.no_grad():
        expected = calibrated.model(inputs)
        for sim in others:
            assert torch.equal(sim.model(inputs), expected)
            for name, quantizer in calibrated.quantizers().items():
                other = sim.quantizers()[name]
                assert torch.equal(other.scale, quantizer.scale) and torch.equal(other.zero_point, quantizer.zero_point), name
            for name, module in calibrated.weight_modules().items():
                assert torch.equal(sim.weight_modules()[name].quantized_weight(), module.quantized_weight()), name
                assert torch.equal(sim.weight_modules()[name].bias, module.bias), name


def test_published_w8a8_checkpoint_rebuilds_the_simulated_model_bit_for_bit(published):
    card = default_registry().get(MODEL)
    source = str(published["folder"])
    artifacts = fetch_published(card, RECIPE, source)
    calibrated, loaded, from_random, inputs = _same_sims(published["record"], artifacts, source)
    _assert_bit_for_bit(calibrated, [loaded, from_random], inputs)
    assert json.loads(json.dumps(calibrated.encodings())) == json.loads(artifacts.paths["encodings"].read_text())


def test_corrupted_download_is_refused_with_a_clear_error(published, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "cache"))
    files = dict(published["files"])
    name = next(k for k in files if k.endswith(".safetensors"))
    files[name] = files[name][:-1] + bytes([files[name][-1] ^ 0xFF])
    with ArtifactServer(files=files) as server:
        monkeypatch.setenv("QUANTZOO_MIRROR", server.url)
        err = _fails(tmp_path, capsys, TARGET, "checkpoint=download")
    assert "sha256 mismatch" in err and name.rsplit("/", 1)[-1] in err
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # the bad bytes were not kept


def test_corrupted_local_artifact_is_refused_and_left_in_place(published, tmp_path, capsys):
    folder = shutil.copytree(published["folder"], tmp_path / "pub")
    onnx = next(folder.glob("*.onnx"))
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    err = _fails(tmp_path, capsys, TARGET, f"checkpoint={folder}")
    assert "sha256 mismatch" in err and onnx.name in err and onnx.is_file()
    onnx.unlink()
    err = _fails(tmp_path, capsys, TARGET, f"checkpoint={folder}")
    assert onnx.name in err and "missing" in err


def test_missing_and_foreign_sources_are_clear_errors(published, tmp_path, capsys):
    assert "does not exist" in _fails(tmp_path, capsys, TARGET, f"checkpoint={tmp_path / 'nowhere'}")
    err = _fails(tmp_path, capsys, TARGET, f"checkpoint={tmp_path}")
    assert "manifest.json" in err and "quantzoo publish" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    assert "not a readable JSON manifest" in _fails(tmp_path, capsys, TARGET, f"checkpoint={tmp_path / 'broken'}")


def test_artifacts_of_another_recipe_are_refused_naming_the_setting(published, tmp_path, capsys):
    folder = published["folder"]
    err = _fails(tmp_path, capsys, f"{MODEL}/w4a8", f"checkpoint={folder}")
    assert f"holds {MODEL}/{RECIPE} artifacts" in err and f"{MODEL}/w4a8" in err
    err = _fails(tmp_path, capsys, TARGET, f"checkpoint={folder}", "quant.weight_bits=4")
    assert err.startswith("quantzoo: error: quant.weight_bits=4 but") and "quant.weight_bits=8" in err
    err = _fails(tmp_path, capsys, TARGET, f"checkpoint={folder}", "quant.activation_observer=percentile")
    assert "quant.activation_observer='percentile'" in err
    # the publish root holds no w4a8 folder
    err = _fails(tmp_path, capsys, f"{MODEL}/w4a8", f"checkpoint={published['root']}")
    assert f"{MODEL}/w4a8/manifest.json" in err


def _without_manifest(published) -> PublishedArtifacts:
    manifest = published["manifest"]
    paths = {kind: published["folder"] / entry["filename"] for kind, entry in manifest["artifacts"].items()}
    return PublishedArtifacts(location=str(published["folder"]), paths=paths, manifest=None,
                              sha256={kind: entry["sha256"] for kind, entry in manifest["artifacts"].items()})


@pytest.mark.parametrize("setting, value", [("weight_bits", 4), ("activation_bits", 16), ("weight_observer", "mse")])
def test_without_a_manifest_the_encodings_name_the_mismatched_setting(setting, value, published):
    """Card-listed artifacts come without a manifest: the encodings' quantizer specs are checked instead."""
    card = default_registry().get(MODEL)
    quant = dict(published["record"]["provenance"]["config"]["quant"], **{setting: value})
    sim = QuantSim(build_fp32_model(card), torch.zeros(1, 1, 8, 8), quant_config(quant))
    with pytest.raises(RunConfigError, match=rf"^quant\.{setting} gives quantizer .* but checkpoint=x was published with"):
        load_published_checkpoint(sim, _without_manifest(published), "x")


def test_encodings_that_disagree_with_the_weights_are_refused(published, tmp_path):
    artifacts = _without_manifest(published)
    encodings = json.loads(artifacts.paths["encodings"].read_text())
    name = sorted(encodings["activation_encodings"])[0]
    encodings["activation_encodings"][name][0]["scale"] *= 2
    changed = tmp_path / "changed.encodings.json"
    changed.write_text(json.dumps(encodings))
    artifacts = dataclasses.replace(artifacts, paths={**artifacts.paths, "encodings": changed})
    sim = QuantSim(build_fp32_model(default_registry().get(MODEL)), torch.zeros(1, 1, 8, 8),
                   quant_config(published["record"]["provenance"]["config"]["quant"]))
    with pytest.raises(RunConfigError, match="give different encodings"):
        load_published_checkpoint(sim, artifacts, "x")


def test_card_listed_artifacts_download_without_a_manifest(published, tmp_path, monkeypatch):
    """The trusted path: the card lists the artifacts' sha256, so no manifest is fetched."""
    card = default_registry().get(MODEL)
    listed = tuple(PublishedArtifact(recipe=RECIPE, kind=kind, filename=entry["filename"], sha256=entry["sha256"])
                   for kind, entry in sorted(published["manifest"]["artifacts"].items()))
    registry = ModelRegistry()
    registry.register(dataclasses.replace(card, artifacts=listed))
    monkeypatch.setattr("zoo.cli.run.default_registry", lambda: registry)
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "cache"))
    files = {k: v for k, v in published["files"].items() if not k.endswith("manifest.json")}
    with ArtifactServer(files=files) as server:
        monkeypatch.setenv("QUANTZOO_MIRROR", server.url)
        record = _run(tmp_path, TARGET, "checkpoint=download")
    assert not any(path.endswith("manifest.json") for path, _ in server.requests)
    assert record["source"]["published_run_id"] is None
    _assert_same_numbers(published["record"], record)


@pytest.mark.slow
def test_mnist_cnn_w8a8_round_trip_through_publish_and_checkpoint(tmp_path):
    """Conv + folded BatchNorm: run, publish, run from the folder; same numbers, same model bit for bit."""
    target = "mnist_cnn/w8a8_per_channel"
    original = _run(tmp_path, target)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["publish", target, "--to", "pub"]) == 0
    finally:
        os.chdir(cwd)
    folder = tmp_path / "pub" / "mnist_cnn" / "w8a8_per_channel"
    _assert_same_numbers(original, _run(tmp_path, target, f"checkpoint={folder}"))
    artifacts = fetch_published(default_registry().get("mnist_cnn"), "w8a8_per_channel", str(folder))
    calibrated, loaded, from_random, inputs = _same_sims(original, artifacts, str(folder))
    assert calibrated.folded_batch_norms
    _assert_bit_for_bit(calibrated, [loaded, from_random], inputs)

