"""A byte-bounded store for cached activation chunks, spilling to disk past its budget.

:class:`ChunkStore` keeps values keyed by (name, chunk index). Up to ``max_resident_bytes`` of
tensors stay in memory; the rest are written to ``.npy`` files in a temporary folder and read
back through memory maps, so :func:`take` of a random crop reads only the pages it needs. The
layer-wise PTQ caches (:mod:`quantlib.ptq.layer_cache`) hold every cached value here.

The spill folder is named ``quantlib-cache-<pid>-<random>``. A normal exit or an exception
deletes it; a killed process (SIGKILL, OOM) cannot, and a layer-wise run's folder can hold
tens of GB. So a store that opens a spill folder first deletes its siblings whose owning
process no longer exists (:func:`remove_orphaned_spill_folders`).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# dtypes that spill to .npy; anything else stays resident (rare: index tensors, bf16)
_SPILLABLE = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool}


_SPILL_PREFIX = "quantlib-cache-"
_SPILL_NAME = re.compile(rf"^{_SPILL_PREFIX}(\d+)-")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphaned_spill_folders(root: str | Path | None = None) -> list[Path]:
    """Delete the spill folders under ``root`` (default: the system temp dir) whose owning
    process has exited, and return them.

    Only folders named ``quantlib-cache-<pid>-...`` are considered; a folder whose pid is alive
    (including a reused pid) is kept, so a live run's cache is never touched.
    """
    root = Path(root if root is not None else tempfile.gettempdir())
    removed = []
    for folder in root.glob(f"{_SPILL_PREFIX}*"):
        match = _SPILL_NAME.match(folder.name)
        if not folder.is_dir() or match is None or _process_exists(int(match.group(1))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclass
class _Spilled:
    path: Path
    device: torch.device
    dtype: torch.dtype


class ChunkStore:
    """Values keyed by (name, chunk index); resident up to a byte budget, the rest spilled to disk.

    Only plain tensors of common dtypes are spilled; other values (Python numbers, tuples, shapes)
    are small and always stay resident. Use as a context manager, or call :meth:`close` to delete
    the spill folder.
    """

    def __init__(self, max_resident_bytes: int, spill_dir: str | None = None) -> None:
        self.max_resident_bytes = int(max_resident_bytes)
        self._spill_root = spill_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._entries: dict[str, list[Any]] = {}
        self._counter = itertools.count()
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.spilled_bytes = 0

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop everything and delete the spill folder."""
        for key in list(self._entries):
            self.drop(key)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def num_chunks(self, key: str) -> int:
        """How many chunks ``key`` holds."""
        return len(self._entries[key])

    def append(self, key: str, value: Any) -> None:
        """Store ``value`` as the next chunk of ``key``."""
        size = _nbytes(value)
        spillable = isinstance(value, torch.Tensor) and value.dtype in _SPILLABLE
        if spillable and self.resident_bytes + size > self.max_resident_bytes:
            self._entries.setdefault(key, []).append(self._spill(value))
            self.spilled_bytes += size
            return
        self._entries.setdefault(key, []).append(value)
        self.resident_bytes += size
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _spill(self, tensor: torch.Tensor) -> _Spilled:
        if self._tmp is None:
            if self._spill_root is not None:
                Path(self._spill_root).mkdir(parents=True, exist_ok=True)
            remove_orphaned_spill_folders(self._spill_root)
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{_SPILL_PREFIX}{os.getpid()}-", dir=self._spill_root)
        path = Path(self._tmp.name) / f"{next(self._counter)}.npy"
        np.save(path, tensor.detach().cpu().contiguous().numpy())
        return _Spilled(path=path, device=tensor.device, dtype=tensor.dtype)

    def get(self, key: str, index: int) -> Any:
        """Chunk ``index`` of ``key`` as a tensor on its original device (spilled chunks are read back)."""
        entry = self._entries[key][index]
        if isinstance(entry, _Spilled):
            return torch.from_numpy(np.load(entry.path)).to(entry.device)
        return entry

    def view(self, key: str, index: int) -> torch.Tensor | np.ndarray:
        """Chunk ``index`` of ``key`` without reading it: a tensor, or a read-only memory map."""
        entry = self._entries[key][index]
        if isinstance(entry, _Spilled):
            return np.load(entry.path, mmap_mode="r")
        return entry

    def device(self, key: str, index: int) -> torch.device:
        """Device of chunk ``index`` of ``key`` (where :meth:`get` puts it)."""
        return self._entries[key][index].device  # a _Spilled record and a tensor both have .device

    def drop(self, key: str) -> None:
        """Forget ``key`` (and delete its spilled files)."""
        for entry in self._entries.pop(key, []):
            if isinstance(entry, _Spilled):
                entry.path.unlink(missing_ok=True)
            else:
                self.resident_bytes -= _nbytes(entry)


class CachedChunks:
    """Read access to the cached chunks of one layer or region: its inputs (from the quantized
    model), the float reference's inputs and the float targets, chunk by chunk.

    A mixin: the subclass sets ``store``, ``input_key``, ``float_input_key`` and ``target_key``.
    """

    store: ChunkStore
    input_key: str
    float_input_key: str
    target_key: str

    @property
    def num_chunks(self) -> int:
        return self.store.num_chunks(self.input_key)

    def inputs(self, index: int) -> torch.Tensor:
        return self.store.get(self.input_key, index)

    def float_inputs(self, index: int) -> torch.Tensor:
        return self.store.get(self.float_input_key, index)

    def targets(self, index: int) -> torch.Tensor:
        return self.store.get(self.target_key, index)

    def input_view(self, index: int) -> torch.Tensor | np.ndarray:
        return self.store.view(self.input_key, index)

    def float_input_view(self, index: int) -> torch.Tensor | np.ndarray:
        return self.store.view(self.float_input_key, index)

    def target_view(self, index: int) -> torch.Tensor | np.ndarray:
        return self.store.view(self.target_key, index)

    def device(self) -> torch.device:
        return self.store.device(self.input_key, 0)


def take(view: torch.Tensor | np.ndarray, index: tuple, device: torch.device) -> torch.Tensor:
    """``view[index]`` as a tensor on ``device``; reads only the needed part of a memory map."""
    if isinstance(view, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(view[index])).to(device)
    return view[index]
