"""Tests for zoo.hub (download/cache/verify) and zoo.safe_load, against a real local HTTP server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from zoo import hub
from zoo.hub import (
    ArtifactNotFoundError,
    ChecksumMismatchError,
    DownloadError,
    HubError,
    OfflineError,
    cached_artifact,
    fetch,
)
from zoo.safe_load import load_state_dict, save_safetensors

from hub_server import ArtifactServer

UNREACHABLE = "https://hub.invalid/quantzoo/"
PAYLOAD = bytes(range(256)) * 257  # 65,792 bytes, deterministic
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
REL = "models/tiny/weights.bin"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Own cache per test; no mirror/offline/proxy leaking in from the outer environment."""
    home = tmp_path / "home"
    monkeypatch.setenv("QUANTZOO_HOME", str(home))
    for var in ("QUANTZOO_MIRROR", "QUANTZOO_OFFLINE", "http_proxy", "https_proxy",
                "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


@pytest.fixture
def server():
    with ArtifactServer(files={"/" + REL: PAYLOAD}) as srv:
        yield srv


def _get(**kwargs) -> Path:
    kwargs.setdefault("base_url", UNREACHABLE)
    kwargs.setdefault("sha256", PAYLOAD_SHA)
    kwargs.setdefault("progress", False)
    return cached_artifact(REL, **kwargs)


# 1. success through a mirror that replaces an unreachable base


def test_mirror_replaces_base_and_download_is_verified(server, _isolated_env):
    path = _get(mirror=server.url)
    assert path == _isolated_env / REL
    assert path.read_bytes() == PAYLOAD
    assert hub.sha256_file(path) == PAYLOAD_SHA
    assert server.requests == [("/" + REL, None)]
    assert not path.with_suffix(".bin.part").exists()


def test_progress_bar_enabled_download(server, tmp_path):
    dest = tmp_path / "out" / "w.bin"
    assert fetch(server.url + REL, dest, PAYLOAD_SHA, progress=True) == dest
    assert dest.read_bytes() == PAYLOAD


# 2. resume after a cut connection


def test_resume_after_cut_connection(server, tmp_path):
    half = len(PAYLOAD) // 2
    server.cut_after_bytes = half
    dest = tmp_path / "w.bin"
    fetch(server.url + REL, dest, PAYLOAD_SHA, backoff=0.01, progress=False)
    assert server.requests == [("/" + REL, None), ("/" + REL, f"bytes={half}-")]
    assert dest.read_bytes() == PAYLOAD
    assert not Path(str(dest) + ".part").exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.cut_after_bytes = 1000
    server.ignore_range = True
    dest = tmp_path / "w.bin"
    fetch(server.url + REL, dest, PAYLOAD_SHA, backoff=0.01, progress=False)
    assert server.requests[1] == ("/" + REL, "bytes=1000-")
    assert dest.read_bytes() == PAYLOAD


def test_stale_part_file_is_resumed_then_redownloaded_fresh(server, tmp_path):
    dest = tmp_path / "w.bin"
    Path(str(dest) + ".part").write_bytes(b"\x00" * 100)  # garbage from another version
    fetch(server.url + REL, dest, PAYLOAD_SHA, backoff=0.01, progress=False)
    assert [r[1] for r in server.requests] == ["bytes=100-", None]
    assert dest.read_bytes() == PAYLOAD


def test_5xx_is_retried_then_succeeds(server, tmp_path):
    server.fail_requests = 2
    dest = fetch(server.url + REL, tmp_path / "w.bin", PAYLOAD_SHA, backoff=0.01, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 3


def test_persistent_failure_raises_download_error_and_keeps_part(server, tmp_path):
    server.cut_after_bytes = 10
    server.cut_requests = 100
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError) as info:
        fetch(server.url + REL, dest, PAYLOAD_SHA, retries=2, backoff=0.01, progress=False)
    assert server.url + REL in str(info.value)
    assert len(server.requests) == 3
    assert not dest.exists()
    assert Path(str(dest) + ".part").stat().st_size == 30  # kept for a later resume


# 3. corrupted bytes


def test_corrupted_download_is_refused_and_removed(server, _isolated_env):
    server.corrupt = True
    with pytest.raises(ChecksumMismatchError) as info:
        _get(mirror=server.url)
    msg = str(info.value)
    assert PAYLOAD_SHA in msg and "removed" in msg
    dest = _isolated_env / REL
    assert not dest.exists()
    assert not Path(str(dest) + ".part").exists()


# 4. 404


def test_404_not_retried(server):
    with pytest.raises(ArtifactNotFoundError) as info:
        cached_artifact("missing/x.bin", base_url=server.url, sha256=PAYLOAD_SHA, progress=False)
    assert server.url + "missing/x.bin" in str(info.value)
    assert "QUANTZOO_MIRROR" in str(info.value)
    assert len(server.requests) == 1


# 5. offline mode and verification on every load


def test_offline_uses_cache_without_network(server, monkeypatch):
    first = _get(mirror=server.url)
    assert len(server.requests) == 1
    assert _get(mirror=server.url, offline=True) == first
    monkeypatch.setenv("QUANTZOO_OFFLINE", "1")
    assert _get(mirror=server.url) == first
    assert len(server.requests) == 1


def test_offline_missing_file_raises(server, monkeypatch):
    with pytest.raises(OfflineError) as info:
        _get(mirror=server.url, offline=True)
    assert "weights.bin" in str(info.value) and "QUANTZOO_HOME" in str(info.value)
    monkeypatch.setenv("QUANTZOO_OFFLINE", "1")
    with pytest.raises(OfflineError):
        _get(mirror=server.url)
    assert server.requests == []


def test_corrupted_cache_detected_on_next_load(server):
    path = _get(mirror=server.url)
    path.write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(ChecksumMismatchError):
        _get(mirror=server.url, offline=True)
    assert not path.exists()
    # online: a corrupted cache file is replaced by a fresh download
    _get(mirror=server.url)
    path.write_bytes(b"tampered")
    assert _get(mirror=server.url).read_bytes() == PAYLOAD
    assert len(server.requests) == 3


# 6. file:// URLs


def test_file_url_base_and_file_mirror(tmp_path):
    src_root = tmp_path / "mirror dir"
    (src_root / REL).parent.mkdir(parents=True)
    (src_root / REL).write_bytes(PAYLOAD)
    base = src_root.as_uri()
    assert cached_artifact(REL, base_url=base, sha256=PAYLOAD_SHA, progress=False,
                           cache_dir=tmp_path / "c1").read_bytes() == PAYLOAD
    via_mirror = cached_artifact(REL, base_url=UNREACHABLE, sha256=PAYLOAD_SHA, progress=False,
                                 mirror=base + "/", cache_dir=tmp_path / "c2")
    assert via_mirror.read_bytes() == PAYLOAD
    with pytest.raises(ArtifactNotFoundError):
        cached_artifact("nope.bin", base_url=base, sha256=PAYLOAD_SHA, progress=False)
    (src_root / REL).write_bytes(b"bad")
    with pytest.raises(ChecksumMismatchError):
        cached_artifact(REL, base_url=base, sha256=PAYLOAD_SHA, progress=False,
                        cache_dir=tmp_path / "c3")
    assert list((tmp_path / "c3").rglob("*.bin*")) == []


# 7. QUANTZOO_MIRROR


def test_env_mirror_is_honoured(server, monkeypatch):
    monkeypatch.setenv("QUANTZOO_MIRROR", server.url.rstrip("/"))
    assert _get().read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_resolve_url_rules(monkeypatch):
    assert hub.resolve_url("https://h/q", "a/b.pt") == "https://h/q/a/b.pt"
    assert hub.resolve_url("https://h/q/", "a/b.pt") == "https://h/q/a/b.pt"
    assert hub.resolve_url("https://h/q/", "a/b.pt", mirror="http://m:1/x") == "http://m:1/x/a/b.pt"
    monkeypatch.setenv("QUANTZOO_MIRROR", "file:///srv/m/")
    assert hub.resolve_url("https://h/q/", "a b.pt") == "file:///srv/m/a%20b.pt"
    assert hub.resolve_url("https://h/q/", "a.pt", mirror="https://x/") == "https://x/a.pt"
    with pytest.raises(ValueError, match="ftp"):
        hub.resolve_url("ftp://h/", "a.pt", mirror="ftp://h/")


# validation, helpers


@pytest.mark.parametrize("bad", ["../evil.bin", "a/../../evil.bin", "/etc/passwd", ""])
def test_paths_escaping_cache_rejected(bad):
    with pytest.raises(ValueError, match="relative path"):
        cached_artifact(bad, base_url=UNREACHABLE, sha256=PAYLOAD_SHA)


def test_sha256_validated():
    with pytest.raises(ValueError, match="sha256"):
        cached_artifact(REL, base_url=UNREACHABLE, sha256="abc")


def test_sha_tag_helpers(server):
    name = hub.sha_tagged_name("tiny", PAYLOAD_SHA, ".bin")
    assert name == f"tiny-{PAYLOAD_SHA[:8]}.bin"
    assert hub.check_sha_tag(name, PAYLOAD_SHA) == PAYLOAD_SHA[:8]
    assert hub.check_sha_tag("plain.bin", PAYLOAD_SHA) is None
    with pytest.raises(ValueError, match="tagged"):
        hub.check_sha_tag("tiny-00000000.bin", PAYLOAD_SHA)
    with pytest.raises(ValueError, match="tagged"):
        cached_artifact("tiny-00000000.bin", base_url=server.url, sha256=PAYLOAD_SHA)
    assert server.requests == []


def test_atomic_helpers(tmp_path):
    target = tmp_path / "runs" / "r.json"
    hub.atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    hub.atomic_copy(target, tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == b"{}"
    with pytest.raises(RuntimeError):
        with hub.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]


def test_cache_root_reads_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "x"))
    assert hub.cache_root() == tmp_path / "x"
    monkeypatch.delenv("QUANTZOO_HOME")
    assert hub.cache_root() == Path("~/.cache/quantzoo").expanduser()


