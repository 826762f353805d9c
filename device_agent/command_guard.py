"""The device's gate for fleet commands: a sans-I/O check plus the nonce stores it records into.

:class:`CommandGuard` accepts a command only when :func:`edgeops.protocol.parse_command` accepts it (size, form,
signature by a fleet key, known command, valid arguments) *and* it is for this fleet, addressed to this device or
one of its groups, issued no later than ``now + clock_skew_s``, not expired, valid for at most ``max_ttl_s``,
not older than a command already accepted, and its nonce has not been seen before. Every refusal is a
:class:`CommandRejected` whose ``reason`` is a :class:`RejectReason` value; a refusal for the validity window
(``expired``, ``not-yet-valid``) is a :class:`CommandClockRejected` carrying the device's time and the command's
signed times, so a device clock that is a day behind reads as such in the event. The nonce is recorded only once
every other check has passed, so a rejected command never uses up its nonce.

The guard takes ``now`` as an argument and opens nothing; the clock and MQTT belong to the agent. The nonce store
is the one piece of state: :class:`SqliteNonceStore` keeps it durable across restarts and power cuts (WAL,
``synchronous=FULL``), so a command cannot be replayed after a reboot. Entries are pruned by *signed* time, not
by the device's clock: the store keeps a horizon, the latest ``issued_at`` of an accepted command, and forgets
entries whose expiry plus the clock skew is before it; a command that expired (plus the skew) before the horizon
is refused as ``expired`` whatever the device's clock says. So a clock that jumps ahead (a bad RTC, a wrong NTP
server) and is set back later cannot re-open a used command's window, and since ``max_ttl_s`` bounds every
accepted command's lifetime, the store holds at most the commands issued in the ``max_ttl_s + clock_skew_s``
seconds before the horizon.
"""

from __future__ import annotations

import datetime as dt
import heapq
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeops.errors import CommandRejected, StorageError
from edgeops.protocol import Command, RejectReason, parse_command, validate_segment

__all__ = ["CommandClockRejected", "CommandGuard", "MemoryNonceStore", "NonceStore", "SqliteNonceStore"]


class NonceStore(Protocol):
    def check_and_add(self, nonce: str, expires_at: float, now: float) -> bool:
        """True when ``nonce`` is fresh (it is now recorded until ``expires_at``); False when seen before.

        Entries whose ``expires_at`` is ``<= now`` are forgotten, and :meth:`horizon` becomes ``now`` when that is
        later. Raises StorageError when it cannot persist.
        """
        ...

    def horizon(self) -> float:
        """The latest ``now`` given to :meth:`check_and_add` (``-inf`` before the first): entries expiring before
        it may be forgotten. Raises StorageError when it cannot be read."""
        ...


class MemoryNonceStore:
    """An in-memory nonce store (tests, and devices that accept losing replay protection at a restart)."""

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._horizon = float("-inf")
        self._lock = threading.Lock()

    def horizon(self) -> float:
        with self._lock:
            return self._horizon

    def check_and_add(self, nonce: str, expires_at: float, now: float) -> bool:
        with self._lock:
            self._horizon = max(self._horizon, now)
            while self._heap and self._heap[0][0] <= now:
                when, old = heapq.heappop(self._heap)
                if self._expiry.get(old) == when:
                    del self._expiry[old]
            if nonce in self._expiry:
                return False
            self._expiry[nonce] = expires_at
            heapq.heappush(self._heap, (expires_at, nonce))
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)


class SqliteNonceStore:
    """A durable nonce store in one SQLite file (``DATA_DIR/nonces.sqlite``); safe to share between threads.

    Raises StorageError when the file cannot be opened or written (read-only data dir, disk full, corrupt file).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=10.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID"
            )
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open the nonce store {path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the nonce store is closed")
        return self._db

    def check_and_add(self, nonce: str, expires_at: float, now: float) -> bool:
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("DELETE FROM nonces WHERE expires_at <= ?", (now,))
                    db.execute(
                        "INSERT INTO meta (key, value) VALUES ('horizon', ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                        (now,),
                    )
                    cur = db.execute(
                        "INSERT OR IGNORE INTO nonces (nonce, expires_at) VALUES (?, ?)", (nonce, expires_at)
                    )
                    fresh = cur.rowcount == 1
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as exc:
                raise StorageError(f"cannot record a command nonce in {self._path}: {exc}") from exc
            return fresh

    def horizon(self) -> float:
        with self._lock:
            try:
                row = self._conn().execute("SELECT value FROM meta WHERE key = 'horizon'").fetchone()
            except sqlite3.DatabaseError as exc:
                raise StorageError(f"cannot read the nonce store {self._path}: {exc}") from exc
            return float(row[0]) if row else float("-inf")

    def __len__(self) -> int:
        with self._lock:
            try:
                row = self._conn().execute("SELECT COUNT(*) FROM nonces").fetchone()
            except sqlite3.DatabaseError as exc:
                raise StorageError(f"cannot read the nonce store {self._path}: {exc}") from exc
            return int(row[0])

    def close(self) -> None:
        """Close the file; idempotent. Using the store afterwards is a RuntimeError."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> SqliteNonceStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _reject(reason: RejectReason, detail: str) -> CommandRejected:
    return CommandRejected(reason.value, detail)


def _utc(t: float) -> str:
    """A Unix time as ``2026-01-31T12:00:00Z`` (a wildly wrong clock still prints)."""
    try:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f}"


