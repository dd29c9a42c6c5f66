"""Where artifacts live: the cache root, cache paths and download URLs.

Environment variables are read at call time, never at import:
``QUANTZOO_HOME`` (cache root, default ``~/.cache/quantzoo``),
``QUANTZOO_MIRROR`` (replaces the base URL of every artifact) and
``QUANTZOO_OFFLINE=1`` (never touch the network). Relative artifact paths that
are empty, absolute or use ``..`` are a ValueError, so nothing resolves
outside the cache. Pure functions; nothing is read from or written to disk.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path, PurePosixPath

__all__ = ["URL_SCHEMES", "cache_root", "is_offline", "resolve_url", "cache_path"]

#: URL schemes the hub can fetch from.
URL_SCHEMES = ("http", "https", "file")


def cache_root() -> Path:
    """Return the cache root: ``$QUANTZOO_HOME``, else ``~/.cache/quantzoo`` (read now)."""
    return Path(os.environ.get("QUANTZOO_HOME") or "~/.cache/quantzoo").expanduser()


def is_offline(offline: bool | None = None) -> bool:
    """Return ``offline`` if given, else whether env ``QUANTZOO_OFFLINE`` is 1/true/yes/on."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("QUANTZOO_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _check_relative_path(relative_path: str) -> PurePosixPath:
    """Return ``relative_path`` as a POSIX path; ValueError if empty, absolute or using ``..``."""
    rel = PurePosixPath(str(relative_path).replace("\\", "/"))
    parts = rel.parts
    if (
        not parts
        or rel.is_absolute()
        or ".." in parts
        or re.match(r"^[A-Za-z]:", str(rel))
        or rel == PurePosixPath(".")
    ):
        raise ValueError(
            f"artifact path {relative_path!r} must be a relative path inside the cache "
            "(no leading '/', no '..')"
        )
    return rel


def _normalize_base(base: str) -> str:
    """Return ``base`` as a URL ending in '/'; an absolute local path becomes a file:// URL."""
    if os.path.isabs(base) and "://" not in base:
        base = Path(base).as_uri()
    scheme = urllib.parse.urlsplit(base).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ValueError(
            f"unsupported URL {base!r}: use an http://, https:// or file:// base URL"
        )
    return base if base.endswith("/") else base + "/"


def resolve_url(base_url: str, relative_path: str, mirror: str | None = None) -> str:
    """Return the URL of ``relative_path`` under ``base_url``.

    A mirror (the ``mirror`` argument, else env ``QUANTZOO_MIRROR``, else
    none) replaces ``base_url`` entirely. Trailing slashes on the base are
    optional; the relative path is percent-quoted. An absolute local path is
    accepted as a base and turned into a file:// URL.
    """
    rel = _check_relative_path(relative_path)
    if mirror is None:
        mirror = os.environ.get("QUANTZOO_MIRROR") or None
    base = _normalize_base(mirror or base_url)
    return base + urllib.parse.quote(rel.as_posix(), safe="/")


def cache_path(relative_path: str, cache_dir: Path | str | None = None) -> Path:
    """Return ``<cache_dir or cache_root()>/<relative_path>``; ValueError for absolute or ``..`` paths."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / Path(*_check_relative_path(relative_path).parts)
