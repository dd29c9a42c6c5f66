"""Download, cache and verify checkpoint artifacts.

Contract
--------
* Every artifact is identified by a relative path and a sha256. Bytes are
  never accepted unless their sha256 matches: downloads land in a ``.part``
  file, are verified, and only then ``os.replace``-d onto their final name.
* Cached files are re-verified on every :func:`cached_artifact` call.
* Environment variables are read at call time, never at import:
  ``QUANTZOO_HOME`` (cache root, default ``~/.cache/quantzoo``),
  ``QUANTZOO_MIRROR`` (replaces the base URL of every artifact),
  ``QUANTZOO_OFFLINE=1`` (never touch the network).
* Supported URL schemes: ``http``, ``https`` and ``file``.
* Standard library only (plus tqdm); this module does not import torch.

The work is split by job, and every public name is re-exported here:
:mod:`zoo.hub_errors` (exceptions), :mod:`zoo.hub_verify` (sha256 hashing,
verification, tagged names), :mod:`zoo.hub_paths` (cache root, cache paths,
URLs and the environment), :mod:`zoo.hub_atomic` (atomic writes) and
:mod:`zoo.hub_fetch` (download transport). This module holds the cache
policy, :func:`cached_artifact`.
"""

from __future__ import annotations

from pathlib import Path

from zoo.hub_atomic import atomic_copy, atomic_path, atomic_write_bytes
from zoo.hub_errors import (
    ArtifactNotFoundError,
    ChecksumMismatchError,
    DownloadError,
    HubError,
    OfflineError,
)
from zoo.hub_fetch import fetch
from zoo.hub_paths import cache_path, cache_root, is_offline, resolve_url
from zoo.hub_verify import check_sha256, check_sha_tag, sha256_file, sha_tagged_name, verify_file

__all__ = [
    "HubError",
    "ArtifactNotFoundError",
    "ChecksumMismatchError",
    "OfflineError",
    "DownloadError",
    "sha256_file",
    "cache_root",
    "is_offline",
    "resolve_url",
    "fetch",
    "cache_path",
    "cached_artifact",
    "verify_file",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_copy",
    "sha_tagged_name",
    "check_sha_tag",
]


def cached_artifact(
    relative_path: str,
    *,
    base_url: str,
    sha256: str,
    mirror: str | None = None,
    offline: bool | None = None,
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> Path:
    """Return the verified local path of an artifact, downloading it if needed.

    The file lives at ``<cache_dir or cache_root()>/<relative_path>``. A
    cached file is sha256-verified on every call; a corrupted one is deleted
    and re-downloaded (offline: ChecksumMismatchError). A missing file raises
    OfflineError in offline mode (argument, else ``QUANTZOO_OFFLINE=1``),
    else it is fetched from :func:`resolve_url` (``mirror`` /
    ``QUANTZOO_MIRROR`` replace ``base_url``). ValueError for a malformed
    sha256, a path escaping the cache, or a name whose 8-hex tag disagrees
    with the sha256.
    """
    sha256 = check_sha256(sha256)
    path = cache_path(relative_path, cache_dir)
    check_sha_tag(path.name, sha256)
    offline = is_offline(offline)
    if path.exists():
        try:
            return verify_file(path, sha256, remove=True)
        except ChecksumMismatchError:
            if offline:
                raise
    if offline:
        raise OfflineError(path)
    return fetch(resolve_url(base_url, relative_path, mirror), path, sha256, progress=progress)