def _span(seconds: float) -> str:
    """A duration for people: ``45 s``, ``12.5 min``, ``3.0 h``, ``1.0 d``."""
    s = abs(seconds)
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


class CommandClockRejected(CommandRejected):
    """A command refused for its validity window (``expired``, ``not-yet-valid``) after its signature verified:
    the device's time and the command's signed times, for the event that tells an operator the clock is off."""

    def __init__(self, reason: RejectReason, detail: str, *, now: float, cmd: Command) -> None:
        super().__init__(reason.value, detail)
        self.device_time = now
        self.issued_at = cmd.issued_at
        self.expires_at = cmd.expires_at

    def fields(self) -> dict[str, Any]:
        """Event fields: the three times (ISO 8601, UTC) and ``clock_offset_s``, the signed issue time minus the
        device's time: about how far the device's clock is behind the fleet's (negative: ahead), plus the
        command's delivery delay."""
        return {
            "device_time": _utc(self.device_time),
            "issued_at": _utc(self.issued_at),
            "expires_at": _utc(self.expires_at),
            "clock_offset_s": round(self.issued_at - self.device_time, 1),
        }


class CommandGuard:
    """Decides whether a fleet command received on MQTT may run on this device (see the module docstring)."""

    def __init__(
        self,
        *,
        fleet: str,
        device_id: str,
        groups: Sequence[str],
        keys: Sequence[Ed25519PublicKey],
        nonces: NonceStore,
        max_ttl_s: float = 86400,
        clock_skew_s: float = 60,
    ) -> None:
        """Raises ValueError for an invalid fleet, device id or group name, no keys, or negative limits."""
        self._fleet = validate_segment(fleet, "fleet")
        self._device_target = f"device/{validate_segment(device_id, 'device id')}"
        self._group_targets: frozenset[str] = frozenset()
        self.set_groups(groups)
        if not keys:
            raise ValueError("a command guard needs at least one trusted fleet key")
        if not max_ttl_s > 0 or not clock_skew_s >= 0:
            raise ValueError("max_ttl_s must be positive and clock_skew_s not negative")
        self._keys = tuple(keys)
        self._nonces = nonces
        self._max_ttl_s = float(max_ttl_s)
        self._clock_skew_s = float(clock_skew_s)

    def set_keys(self, keys: Sequence[Ed25519PublicKey]) -> None:
        """Replace the trusted fleet command keys (a key rotation). Raises ValueError for no keys."""
        if not keys:
            raise ValueError("a command guard needs at least one trusted fleet key")
        self._keys = tuple(keys)

    def set_groups(self, groups: Sequence[str]) -> None:
        """Replace the groups this device answers to. Raises ValueError for an invalid group name."""
        self._group_targets = frozenset(f"group/{validate_segment(g, 'group')}" for g in groups)

    def check(self, raw: bytes, *, now: float) -> Command:
        """Return the command in ``raw`` when it may run now, having recorded its nonce.

        Raises CommandRejected (reason: any :class:`RejectReason`; a :class:`CommandClockRejected` for ``expired``
        and ``not-yet-valid``) when it may not, and StorageError when the nonce store cannot be read or the nonce
        cannot be recorded (the command must then not run).
        """
        cmd = parse_command(raw, self._keys)
        if cmd.fleet != self._fleet:
            raise _reject(RejectReason.WRONG_FLEET, f"for fleet {cmd.fleet!r}, this is {self._fleet!r}")
        if cmd.target != self._device_target and cmd.target not in self._group_targets:
            raise _reject(RejectReason.WRONG_TARGET, f"for {cmd.target!r}, not this device or its groups")
        skew = self._clock_skew_s
        if cmd.issued_at - skew > now:
            ahead = cmd.issued_at - now
            raise CommandClockRejected(
                RejectReason.NOT_YET_VALID,
                f"issued {_utc(cmd.issued_at)}, {_span(ahead)} after this device's clock {_utc(now)} (allowed skew "
                f"{_span(skew)}): is the device clock behind?",
                now=now,
                cmd=cmd,
            )
        if not now < cmd.expires_at:
            raise CommandClockRejected(
                RejectReason.EXPIRED,
                f"expired {_utc(cmd.expires_at)}, {_span(now - cmd.expires_at)} before this device's clock "
                f"{_utc(now)} (issued {_utc(cmd.issued_at)}): delivered late, or the device clock is ahead",
                now=now,
                cmd=cmd,
            )
        if cmd.expires_at - cmd.issued_at > self._max_ttl_s:
            raise _reject(
                RejectReason.TTL_TOO_LONG,
                f"valid for {cmd.expires_at - cmd.issued_at:.0f} s, max {self._max_ttl_s:.0f} s",
            )
        horizon = self._nonces.horizon()
        if cmd.expires_at + skew <= horizon:  # its nonce may be pruned already: signed time says it is over
            raise CommandClockRejected(
                RejectReason.EXPIRED,
                f"expired {_utc(cmd.expires_at)}, before a command already accepted was issued ({_utc(horizon)}); "
                f"this device's clock reads {_utc(now)}",
                now=now,
                cmd=cmd,
            )
        if not self._nonces.check_and_add(cmd.nonce, cmd.expires_at + skew, cmd.issued_at):
            raise _reject(RejectReason.REPLAYED, f"nonce {cmd.nonce} was already used")
        return cmd
