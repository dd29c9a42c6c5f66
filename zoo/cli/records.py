"""Run records: the JSON document one `quantzoo run` leaves behind, with its provenance.

A record holds metrics, per-stage timings, artifacts with sha256, and the provenance needed to
trust and repeat the run (resolved config, git sha and dirty flag, package versions, platform,
CPU/GPU, threads, seed, dataset fingerprints, calibration sample ids, FP32 checkpoint sha256 and,
for a run started from published artifacts, their sha256). ``source`` says whether the simulated
model was calibrated or loaded, and ``skipped_stages`` why a stage did not run.
Records are written atomically, under a unique run id, so parallel runs never clobber each other.

A run's plots and logs go to a staging folder, ``runs/.partial/<run_id>/``, while it runs;
:func:`publish_run_folder` moves it to ``runs/<run_id>/`` just before the record is written, so a
killed run leaves neither a record nor a run folder in ``runs/`` (only its staging folder, which
git ignores).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from quantlib.io import atomic_write_text

RECORD_SCHEMA_VERSION = 1
PARTIAL_DIR = ".partial"
_PACKAGES = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "hydra-core", "numpy", "safetensors", "quantzoo")


def new_run_id(model: str, recipe: str) -> str:
    """``<model>__<recipe>__<UTC timestamp>__<8 random hex>``: unique across parallel workers."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{model}__{recipe}__{stamp}__{uuid.uuid4().hex[:8]}"


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    """CPU, GPU and thread facts of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu}


def predictions_sha256(predictions: list[int]) -> str:
    """sha256 of the top-1 predictions (dataset order) as compact JSON: equal digests, equal predictions."""
    return hashlib.sha256(json.dumps([int(p) for p in predictions], separators=(",", ":")).encode()).hexdigest()


def provenance(config: dict[str, Any], *, seed: int, dataset_fingerprints: dict[str, str],
               calibration_sample_ids: list[str], checkpoint_sha256: str,
               quantized_checkpoint_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """The provenance block of a run record.

    ``checkpoint_sha256`` is the FP32 weights' sha256; ``quantized_checkpoint_sha256`` maps each
    published artifact a run loaded instead of calibrating (kind -> sha256), None when it calibrated.
    """
    return {
        "config": config,
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hardware": hardware(),
        "seed": seed,
        "dataset_fingerprint": dataset_fingerprints,
        "calibration_sample_ids": calibration_sample_ids,
        "checkpoint_sha256": checkpoint_sha256,
        "quantized_checkpoint_sha256": quantized_checkpoint_sha256,
    }


def write_record(record: dict[str, Any], runs_dir: Path) -> Path:
    """Write ``record`` to ``runs_dir/<run_id>.json`` atomically; returns the path."""
    record = {"schema_version": RECORD_SCHEMA_VERSION, **record}
    path = Path(runs_dir) / f"{record['run_id']}.json"
    return atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def staging_folder(runs_dir: Path, run_id: str) -> Path:
    """Where a run writes its plots and logs until its record lands (not created here)."""
    return Path(runs_dir) / PARTIAL_DIR / run_id


def _replace_prefix(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + os.sep) else value
    if isinstance(value, dict):
        return {k: _replace_prefix(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_prefix(v, old, new) for v in value]
    return value


def publish_run_folder(record: dict[str, Any], runs_dir: Path) -> dict[str, Any]:
    """Move the run's staging folder to ``runs_dir/<run_id>/``; returns ``record`` with every path
    that pointed into the staging folder pointing into the final one (nothing to move: unchanged).
    """
    staging = staging_folder(runs_dir, record["run_id"])
    if not staging.exists():
        return record
    final = Path(runs_dir) / record["run_id"]
    os.replace(staging, final)
    return _replace_prefix(record, str(staging), str(final))
