"""Shared helpers for the dataset modules: sample selection and fingerprints.

Contract of every dataset built by :func:`evaluators.build_dataset`:

* it is a :class:`torch.utils.data.Dataset` whose items are
  ``(image: torch.float32 tensor (C, H, W), label: int)``;
* ``sample_ids: list[str]`` -- stable ids in dataset order;
* ``num_classes: int``;
* ``fingerprint() -> str`` -- a sha256 hex digest over the sorted sample ids,
  the sample contents (file bytes or array bytes) and the labels. It does not
  depend on preprocessing. It is recomputed on each call (no caching state).

All functions here are pure (they mutate none of their arguments).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from evaluators.errors import EvaluatorConfigError

__all__ = [
    "EvalDataset",
    "FINGERPRINT_VERSION",
    "combine_fingerprint",
    "file_digest",
    "take_first",
    "check_num_samples",
]

#: Mixed into every fingerprint so a change of the hashing scheme changes all digests.
FINGERPRINT_VERSION = b"quantzoo-evaluators-fingerprint-v1"

_CHUNK = 1 << 20  # 1 MiB reads keep memory flat for large files

T = TypeVar("T")


@runtime_checkable
class EvalDataset(Protocol):
    """Structural type of the datasets returned by ``build_dataset``."""

    sample_ids: list[str]
    num_classes: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int): ...

    def fingerprint(self) -> str: ...


def check_num_samples(num_samples: int | None) -> int | None:
    """Validate ``data.num_samples`` (``None`` or a positive int); return it unchanged."""
    if num_samples is None:
        return None
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise EvaluatorConfigError(
            f"data.num_samples={num_samples!r} must be a positive integer or null (all samples)"
        )
    return num_samples


def take_first(items: Sequence[T], num_samples: int | None, *, what: str) -> list[T]:
    """Return the first ``num_samples`` of ``items`` (all of them when ``None``).

    ``what`` describes the split (e.g. ``"imagenet_sample/eval"``) for the error
    raised when more samples are requested than the split holds.
    """
    check_num_samples(num_samples)
    if num_samples is None:
        return list(items)
    if num_samples > len(items):
        raise EvaluatorConfigError(
            f"data.num_samples={num_samples} exceeds the {len(items)} samples of {what}; "
            f"set data.num_samples to at most {len(items)} or to null"
        )
    return list(items[:num_samples])


def file_digest(path: str | Path) -> bytes:
    """sha256 digest (raw bytes) of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.digest()


def combine_fingerprint(kind: str, entries: Iterable[tuple[str, int, bytes]]) -> str:
    """Combine ``(sample_id, label, content_digest)`` entries into one sha256 hex.

    Entries are sorted by ``sample_id`` first, so the result does not depend on
    dataset order. ``kind`` (e.g. ``"imagenet_sample"``) is mixed in too.
    """
    h = hashlib.sha256()
    h.update(FINGERPRINT_VERSION + b"\0" + kind.encode() + b"\0")
    for sample_id, label, digest in sorted(entries, key=lambda e: e[0]):
        h.update(sample_id.encode("utf-8") + b"\0")
        h.update(str(int(label)).encode() + b"\0")
        h.update(digest)
    return h.hexdigest()
