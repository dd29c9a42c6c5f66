"""Timing and memory primitives for `quantzoo bench`: repeated timings and per-stage peak memory.

* :func:`timed_repeats` runs a callable ``warmup`` times untimed, then times ``repeats`` blocks
  of ``calls`` calls each (optionally measuring the peak memory of each block);
  :func:`calls_for` warms a callable up for a second and picks ``calls`` so that a block lasts
  long enough to time.
* :class:`Stat` is the median, min and max of those repeats.
* :class:`PeakRss` measures the peak resident set size of this process over a block. On Linux
  the kernel's high-water mark is reset at the start of the block (``/proc/self/clear_refs``),
  so the value is the block's own peak; elsewhere it falls back to ``getrusage`` (the peak of
  the whole process so far), and ``scope`` says which one was measured.
* :class:`PeakCudaMemory` does the same for CUDA allocations (``torch.cuda`` peak stats).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Stat:
    """Median, min and max of ``repeats`` values."""

    median: float
    min: float
    max: float
    repeats: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        """Statistics of ``values``; ValueError if there are none."""
        values = [float(v) for v in values]
        if not values:
            raise ValueError("Stat.of needs at least one value; use --repeats >= 1")
        return cls(statistics.median(values), min(values), max(values), len(values))

    @classmethod
    def single(cls, value: float) -> "Stat":
        """A value measured once (a file size, an accuracy)."""
        return cls(float(value), float(value), float(value), 1)

    def scaled(self, factor: float) -> "Stat":
        """Every field multiplied by ``factor`` (> 0), e.g. seconds to milliseconds."""
        return Stat(self.median * factor, self.min * factor, self.max * factor, self.repeats)

    def inverse(self, numerator: float = 1.0) -> "Stat":
        """``numerator / value`` (e.g. seconds per pass to images per second); min and max swap."""
        return Stat(numerator / self.median, numerator / self.max, numerator / self.min, self.repeats)


@dataclass
class Measured:
    """Seconds of each timed repeat and, when measured, the peak memory (MiB) of each repeat.

    ``memory_scope``: ``"stage"`` (peak RSS of the block), ``"process"`` (peak RSS of the
    process so far) or ``"cuda"`` (peak CUDA allocation of the block); empty when not measured.
    """

    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    memory_scope: str = ""

    def extend(self, other: "Measured") -> None:
        """Append ``other``'s repeats to these."""
        self.seconds.extend(other.seconds)
        self.peak_mib.extend(other.peak_mib)
        self.memory_scope = other.memory_scope or self.memory_scope


def timed_repeats(fn: Callable[[], object], *, repeats: int, warmup: int = 1, calls: int = 1,
                  synchronize: Callable[[], None] | None = None,
                  memory: Callable[[], "PeakRss | PeakCudaMemory"] | None = None) -> Measured:
    """Time ``repeats`` blocks of ``calls`` calls of ``fn`` after ``warmup`` untimed calls.

    Each repeat's value is the block time divided by ``calls`` (seconds per call); blocks of
    several calls keep sub-millisecond calls measurable (see :func:`calls_for`).
    ``synchronize`` (e.g. ``torch.cuda.synchronize``) is called before the clock starts and
    before it stops, so asynchronous device work is inside the measurement. ``memory`` makes a
    fresh :class:`PeakRss` / :class:`PeakCudaMemory` around each timed block.
    """
    if repeats < 1:
        raise ValueError(f"--repeats={repeats} must be >= 1")
    if calls < 1:
        raise ValueError(f"calls={calls} must be >= 1")
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    measured = Measured()
    for _ in range(repeats):
        probe = memory() if memory else None
        if probe is not None:
            probe.__enter__()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        measured.seconds.append((time.perf_counter() - start) / calls)
        if probe is not None:
            probe.__exit__(None, None, None)
            measured.peak_mib.append(probe.mib)
            measured.memory_scope = probe.scope
    return measured


def calls_for(fn: Callable[[], object], *, min_seconds: float, warmup_seconds: float = 1.0, max_calls: int = 1000,
              synchronize: Callable[[], None] | None = None) -> int:
    """Warm ``fn`` up, then return the calls per timed block that make a block last about ``min_seconds``.

    The warm-up calls ``fn`` until ``warmup_seconds`` have passed (at least once): on a busy
    machine the first second of a multi-threaded workload can run 100x slower than the rest,
    so a fixed number of warm-up calls is not enough for a model that runs in microseconds.
    The block size comes from the last warm-up call.
    """
    sync = synchronize or (lambda: None)
    sync()
    begin = time.perf_counter()
    while True:
        start = time.perf_counter()
        fn()
        sync()
        now = time.perf_counter()
        if now - begin >= warmup_seconds:
            break
    once = now - start
    return int(min(max_calls, max(1, round(min_seconds / max(once, 1e-9)))))


def _vm_kib(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _rusage_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakRss:
    """``with PeakRss() as peak: ...`` then ``peak.mib``: peak resident memory over the block.

    ``scope`` is ``"stage"`` when the high-water mark could be reset for the block, and
    ``"process"`` when the value is the process's peak since it started.
    """

    def __init__(self) -> None:
        self.mib: float | None = None
        self.scope = "process"

    def __enter__(self) -> "PeakRss":
        try:
            _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            self.scope = "stage" if _vm_kib("VmHWM") is not None else "process"
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc) -> None:
        hwm = _vm_kib("VmHWM") if self.scope == "stage" else None
        self.mib = hwm / 1024 if hwm is not None else _rusage_peak_mib()


class PeakCudaMemory:
    """``with PeakCudaMemory(device) as peak: ...`` then ``peak.mib``: peak CUDA allocation."""

    def __init__(self, device) -> None:
        self.device = device
        self.mib: float | None = None
        self.scope = "cuda"

    def __enter__(self) -> "PeakCudaMemory":
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self.mib = torch.cuda.max_memory_allocated(self.device) / MIB
