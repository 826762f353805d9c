"""What the agent knows about its disk: the free bytes under a path, and whether an error means the disk is full.

A full disk is the one storage failure a device gets over by itself (logs rotated, a download removed), so the
agent treats it apart from the others: the OTA waits for space and tries again, the reporter holds what it could
not spool (see :mod:`device_agent.ota`, :mod:`device_agent.reporter`). Every other storage failure (an I/O error,
a read-only or missing directory, a per-file size limit) is reported as it was.

:func:`is_disk_full` reads the cause chain of an exception, because the errors reach the agent wrapped:
:class:`~edgeops.errors.StorageError` raised ``from`` an ``OSError`` (ENOSPC, EDQUOT) or a ``sqlite3`` error
(SQLITE_FULL). Neither function raises.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

__all__ = ["free_bytes", "is_disk_full", "same_filesystem"]

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or an exception in its cause/context chain says the disk (or quota) is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if isinstance(current, sqlite3.Error) and getattr(current, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        current = current.__cause__ or current.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem; None when it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def same_filesystem(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are on one filesystem (or either cannot be read: assume so)."""
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return True
