"""Transport: download one URL into a verified local file (http, https, file).

:func:`fetch` writes into ``<dest>.part``, resumes an existing part with a
Range request, retries transient network failures with exponential backoff,
and moves the part onto ``dest`` only after its sha256 matches (see
:func:`zoo.hub_verify.verify_file`). It knows nothing about the cache, mirrors
or offline mode; :func:`zoo.hub.cached_artifact` decides when to call it.
Standard library plus tqdm (progress bars); no torch.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from zoo.hub_atomic import fsync_dir
from zoo.hub_errors import ArtifactNotFoundError, ChecksumMismatchError, DownloadError
from zoo.hub_paths import URL_SCHEMES
from zoo.hub_verify import CHUNK_BYTES, check_sha256, verify_file

__all__ = ["fetch"]

_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class _TransientError(Exception):
    """Internal: a failure worth retrying (reset, short read, timeout, 5xx)."""


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
            chunk = src.read(CHUNK_BYTES)
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
    fsync_dir(dest.parent)
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
    sha256 = check_sha256(sha256)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
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
