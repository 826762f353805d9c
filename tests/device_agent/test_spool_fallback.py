"""The RAM fallback in front of the spool (sans-I/O: the spool is a put function that refuses while "full"), and
the classification of a full disk. The real thing on a full tmpfs is tests/device_agent/test_disk_full.py."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from device_agent.disk_space import is_disk_full
from device_agent.spool import Spool
from device_agent.spool_fallback import SpoolFallback
from edgeops.errors import StorageError


class FlakySpool:
    """Stores (topic, doc) in order; refuses with a disk-full StorageError while ``full``."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, dict[str, Any]]] = []
        self.full = False

    def put(self, topic: str, doc: dict[str, Any]) -> int:
        if self.full:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:
                raise StorageError("cannot write to spool: disk full") from exc
        self.stored.append((topic, doc))
        return len(self.stored)


def test_held_messages_enter_the_spool_in_order_once_it_takes_writes_again() -> None:
    spool = FlakySpool()
    fb = SpoolFallback(spool.put)
    assert fb.put("t", {"n": 0, "ts": 0.0})
    spool.full = True
    assert not fb.put("t", {"n": 1, "ts": 1.0}) and not fb.put("e", {"n": 2, "ts": 2.0})
    assert fb.status()["held"] == 2 and fb.error is not None and "disk full" in fb.error
    spool.full = False
    assert fb.put("t", {"n": 3, "ts": 3.0}), "the next put drains what was held, then stores itself"
    assert [d["n"] for _, d in spool.stored] == [0, 1, 2, 3]
    assert [t for t, _ in spool.stored] == ["t", "t", "e", "t"]
    assert fb.status() == {"held": 0, "held_bytes": 0, "lost": 0, "error": None}
    assert fb.take_lost() is None, "nothing was lost: nothing to report"


def test_beyond_the_bound_the_oldest_are_dropped_counted_and_reported_once() -> None:
    spool = FlakySpool()
    size = len(b'{"n":10,"ts":10.0}')
    fb = SpoolFallback(spool.put, max_bytes=5 * size)
    spool.full = True
    for n in range(10, 20):
        fb.put("t", {"n": n, "ts": float(n)})
    assert fb.status()["held"] == 5 and fb.status()["lost"] == 5
    spool.full = False
    assert fb.drain()
    assert [d["n"] for _, d in spool.stored] == [15, 16, 17, 18, 19], "the newest are kept, in order"
    lost = fb.take_lost()
    assert lost is not None and (lost.count, lost.reason, lost.first_ts, lost.last_ts) == (5, "disk-full", 10.0, 14.0)
    assert "disk full" in lost.detail
    assert fb.take_lost() is None, "reported once"
    assert fb.status()["lost"] == 5, "the total stays for telemetry and the state"


def test_close_with_messages_still_held_says_how_many_are_lost(caplog: pytest.LogCaptureFixture) -> None:
    spool = FlakySpool()
    fb = SpoolFallback(spool.put)
    spool.full = True
    fb.put("t", {"ts": 1.0})
    assert fb.close() == 1
    assert "1 message(s) held in RAM are lost" in caplog.text


def test_a_full_disk_is_told_apart_from_other_storage_errors(tmp_path: Path) -> None:
    def wrapped(exc: BaseException, *, suppress: bool = False) -> StorageError:
        try:
            try:
                raise exc
            except BaseException as inner:
                if suppress:
                    raise StorageError("cannot write") from None
                raise StorageError("cannot write") from inner
        except StorageError as outer:
            return outer

    assert is_disk_full(wrapped(OSError(errno.ENOSPC, "No space left on device")))
    assert is_disk_full(wrapped(OSError(errno.EDQUOT, "Disk quota exceeded"), suppress=True)), "__context__ counts"
    assert not is_disk_full(wrapped(OSError(errno.EFBIG, "File too large")))
    assert not is_disk_full(wrapped(OSError(errno.EIO, "Input/output error")))
    spool = Spool(tmp_path / "spool.sqlite", max_messages=10)
    pages = spool._conn.execute("PRAGMA page_count").fetchone()[0]
    spool._conn.execute(f"PRAGMA max_page_count={pages}")  # SQLite's page cap: the same SQLITE_FULL as a full disk
    with pytest.raises(StorageError) as info:
        spool.put("t", b"x" * 100_000)
    spool.close()
    assert is_disk_full(info.value)
    assert isinstance(info.value.__cause__, sqlite3.Error)