# 8. safe_load


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.arange(3, dtype=torch.int64)}


def test_safetensors_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    sha = save_safetensors(_tensors(), path, metadata={"arch": "tiny"})
    assert sha == hub.sha256_file(path)
    loaded = load_state_dict(path, sha256=sha)
    assert loaded.keys() == _tensors().keys()
    for k, v in _tensors().items():
        assert torch.equal(loaded[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    with pytest.raises(ChecksumMismatchError):
        load_state_dict(path, sha256="0" * 64)
    assert path.exists()  # a user's file is refused, not deleted


def test_pt_state_dict_and_wrapped(tmp_path):
    torch.save(_tensors(), tmp_path / "a.pt")
    torch.save({"state_dict": _tensors(), "epoch": 3}, tmp_path / "b.pth")
    torch.save({"model": _tensors()}, tmp_path / "c.bin")
    for name in ("a.pt", "b.pth", "c.bin"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == {"w", "b"} and torch.equal(loaded["w"], _tensors()["w"])


class _Payload:
    """Pickles to a call of builtins.open that would create ``marker`` on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_object_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, path)
    # sanity: full unpickling really would run the payload
    torch.load(path, weights_only=False)["x"].close()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(HubError, match="pickled objects"):
        load_state_dict(path)
    assert not marker.exists()


def test_unknown_extension_rejected(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"m\.ckpt.*\.safetensors"):
        load_state_dict(path)


def test_hub_does_not_import_torch():
    import subprocess
    import sys

    # load hub.py on its own so the check is independent of zoo/__init__.py
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('hub_only', {hub.__file__!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'torch' not in sys.modules, 'zoo.hub imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
