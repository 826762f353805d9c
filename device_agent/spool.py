"""The agent's durable, bounded, ordered outbox of MQTT messages (one SQLite file, ``DATA_DIR/spool.sqlite``).

Telemetry and events are written here first and published later by :mod:`device_agent.outbox`, so a broker
that is away (or a device that loses power) costs nothing but latency.

Guarantees:

- **Durable.** The file runs in WAL mode with ``synchronous=FULL``: once :meth:`Spool.put` returns, the message
  survives a process kill and a power cut.
- **Ordered.** Every message gets a ``seq`` from ``INTEGER PRIMARY KEY AUTOINCREMENT``: strictly increasing,
  never reused, not even after the newest rows were deleted or the file was reopened. :meth:`Spool.peek`
  returns the oldest first. :meth:`Spool.put_json` embeds the ``seq`` in the document it stores (same
  transaction), so a consumer can drop the duplicates that at-least-once delivery may cause.
- **Bounded.** Beyond ``max_messages`` the OLDEST messages are deleted in the same transaction as the insert
  that overflowed, and counted: :attr:`Spool.dropped` is the total since the file was created and
  :meth:`Spool.take_dropped_report` the count since its last call (for a ``spool.dropped`` event). Both
  counters live in a ``meta`` table of the same file.
- **Never stops the agent over a bad file.** A spool file that is not a database (or fails SQLite's quick
  check) at open is renamed aside to ``<name>.corrupt-<unix ts>`` (with its ``-wal``/``-shm`` files) and a new,
  empty spool is started; a warning is logged.
- **Opens on a full disk.** When the ``-shm`` file WAL mode needs cannot be made (SQLITE_IOERR_SHMOPEN or
  _SHMSIZE), the file is opened in exclusive locking mode, which keeps that index in memory (logged): the agent
  starts, its puts fail with StorageError until space returns, then work again. Other processes cannot read the
  file until the agent restarts.
- **Thread-safe.** One connection (``check_same_thread=False``) behind one lock.

Errors: a file that cannot be created or written (read-only or missing data directory, disk full) raises
:class:`edgeops.errors.StorageError` with the path and SQLite's reason; the failed transaction is rolled back, so
nothing is half-written. Using a closed spool is a caller's bug (``RuntimeError``).

Not done here: sending (see :mod:`device_agent.outbox`), compression, or more than one process per file.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.fault_points import fault_point
from edgeops.errors import StorageError

__all__ = ["Spool", "SpooledMessage"]

log = logging.getLogger(__name__)

# no room to create or extend the -shm file (disk full, file size limit): sqlite3.SQLITE_IOERR_SHMOPEN / _SHMSIZE
_NO_ROOM_FOR_SHM = frozenset({4618, 4874})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped_total', 0), ('dropped_reported', 0);
"""


@dataclass(frozen=True)
class SpooledMessage:
    seq: int  # the spool's sequence number: increasing, never reused
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float  # unix time (s) the message was put


