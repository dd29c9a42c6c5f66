"""publish -> serve over a local HTTP server -> download through --mirror: success, corruption, 404, offline."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from hub_server import ArtifactServer
from zoo.cli import main
from zoo.hub import sha256_file


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    import os

    cwd = os.getcwd()
    os.chdir(work)
    try:
        main(["run", "digits_mlp/w4a8", "hydra.run.dir=.", "evaluator.progress=false"])
        assert main(["publish", "digits_mlp/w4a8", "--to", str(work / "pub")]) == 0
    finally:
        os.chdir(cwd)
    folder = work / "pub" / "digits_mlp" / "w4a8"
    return {"/" + str(p.relative_to(work / "pub")): p.read_bytes() for p in folder.iterdir()}


def test_publish_writes_sha_tagged_files_and_manifest(published):
    manifest = json.loads(published["/digits_mlp/w4a8/manifest.json"])
    assert set(manifest["artifacts"]) == {"onnx", "encodings", "weights"}
    for entry in manifest["artifacts"].values():
        assert entry["sha256"][:8] in entry["filename"]


def test_download_through_mirror_verifies_and_loads(published, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "cache"))
    with ArtifactServer(files=dict(published)) as server:
        assert main(["download", "digits_mlp/w4a8", "--mirror", server.url, "--to", str(tmp_path / "out")]) == 0
    manifest = json.loads(published["/digits_mlp/w4a8/manifest.json"])
    weights = tmp_path / "out" / manifest["artifacts"]["weights"]["filename"]
    assert sha256_file(weights) == manifest["artifacts"]["weights"]["sha256"]
    tensors = load_file(str(weights))
    assert any(k.endswith(".weight.int4") for k in tensors)  # 4-bit weights stored packed, not as float
    # offline: served from the cache, no server needed
    assert main(["download", "digits_mlp/w4a8", "--offline"]) == 0


def test_corrupted_download_is_refused(published, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "cache"))
    files = dict(published)
    name = next(k for k in files if k.endswith(".safetensors"))
    files[name] = files[name][:-1] + bytes([files[name][-1] ^ 0xFF])
    with ArtifactServer(files=files) as server:
        assert main(["download", "digits_mlp/w4a8", "--mirror", server.url]) == 2
    assert "sha256" in capsys.readouterr().err.lower()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_missing_recipe_on_mirror_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "cache"))
    with ArtifactServer(files={}) as server:
        assert main(["download", "digits_mlp/w4a8", "--mirror", server.url]) == 2
    assert "mirror" in capsys.readouterr().err.lower()


def test_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "cache"))
    assert main(["download", "digits_mlp/w4a8", "--offline"]) == 2
    assert "offline" in capsys.readouterr().err.lower() or "cache" in capsys.readouterr().err.lower()
