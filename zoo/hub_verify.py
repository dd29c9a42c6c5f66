"""Checksums of artifact files: hashing, verification and sha256-tagged file names.

* :func:`sha256_file` hashes a file in :data:`CHUNK_BYTES` chunks;
* :func:`verify_file` accepts a file only if its sha256 matches, else raises
  :class:`zoo.hub_errors.ChecksumMismatchError` (optionally deleting it);
* :func:`sha_tagged_name` / :func:`check_sha_tag` make and check
  torchvision-style names ``<stem>-<first 8 hex of sha256><suffix>``.

A malformed expected sha256 is a ValueError naming the field. Nothing is
written except the optional removal of a refused file. Standard library only.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

from zoo.hub_errors import ChecksumMismatchError

__all__ = ["CHUNK_BYTES", "check_sha256", "sha256_file", "verify_file", "sha_tagged_name", "check_sha_tag"]

#: read/copy granularity for hashing, copying and downloading (1 MiB).
CHUNK_BYTES = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# A torchvision-style tag: "<stem>-<8 hex><suffixes>", e.g. "resnet18-f37072fd.pth".
_SHA_TAG_RE = re.compile(r"-([0-9a-f]{8})((?:\.[A-Za-z0-9_]+)+)$")


def sha256_file(path: Path | str) -> str:
    """Return the lowercase hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(sha256: str, field: str = "sha256") -> str:
    """Return ``sha256`` lowercased; ValueError naming ``field`` unless it is 64 hex chars."""
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise ValueError(f"{field} must be 64 hex characters, got {sha256!r}")
    return sha256.lower()


def verify_file(path: Path | str, sha256: str, *, remove: bool = False) -> Path:
    """Check that ``path`` hashes to ``sha256``; return the path.

    On mismatch raise :class:`ChecksumMismatchError`; with ``remove=True``
    the bad file is deleted first (used for cache and download files; a
    user's own file is left alone by default).
    """
    expected = check_sha256(sha256)
    path = Path(path)
    actual = sha256_file(path)
    if actual != expected:
        if remove:
            path.unlink(missing_ok=True)
        raise ChecksumMismatchError(path, expected, actual, removed=remove)
    return path


def sha_tagged_name(stem: str, sha256: str, suffix: str) -> str:
    """Return ``f"{stem}-{sha256[:8]}{suffix}"`` (torchvision-style tagged file name)."""
    return f"{stem}-{check_sha256(sha256)[:8]}{suffix}"


def check_sha_tag(filename: str, sha256: str) -> str | None:
    """Check the 8-hex tag of a tagged file name against ``sha256``.

    Returns the tag, or None when the name carries no tag (``<stem>-<8
    lowercase hex><.suffix>``). A tag that is not the prefix of ``sha256``
    means the registry entry is inconsistent: ValueError naming both.
    """
    expected = check_sha256(sha256)
    match = _SHA_TAG_RE.search(PurePosixPath(filename).name)
    if match is None:
        return None
    tag = match.group(1)
    if not expected.startswith(tag):
        raise ValueError(
            f"file name {filename!r} is tagged {tag} but its sha256 starts with "
            f"{expected[:8]}; fix the registry entry so name and checksum agree"
        )
    return tag
