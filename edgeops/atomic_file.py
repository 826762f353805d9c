"""Atomic file replacement: temp file in the same directory, fsync, ``os.replace``, fsync the directory.

Guarantees: after a crash or power cut the destination holds either its old bytes or all the new ones, never
a mix; a failed write removes its temp file. Does not create parent directories.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgeops.errors import OutputError

__all__ = ["fsync_dir", "write_bytes_atomic"]


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry change (rename, create) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically. Raises OutputError when the directory cannot be written."""
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"cannot write to {directory}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
