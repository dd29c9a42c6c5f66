"""The exceptions raised by the artifact hub (:mod:`zoo.hub`).

Every download, cache or verification failure is a :class:`HubError`; the
subclasses carry the offending URL or path as attributes and a message that
says what to do next (use a mirror, go online, re-download). Standard library
only.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "HubError",
    "ArtifactNotFoundError",
    "ChecksumMismatchError",
    "OfflineError",
    "DownloadError",
]


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
