"""The spill store cleans up after runs that were killed before they could delete their folder."""

import os
import subprocess
import sys

import torch

from quantlib.ptq.chunk_store import ChunkStore, remove_orphaned_spill_folders


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_spilling_removes_folders_left_by_killed_processes_and_keeps_live_ones(tmp_path):
    orphan = tmp_path / f"quantlib-cache-{_exited_pid()}-abcd1234"
    live = tmp_path / f"quantlib-cache-{os.getppid()}-efgh5678"
    unrelated = tmp_path / "quantlib-cache-yrwb8vaj"  # the pre-pid naming: never guessed at
    for folder in (orphan, live, unrelated):
        folder.mkdir()
        (folder / "0.npy").write_bytes(b"x" * 1024)

    with ChunkStore(0, str(tmp_path)) as store:
        store.append("x", torch.ones(4))  # budget 0: the first chunk spills and opens a folder
        own = [p for p in tmp_path.iterdir() if p.name.startswith(f"quantlib-cache-{os.getpid()}-")]
        assert len(own) == 1 and any(own[0].iterdir())
        assert torch.equal(store.get("x", 0), torch.ones(4))
        assert not orphan.exists()
        assert live.exists() and unrelated.exists()
    assert not own[0].exists()  # closed normally: its own folder is gone too
    assert remove_orphaned_spill_folders(tmp_path) == []
