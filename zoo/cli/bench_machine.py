"""The machine a benchmark ran on: its facts, and a stable slug that names its results file.

The slug is built from the CPU model and the logical core count, plus the GPU model when there
is one (``amd-epyc-2c``, ``intel-xeon-platinum-8480-16c-nvidia-h100-80gb-hbm3``). It does not
use the host name, so two identical machines share one ``results/bench/<slug>.csv``.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Any

from .records import git_state, hardware, package_versions

_NOISE = re.compile(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*$|\b\d+-core\b", re.IGNORECASE)


def _slug_part(text: str) -> str:
    text = _NOISE.sub(" ", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(info: dict[str, Any]) -> str:
    """``<cpu model>-<cores>c[-<gpu model>]`` in lowercase letters, digits and dashes."""
    parts = [_slug_part(str(info.get("cpu") or "unknown-cpu")) or "unknown-cpu", f"{info.get('cpu_count') or 0}c"]
    if info.get("gpu"):
        parts.append(_slug_part(str(info["gpu"])))
    return "-".join(p for p in parts if p)


def machine_info() -> dict[str, Any]:
    """CPU, cores, GPU, torch threads, 1-minute load average, platform, Python, package versions, git state.

    The load average is read when this is called (at the start of a bench): on a shared machine
    it tells how much the other processes may have slowed the timings down.
    """
    info = dict(hardware())
    info["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    packages = package_versions()
    try:
        import onnxruntime

        info["onnxruntime_providers"] = ",".join(onnxruntime.get_available_providers())
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        info["onnxruntime_providers"] = ""
    git = git_state()
    info.update({
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": packages.get("torch"),
        "onnxruntime": packages.get("onnxruntime"),
        "git_sha": git["sha"],
        "git_dirty": git["dirty"],
    })
    info["machine"] = machine_slug(info)
    return info
