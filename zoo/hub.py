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
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import secrets
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from tqdm import tqdm

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

_CHUNK = 1 << 20
_SCHEMES = ("http", "https", "file")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# A torchvision-style tag: "<stem>-<8 hex><suffixes>", e.g. "resnet18-f37072fd.pth".
_SHA_TAG_RE = re.compile(r"-([0-9a-f]{8})((?:\.[A-Za-z0-9_]+)+)$")
_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


# --------------------------------------------------------------------------- errors


class HubError(RuntimeError):
    """Base class for every artifact download/cache/verification failure."""


class ArtifactNotFoundError(HubError):
    """The artifact does not exist at its URL (HTTP 404/410 or missing file:// path)."""

    def __init__(self, url: str):
        self.url = url
        super().__init__(
            f"artifact not found at {url}; if the default host is unreachable or lacks it, "
            "point to a copy with --mirror URL or QUANTZOO_MIRROR"
        )


class ChecksumMismatchError(HubError):
    """A file's sha256 differs from the expected one; the file was not accepted."""

    def __init__(self, path: Path | str, expected: str, actual: str, removed: bool):
        self.path, self.expected, self.actual, self.removed = Path(path), expected, actual, removed
        fate = "refused and removed" if removed else "refused"
        super().__init__(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; "
            f"the file was {fate} (re-download it or fix the registered checksum)"
        )


class OfflineError(HubError):
    """Offline mode is on and the artifact is not in the cache."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        super().__init__(
            f"offline mode and {path} is not cached; run once online to download it, "
            "or set QUANTZOO_HOME to a cache that has it"
        )


class DownloadError(HubError):
    """The network kept failing after all retries."""

    def __init__(self, url: str, attempts: int, last_error: object):
        self.url, self.attempts, self.last_error = url, attempts, last_error
        super().__init__(
            f"download of {url} failed after {attempts} attempt(s): {last_error}; "
            "check the network or use --mirror URL / QUANTZOO_MIRROR (a partial "
            "download is kept and resumed next time)"
        )


class _TransientError(Exception):
    """Internal: a failure worth retrying (reset, short read, timeout, 5xx)."""


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path | str) -> str:
    """Return the lowercase hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(sha256: str, field: str = "sha256") -> str:
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
    expected = _check_sha256(sha256)
    path = Path(path)
    actual = sha256_file(path)
    if actual != expected:
        if remove:
            path.unlink(missing_ok=True)
        raise ChecksumMismatchError(path, expected, actual, removed=remove)
    return path


def sha_tagged_name(stem: str, sha256: str, suffix: str) -> str:
    """Return ``f"{stem}-{sha256[:8]}{suffix}"`` (torchvision-style tagged file name)."""
    return f"{stem}-{_check_sha256(sha256)[:8]}{suffix}"


def check_sha_tag(filename: str, sha256: str) -> str | None:
    """Check the 8-hex tag of a tagged file name against ``sha256``.

    Returns the tag, or None when the name carries no tag (``<stem>-<8
    lowercase hex><.suffix>``). A tag that is not the prefix of ``sha256``
    means the registry entry is inconsistent: ValueError naming both.
    """
    expected = _check_sha256(sha256)
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


# --------------------------------------------------------------------------- environment


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
    if scheme not in _SCHEMES:
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


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a fresh temp path next to ``dest``; on clean exit fsync it and ``os.replace`` onto ``dest``.

    The temp file is created empty (honouring the umask) in ``dest``'s folder,
    which is created if needed. On an exception the temp file is removed and
    ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _fsync_dir(folder: Path) -> None:
    """Best-effort fsync of a directory so a rename survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, os.replace)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_copy(src: Path | str, dest: Path | str) -> Path:
    """Copy ``src`` to ``dest`` atomically (temp file in ``dest``'s folder, fsync, os.replace)."""
    with atomic_path(dest) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
    return Path(dest)


# --------------------------------------------------------------------------- fetching


def _part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def _progress_bar(enabled: bool, desc: str, total: int | None, initial: int = 0) -> tqdm:
    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
        desc=desc, disable=not enabled, leave=False,
    )


