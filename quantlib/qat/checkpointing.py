"""Training checkpoints: the full state needed to continue a run exactly where it stopped.

One file, ``<checkpoint_dir>/last.pt``, replaced atomically (written to a temporary file, fsynced,
renamed: :func:`quantlib.io.atomic_output`), so a process killed at any moment leaves either the
previous checkpoint or the new one, never a torn file. It holds the model's state dict (weights,
quantizer encodings and learnable ranges, BN statistics), the optimizer and LR-scheduler states,
the observer tracker, the global step, the position inside the epoch, the running sums of the
current epoch, the finished epochs' metrics, the seconds trained so far and the training config.
The per-step RNG is derived from (seed, step, rank) (:mod:`quantlib.qat.trainer`), so no RNG state
is needed. Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io import atomic_output
from .config import TrainConfig

FORMAT = "quantlib.qat.checkpoint/1"
FILENAME = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run; the message says why and what to do."""


def checkpoint_path(checkpoint_dir: str | Path) -> Path:
    """Where :func:`save_checkpoint` writes in ``checkpoint_dir``."""
    return Path(checkpoint_dir) / FILENAME


def save_checkpoint(checkpoint_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format tag) atomically to ``checkpoint_dir/last.pt``; returns the path."""
    path = checkpoint_path(checkpoint_dir)
    with atomic_output(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return path


def load_checkpoint(checkpoint_dir: str | Path, config: TrainConfig) -> dict[str, Any] | None:
    """The state saved in ``checkpoint_dir``, or None when there is none.

    Raises :class:`CheckpointError` when the file is not a training checkpoint, or was written
    with a training setting that changes the result (naming the first such setting).
    """
    path = checkpoint_path(checkpoint_dir)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"{path} is not a readable training checkpoint ({type(err).__name__}: {err}); "
                              "delete it or set resume=false") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint; delete it or set resume=false")
    differences = config.differences(state["config"])
    if differences:
        key = differences[0]
        raise CheckpointError(
            f"{key}={getattr(config, key)!r} but the checkpoint in {checkpoint_dir} was written with "
            f"{key}={state['config'].get(key)!r}; use the same setting to resume, or set resume=false to start over")
    return state
