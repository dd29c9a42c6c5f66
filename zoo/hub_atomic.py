"""Atomic file writes: a file appears at its final name complete, or not at all.

Every writer goes through :func:`atomic_path`: a temp file in the destination's
folder, fsync, ``os.replace`` onto the destination, then a best-effort fsync of
the folder (:func:`fsync_dir`). On an exception the temp file is removed and
the destination is untouched. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from zoo.hub_verify import CHUNK_BYTES

__all__ = ["atomic_path", "fsync_dir", "atomic_write_bytes", "atomic_copy"]


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
    fsync_dir(dest.parent)


def fsync_dir(folder: Path) -> None:
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
        shutil.copyfileobj(fin, fout, CHUNK_BYTES)
    return Path(dest)