class Spool:
    """A durable FIFO of MQTT messages in one SQLite file; see the module docstring for the guarantees."""

    def __init__(self, path: Path, *, max_messages: int) -> None:
        """Open (or create) the spool at ``path``, creating missing directories.

        Raises StorageError when the directory or file cannot be created, opened or written. A corrupt file is
        set aside and replaced by a new one (logged), never raised.
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        self._path = Path(path)
        self._max = max_messages
        self._lock = threading.Lock()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create spool directory {self._path.parent}: {exc.strerror}") from exc
        try:
            self._conn = self._open()
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in _NO_ROOM_FOR_SHM:
                raise StorageError(f"cannot open spool {self._path}: {exc}") from exc
            log.warning("spool %s: cannot make its -shm file (disk full?); opened in exclusive mode", self._path)
            try:
                self._conn = self._open(exclusive=True)
            except sqlite3.Error as exc2:
                raise StorageError(f"cannot open spool {self._path}: {exc2}") from exc2
        except sqlite3.DatabaseError as exc:
            self._set_aside(exc)
            try:
                self._conn = self._open()
            except sqlite3.Error as exc2:
                raise StorageError(f"cannot create spool {self._path}: {exc2}") from exc2
        self._closed = False
        self._pending = int(self._conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        self._dropped = self._meta("dropped_total")

    def _open(self, *, exclusive: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self._path), check_same_thread=False, isolation_level=None, timeout=5.0)
        try:
            if exclusive:  # before WAL is entered: the wal-index then lives in this process's memory, not in -shm
                conn.execute("PRAGMA locking_mode=EXCLUSIVE").fetchone()
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=FULL")
            check = conn.execute("PRAGMA quick_check(1)").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check failed: {check[0] if check else 'no result'}")
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_aside(self, exc: sqlite3.DatabaseError) -> None:
        aside = self._path.with_name(f"{self._path.name}.corrupt-{int(time.time())}")
        log.warning("spool %s is corrupt (%s); moved to %s, starting a new spool", self._path, exc, aside)
        try:
            for suffix in ("", "-wal", "-shm"):
                src = self._path.with_name(self._path.name + suffix)
                if src.exists():
                    src.replace(aside.with_name(aside.name + suffix))
        except OSError as err:
            raise StorageError(f"cannot move corrupt spool {self._path} aside: {err.strerror}") from err

    # -- writing ---------------------------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, now: float | None = None) -> int:
        """Append one message; returns its seq. Drops (and counts) the oldest beyond the bound.

        Raises StorageError (disk full, read-only file).
        """
        return self._insert(topic, bytes(payload), None, qos=qos, retain=retain, now=now)

    def put_json(
        self, topic: str, doc: dict[str, Any], *, qos: int = 1, retain: bool = False, now: float | None = None
    ) -> int:
        """Append ``doc`` as compact, key-sorted JSON with ``doc["seq"]`` set to its seq; returns the seq.

        Raises StorageError (disk full, read-only file); TypeError/ValueError when ``doc`` is not JSON-ready.
        """
        json.dumps(doc)  # fail on a value JSON cannot hold before touching the file
        return self._insert(topic, b"", doc, qos=qos, retain=retain, now=now)

    def _insert(
        self, topic: str, payload: bytes, doc: dict[str, Any] | None, *, qos: int, retain: bool, now: float | None
    ) -> int:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        created = time.time() if now is None else now
        with self._locked() as conn:
            with self._transaction(conn, "write to"):
                cur = conn.execute(
                    "INSERT INTO messages (topic, payload, qos, retain, created_at) VALUES (?, ?, ?, ?, ?)",
                    (topic, payload, qos, int(retain), created),
                )
                seq = int(cur.lastrowid or 0)
                if doc is not None:
                    body = json.dumps({**doc, "seq": seq}, sort_keys=True, separators=(",", ":")).encode()
                    conn.execute("UPDATE messages SET payload = ? WHERE seq = ?", (body, seq))
                over = max(0, self._pending + 1 - self._max)
                if over:
                    conn.execute(
                        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?)", (over,)
                    )
                    conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_total'", (over,))
            fault_point("spool.put.committed")
            self._pending += 1 - over
            self._dropped += over
        return seq

    def ack(self, seq: int) -> None:
        """Delete message ``seq`` (it was delivered). Acking an unknown or already acked seq does nothing.

        Raises StorageError.
        """
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Delete every message in ``seqs`` in one transaction (one fsync). Idempotent. Raises StorageError."""
        rows = [(int(s),) for s in seqs]
        if not rows:
            return
        with self._locked() as conn:
            with self._transaction(conn, "write to"):
                before = conn.total_changes
                conn.executemany("DELETE FROM messages WHERE seq = ?", rows)
                deleted = conn.total_changes - before
            fault_point("spool.acked")
            self._pending -= deleted

    def take_dropped_report(self) -> int:
        """The number dropped by the bound since the last call (persisted across restarts). Raises StorageError."""
        with self._locked() as conn, self._transaction(conn, "write to"):
            reported = self._meta("dropped_reported")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'dropped_reported'", (self._dropped,))
            return self._dropped - reported

    # -- reading ---------------------------------------------------------------------------------------------

    def peek(self, limit: int) -> list[SpooledMessage]:
        """Up to ``limit`` messages, oldest first, without removing them. Raises StorageError."""
        with self._locked() as conn:
            try:
                rows = conn.execute(
                    "SELECT seq, topic, payload, qos, retain, created_at FROM messages ORDER BY seq LIMIT ?",
                    (max(0, limit),),
                ).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read spool {self._path}: {exc}") from exc
        return [SpooledMessage(int(s), str(t), bytes(p), int(q), bool(r), float(c)) for s, t, p, q, r, c in rows]

    def pending(self) -> int:
        """How many messages wait to be sent."""
        with self._lock:
            return self._pending

    @property
    def dropped(self) -> int:
        """Total messages dropped by the bound since the file was created."""
        with self._lock:
            return self._dropped

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Close the file (a WAL checkpoint happens here). Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _meta(self, key: str) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"spool {self._path} is closed")
            yield self._conn

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection, verb: str) -> Iterator[None]:
        """One IMMEDIATE transaction (the caller holds the lock); a SQLite error rolls back → StorageError."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StorageError(f"cannot {verb} spool {self._path}: {exc}") from exc
        except BaseException:
            self._rollback(conn)
            raise

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:  # SQLite already rolled back (e.g. disk full)
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("spool %s: rollback failed: %s", self._path, exc)