def _copy_stream(src: BinaryIO, dst: BinaryIO, bar: tqdm) -> int:
    """Copy ``src`` into ``dst`` chunk by chunk; network errors become _TransientError."""
    received = 0
    while True:
        try:
            chunk = src.read(_CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise _TransientError(f"read failed after {received} bytes: {exc!r}") from exc
        if not chunk:
            return received
        dst.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` into (START, TOTAL); Nones when absent or odd."""
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", value or "")
    if not match:
        return None, None
    total = None if match.group(2) == "*" else int(match.group(2))
    return int(match.group(1)), total


def _http_attempt(url: str, part: Path, timeout: float, progress: bool, desc: str) -> bool:
    """One HTTP GET into ``part``, resuming from its size with a Range request.

    Returns True when bytes already in ``part`` were kept (206 append, or 416
    meaning the part is already complete), False when written from 0.
    Raises ArtifactNotFoundError, DownloadError (non-retryable status) or
    _TransientError (worth retrying).
    """
    existing = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "quantzoo-hub/1", "Accept-Encoding": "identity"}
    if existing:
        headers["Range"] = f"bytes={existing}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (404, 410):
            raise ArtifactNotFoundError(url) from None
        if exc.code == 416 and existing:
            return True  # nothing left to send: the caller verifies the part as is
        if exc.code in _RETRYABLE_HTTP:
            raise _TransientError(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(url, 1, f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _TransientError(repr(getattr(exc, "reason", exc))) from exc

    with response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if response.status == 206 and existing:
            start, total = _content_range_start(response.headers.get("Content-Range"))
            if start != existing:
                part.unlink(missing_ok=True)
                raise _TransientError(
                    f"server resumed at byte {start} instead of {existing}; restarting from 0"
                )
            mode, initial = "ab", existing
            total = total if total is not None else (existing + length if length is not None else None)
        elif response.status in (200, 206):
            mode, initial, total = "wb", 0, length
        else:
            raise DownloadError(url, 1, f"unexpected HTTP status {response.status}")
        with open(part, mode) as fh, _progress_bar(progress, desc, total, initial) as bar:
            try:
                received = _copy_stream(response, fh, bar)
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    if length is not None and received < length:
        raise _TransientError(f"connection closed after {received} of {length} bytes")
    return mode == "ab"


def _file_url_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URL {url!r} names host {parts.netloc!r}; use file:///absolute/path")
    return Path(urllib.request.url2pathname(parts.path))


def _finish(part: Path, dest: Path, sha256: str) -> Path:
    """Verify ``part`` (removing it on mismatch) and move it onto ``dest``."""
    verify_file(part, sha256, remove=True)
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return dest


def fetch(
    url: str,
    dest: Path | str,
    sha256: str,
    *,
    retries: int = 4,
    backoff: float = 0.5,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically and verify it; return ``dest``.

    Bytes go to ``<dest>.part``; an existing part is resumed with
    ``Range: bytes=N-`` (206 appends, 200 restarts from 0). Connection
    resets, short reads, timeouts and 5xx are retried ``retries`` times with
    ``backoff * 2**attempt`` seconds between tries, resuming each time; the
    part is kept after a final DownloadError so a later call resumes. HTTP
    404 raises ArtifactNotFoundError at once. The sha256 is checked before
    ``os.replace(part, dest)``; on mismatch the part is deleted and, if it
    held resumed bytes, downloaded once more from 0, else
    ChecksumMismatchError. file:// URLs are copied the same way.
    Not safe for two processes fetching the same ``dest`` at once.
    """
    sha256 = _check_sha256(sha256)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"unsupported URL {url!r}: use http://, https:// or file://")

    if scheme == "file":
        src = _file_url_path(url)
        if not src.is_file():
            raise ArtifactNotFoundError(url)
        with open(src, "rb") as fin, open(part, "wb") as fout, _progress_bar(
            progress, dest.name, src.stat().st_size
        ) as bar:
            _copy_stream(fin, fout, bar)
            fout.flush()
            os.fsync(fout.fileno())
        return _finish(part, dest, sha256)

    attempt, fresh_retry_done = 0, False
    while True:
        try:
            kept_old_bytes = _http_attempt(url, part, timeout, progress, dest.name)
        except _TransientError as exc:
            if attempt >= retries:
                raise DownloadError(url, attempt + 1, exc) from None
            time.sleep(backoff * 2**attempt)
            attempt += 1
            continue
        try:
            return _finish(part, dest, sha256)
        except ChecksumMismatchError:
            if not kept_old_bytes or fresh_retry_done:
                raise
            fresh_retry_done = True  # stale or mixed part: one clean download from byte 0


# --------------------------------------------------------------------------- cache


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
    sha256 = _check_sha256(sha256)
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
