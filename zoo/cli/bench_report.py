"""Benchmark rows, the per-machine CSV they are appended to, and the text table `quantzoo bench` prints.

One row is one measured quantity: ``(model, recipe, device, stage, metric)`` with its unit, the
median, min and max over ``repeats``, the number of samples it covers, a note, the id of the
bench invocation that measured it, and the facts of the machine (CPU, cores, GPU, threads,
load average, versions, git state). ``results/bench/<machine>.csv`` is a log: every
``quantzoo bench`` appends its rows under a new ``bench_id`` and never rewrites older ones; a
reader wanting the latest figure takes the newest ``measured_at`` per key.

Appending is atomic and safe under concurrent runs: the writer holds an exclusive
:class:`filelock.FileLock` on ``<csv>.lock`` while it reads the file, adds its rows and replaces
the file with :func:`quantlib.io.atomic_write_text` (temporary file, fsync, rename). A reader
never sees a half-written file and two benches appending at once both keep their rows.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from filelock import FileLock

from quantlib.io import atomic_write_text

from .bench_measure import Stat

MEASURE_COLUMNS = ("model", "recipe", "device", "stage", "metric", "unit", "median", "min", "max", "repeats",
                   "samples", "note")
MACHINE_COLUMNS = ("machine", "cpu", "cpu_count", "gpu", "torch_threads", "load_avg_1m", "onnxruntime_providers",
                   "platform", "python", "torch", "onnxruntime", "git_sha", "git_dirty")
COLUMNS = ("bench_id", "measured_at", "machine", *MEASURE_COLUMNS, *MACHINE_COLUMNS[1:])
LOCK_TIMEOUT_S = 120.0  # an append takes milliseconds; a lock held this long is a stuck writer


class BenchCsvError(RuntimeError):
    """The bench CSV cannot be appended to; the message names the file and the fix."""


@dataclass(frozen=True)
class BenchRow:
    """One measured quantity of one stage on one device."""

    device: str
    stage: str
    metric: str
    unit: str
    stat: Stat
    samples: int | None = None
    note: str = ""


def _number(value: float) -> str:
    """Whole numbers (byte counts) exactly, others to 6 significant digits."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def row_dicts(rows: Iterable[BenchRow], *, model: str, recipe: str, machine: dict[str, Any], bench_id: str,
              measured_at: str) -> list[dict[str, str]]:
    """CSV dicts (every value as text) of ``rows`` with the bench id, model, recipe and machine columns."""
    facts = {c: "" if machine.get(c) is None else str(machine.get(c)) for c in MACHINE_COLUMNS}
    out = []
    for row in rows:
        out.append({**facts, "bench_id": bench_id, "measured_at": measured_at, "model": model, "recipe": recipe,
                    "device": row.device, "stage": row.stage, "metric": row.metric, "unit": row.unit,
                    "median": _number(row.stat.median), "min": _number(row.stat.min), "max": _number(row.stat.max),
                    "repeats": str(row.stat.repeats), "samples": "" if row.samples is None else str(row.samples),
                    "note": row.note})
    return out


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a bench CSV, in file order (empty when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _csv_text(rows: Sequence[dict[str, str]], *, header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def append_csv(path: str | Path, rows: Sequence[dict[str, str]], *, timeout: float = LOCK_TIMEOUT_S,
               then: Callable[[str], None] | None = None) -> Path:
    """Append ``rows`` (dicts with exactly :data:`COLUMNS`) to the CSV at ``path``; returns the path.

    Creates the file with a header when it does not exist. Raises :class:`BenchCsvError` when
    the existing header is not :data:`COLUMNS` (a file from another quantzoo version) or when
    the lock is not acquired within ``timeout`` seconds. ``then`` is called with the new text of
    the whole CSV while the lock is still held, so a view rendered from it (the bench summary)
    always matches the CSV even when benches append at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(f"{path}.lock", timeout=timeout):
            existing = path.read_text(encoding="utf-8") if path.is_file() else ""
            if existing:
                found = tuple(next(csv.reader(io.StringIO(existing)), []))
                if found != COLUMNS:
                    raise BenchCsvError(f"{path} has columns {','.join(found)}, not this quantzoo's "
                                        f"{','.join(COLUMNS)}; move the file aside or pass --out DIR")
                if not existing.endswith("\n"):
                    existing += "\n"
            text = existing + _csv_text(rows, header=not existing)
            atomic_write_text(path, text)
            if then is not None:
                then(text)
    except TimeoutError:  # filelock.Timeout subclasses TimeoutError
        raise BenchCsvError(f"{path}.lock stayed locked for {timeout:.0f} s; another bench is stuck writing "
                            f"{path.name}: stop it, or delete the lock file if no bench is running") from None
    return path


def _find(rows: Sequence[BenchRow], device: str, stage: str, metric: str) -> BenchRow | None:
    return next((r for r in rows if (r.device, r.stage, r.metric) == (device, stage, metric)), None)


def _cell(row: BenchRow | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if row is None else format(row.stat.median * scale, fmt)


def format_table(rows: Sequence[BenchRow], *, title: str) -> str:
    """Torch stages per device (median, min..max, n), then ONNX FP32 next to int8 on each device."""
    lines = [title]
    for device in dict.fromkeys(r.device for r in rows):
        torch_rows = [r for r in rows if r.device == device and r.stage.startswith("torch_")]
        if torch_rows:
            lines.append(f"[{device}] torch stages (median over repeats; min..max)")
            for r in torch_rows:
                lines.append(f"  {r.stage:<24}{r.metric:<26}{r.stat.median:>12.4g} {r.unit:<10}"
                             f"({r.stat.min:.4g}..{r.stat.max:.4g}, n={r.stat.repeats})")
        stages = [s for s in dict.fromkeys(r.stage for r in rows if r.device == device) if s.startswith("onnx_")]
        if stages:
            fp32_latency = _find(rows, device, "onnx_fp32", "latency_b1")
            lines.append(f"[{device}] ONNX Runtime (median over repeats)")
            lines.append(f"  {'model':<14}{'size MiB':>10}{'b1 ms':>10}{'vs fp32':>9}{'b32 img/s':>11}{'peak RSS MiB':>14}")
            for stage in stages:
                latency = _find(rows, device, stage, "latency_b1")
                ratio = ("-" if latency is None or fp32_latency is None
                         else f"{latency.stat.median / fp32_latency.stat.median:.2f}x")
                lines.append(f"  {stage:<14}{_cell(_find(rows, device, stage, 'file_size'), '.3f', 1 / (1024 * 1024)):>10}"
                             f"{_cell(latency, '.3f'):>10}{ratio:>9}"
                             f"{_cell(_find(rows, device, stage, 'throughput_b32'), '.1f'):>11}"
                             f"{_cell(_find(rows, device, stage, 'peak_rss'), '.1f'):>14}")
    return "\n".join(lines)
