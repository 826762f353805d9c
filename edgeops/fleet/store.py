"""The fleet service's persistence: devices, releases, rollouts, telemetry, events and alerts in SQL.

``open_store(url)`` opens SQLite (a path, ``sqlite:///abs/path.db``, ``sqlite:///:memory:``) or PostgreSQL
(``postgresql://user@host:port/db``, psycopg 3) and returns a :class:`FleetStore`: one connection behind one lock,
so threads may share it. The schema and the dialects live in :mod:`edgeops.fleet.store_schema`.

Guarantees: every public method is one transaction (all of it is stored, or nothing); a failure of the database
(down, locked past the busy timeout, disk full, unreadable file) is a StorageError whose message names the
operation. Telemetry and events are keyed by ``(device_id, seq)`` so at-least-once delivery stores each message
once; ``last_seen`` never goes back; at most one alert of a (device, kind) is open; fleet-assigned groups
survive the device's own state updates. It does not validate payloads (the ingest core does), retry, or decide
anything about rollouts.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from edgeops.errors import RolloutError, StorageError
from edgeops.fleet import store_schema as schema
from edgeops.fleet.model import (
    Alert,
    AlertKind,
    Approval,
    DeviceRecord,
    EventRow,
    Execution,
    IngestBatch,
    ReleaseRecord,
    Rollout,
    RolloutStatus,
    TelemetryRow,
)
from edgeops.fleet.store_schema import Database, PostgresDatabase, SqliteDatabase, ensure_schema

__all__ = ["FleetStore", "open_store"]

_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's limits on parameters
SERIES_KEYS = ("ts", "p50_ms", "p95_ms", "p99_ms", "requests", "errors", "drift_psi_max", "cpu_percent", "rss_mb",
               "model_version")


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _chunks(ids: Collection[str]) -> list[list[str]]:
    unique = sorted(set(ids))
    return [unique[i : i + _CHUNK] for i in range(0, len(unique), _CHUNK)]


def open_store(url: str | os.PathLike[str], *, busy_timeout_s: float = 5.0) -> FleetStore:
    """Opens the store at ``url`` (a path, ``sqlite:///abs/path.db``, ``sqlite:///:memory:``,
    ``postgresql://user@host:port/db``), creating the schema when missing.

    ``busy_timeout_s``: how long a write waits for another connection's lock (SQLite's busy timeout, PostgreSQL's
    ``lock_timeout``) and, for PostgreSQL, for the connection to open.

    Raises StorageError when the database cannot be opened or reached, is no database, or has a newer schema
    version; ValueError for an empty or unknown URL scheme or a negative timeout."""
    if not (math.isfinite(busy_timeout_s) and busy_timeout_s >= 0):
        raise ValueError(f"busy_timeout_s must be a finite number >= 0, got {busy_timeout_s}")
    text = os.fspath(url)
    if not text:
        raise ValueError("open_store needs a path or a URL")
    db: Database
    if text.startswith(("postgresql://", "postgres://")):
        db = PostgresDatabase(text, busy_timeout_s=busy_timeout_s)
    elif text.startswith("sqlite://"):
        path = text[len("sqlite://") :]
        db = SqliteDatabase(":memory:" if path in ("/:memory:", ":memory:") else path, busy_timeout_s=busy_timeout_s)
    elif "://" in text:
        raise ValueError(f"unknown store URL scheme: {schema.redacted(text)!r} (a path, sqlite:/// or postgresql://)")
    else:
        db = SqliteDatabase(text, busy_timeout_s=busy_timeout_s)
    try:
        ensure_schema(db)
    except db.errors as exc:
        db.close()
        raise StorageError(f"open_store: {schema.redacted(text)}: {schema.first_line(exc)}") from exc
    except BaseException:
        db.close()
        raise
    return FleetStore(db, text)


class FleetStore:
    """One connection to the fleet database, guarded by a lock. Every method raises StorageError when the database
    is down, locked past the busy timeout, or full; RuntimeError once the store is closed."""

    def __init__(self, db: Database, url: str) -> None:
        self._db = db
        self.url = url
        self.dialect = db.dialect.name
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self._db.close()
                except self._db.errors:  # closing a connection the server already dropped
                    return

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _tx(self, op: str, *, write: bool = False) -> Iterator[Database]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{op}: the store is closed")
            db = self._db
            try:
                db.begin(write=write)
                yield db
                db.commit()
            except db.errors as exc:
                db.rollback()
                raise StorageError(f"{op}: {schema.first_line(exc)}") from exc
            except BaseException:
                db.rollback()
                raise

    # --- devices --------------------------------------------------------------------------------------------

    def put_device(self, rec: DeviceRecord) -> None:
        """Upserts ``rec`` (its agent tags included). Keeps the fleet-assigned groups (``rec.assigned_groups`` is
        ignored: assign_group/unassign_group change them) and never lowers ``last_seen``. Raises StorageError."""
        params = schema.device_params(rec)
        tags = [(rec.device_id, i, tag) for i, tag in enumerate(rec.groups)]
        with self._tx("put_device", write=True) as db:
            db.execute(schema.UPSERT_DEVICE, params)
            db.execute("DELETE FROM device_tags WHERE device_id = ?", (rec.device_id,))
            if tags:
                db.executemany("INSERT INTO device_tags (device_id, pos, tag) VALUES (?, ?, ?)", tags)

    def set_offline(self, device_id: str, *, at: float, reason: str) -> None:
        """Marks a known device offline for ``reason`` (``at``: when; ``last_seen`` is not changed). A no-op for
        an unknown device. Raises StorageError."""
        with self._tx("set_offline", write=True) as db:
            db.execute(
                "UPDATE devices SET offline_reason = ?, offline_at = CASE WHEN online = 1 OR offline_at IS NULL "
                "THEN ? ELSE offline_at END, online = 0 WHERE device_id = ?",
                (reason, at, device_id),
            )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device's record with its assigned groups, or None. Raises StorageError."""
        with self._tx("get_device") as db:
            found = schema.read_devices(db, " WHERE d.device_id = ?", [device_id])
        return found[0] if found else None

    def list_devices(
        self, *, group: str | None = None, profile: str | None = None, online: bool | None = None
    ) -> list[DeviceRecord]:
        """Devices ordered by id; ``group`` matches an agent tag or a fleet-assigned group. Raises StorageError."""
        clauses: list[str] = []
        params: list[Any] = []
        if group is not None:
            clauses.append(
                "(EXISTS (SELECT 1 FROM device_groups dg WHERE dg.device_id = d.device_id AND dg.group_name = ?) "
                "OR EXISTS (SELECT 1 FROM device_tags dt WHERE dt.device_id = d.device_id AND dt.tag = ?))"
            )
            params += [group, group]
        if profile is not None:
            clauses.append("d.profile = ?")
            params.append(profile)
        if online is not None:
            clauses.append("d.online = ?")
            params.append(int(online))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._tx("list_devices") as db:
            return schema.read_devices(db, where, params)

    def assign_group(self, device_id: str, group: str) -> None:
        """Adds ``device_id`` to the fleet-assigned ``group`` (an unknown device is recorded offline, never seen).
        Raises ValueError for an empty id or group, StorageError."""
        if not device_id or not group:
            raise ValueError("assign_group needs a device id and a group name")
        with self._tx("assign_group", write=True) as db:
            db.execute(
                "INSERT INTO devices (device_id, online, last_seen, state) VALUES (?, 0, 0.0, '{}') "
                "ON CONFLICT (device_id) DO NOTHING",
                (device_id,),
            )
            db.execute(
                "INSERT INTO device_groups (device_id, group_name) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (device_id, group),
            )

    def unassign_group(self, device_id: str, group: str) -> None:
        """Removes a fleet-assigned group (agent tags are the agent's). Raises StorageError."""
        with self._tx("unassign_group", write=True) as db:
            db.execute("DELETE FROM device_groups WHERE device_id = ? AND group_name = ?", (device_id, group))

    def mark_silent_offline(self, *, before: float, at: float) -> list[str]:
        """Online devices last seen before ``before`` go offline (reason "silent"); returns their ids, sorted.
        Raises StorageError."""
        with self._tx("mark_silent_offline", write=True) as db:
            ids = [r[0] for r in db.execute(
                "SELECT device_id FROM devices WHERE online = 1 AND last_seen < ? ORDER BY device_id", (before,)
            ).fetchall()]
            if ids:
                db.execute(
                    "UPDATE devices SET online = 0, offline_reason = 'silent', offline_at = ? "
                    "WHERE online = 1 AND last_seen < ?",
                    (at, before),
                )
        return ids

    # --- releases -------------------------------------------------------------------------------------------

    def put_release(self, rec: ReleaseRecord) -> None:
        """Upserts a release; an existing one keeps its approval fields. Raises StorageError."""
        params = schema.release_params(rec)
        with self._tx("put_release", write=True) as db:
            db.execute(schema.UPSERT_RELEASE, params)

    def get_release(self, release_id: str) -> ReleaseRecord | None:
        """Raises StorageError."""
        with self._tx("get_release") as db:
            row = db.execute(schema.SELECT_RELEASE, (release_id,)).fetchone()
        return schema.release_of(row) if row else None

    def list_releases(self, *, name: str | None = None, profile: str | None = None) -> list[ReleaseRecord]:
        """Releases, newest ``created_at`` first. Raises StorageError."""
        where, params = schema.where_equal({"name": name, "profile": profile})
        with self._tx("list_releases") as db:
            found = db.execute(
                f"SELECT {schema.RELEASE_COLS} FROM releases{where} ORDER BY created_at DESC, release_id DESC", params
            ).fetchall()
        return [schema.release_of(r) for r in found]

    def set_approval(self, release_id: str, approval: Approval, *, by: str, at: float) -> ReleaseRecord:
        """Records an approval decision; returns the updated release.

        Raises RolloutError for an unknown release, StorageError."""
        value = Approval(approval).value
        with self._tx("set_approval", write=True) as db:
            cur = db.execute(
                "UPDATE releases SET approval = ?, approved_by = ?, approved_at = ? WHERE release_id = ?",
                (value, by, at, release_id),
            )
            if cur.rowcount == 0:
                raise RolloutError(f"unknown release {release_id!r}")
            row = db.execute(schema.SELECT_RELEASE, (release_id,)).fetchone()
        return schema.release_of(row)

    # --- rollouts and executions ----------------------------------------------------------------------------

    def create_rollout(self, rollout: Rollout, executions: Sequence[Execution]) -> None:
        """Records a new rollout with its executions, in one transaction.

        Raises ValueError when the id exists or an execution belongs to another rollout, StorageError."""
        schema.check_executions(rollout, executions)
        with self._tx("create_rollout", write=True) as db:
            if db.execute("SELECT 1 FROM rollouts WHERE rollout_id = ?", (rollout.rollout_id,)).fetchone():
                raise ValueError(f"rollout {rollout.rollout_id!r} exists already")
            db.execute(schema.INSERT_ROLLOUT, schema.rollout_params(rollout))
            if executions:
                db.executemany(schema.UPSERT_EXECUTION, [schema.execution_params(e) for e in executions])

    def get_rollout(self, rollout_id: str) -> Rollout | None:
        """Raises StorageError."""
        with self._tx("get_rollout") as db:
            row = db.execute(schema.SELECT_ROLLOUT, (rollout_id,)).fetchone()
        return schema.rollout_of(row) if row else None

    def list_rollouts(
        self, *, group: str | None = None, statuses: Collection[RolloutStatus] | None = None
    ) -> list[Rollout]:
        """Rollouts, newest first, of ``group`` and in one of ``statuses`` when given. Raises StorageError."""
        where, params = schema.where_equal({"group_name": group})
        if statuses is not None:
            wanted = sorted({RolloutStatus(s).value for s in statuses})
            if not wanted:
                return []
            where += (" AND " if where else " WHERE ") + f"status IN ({_marks(len(wanted))})"
            params += wanted
        with self._tx("list_rollouts") as db:
            found = db.execute(
                f"SELECT {schema.ROLLOUT_COLS} FROM rollouts{where} ORDER BY created_at DESC, rollout_id DESC", params
            ).fetchall()
        return [schema.rollout_of(r) for r in found]

    def save_rollout(
        self, rollout: Rollout, executions: Sequence[Execution] = (), *, expect_updated_at: float | None = None
    ) -> bool:
        """Updates the rollout and upserts ``executions``, in one transaction.

        With ``expect_updated_at`` the write happens only if the stored rollout's ``updated_at`` is still that
        value (a compare-and-set: the controller's decision never overwrites an operator's pause or abort made
        meanwhile); returns False, writing nothing, when it is not. Raises ValueError for an unknown rollout or an
        execution of another rollout, StorageError."""
        schema.check_executions(rollout, executions)
        params = schema.rollout_params(rollout)
        with self._tx("save_rollout", write=True) as db:
            if expect_updated_at is not None:
                row = db.execute("SELECT updated_at FROM rollouts WHERE rollout_id = ?",
                                 (rollout.rollout_id,)).fetchone()
                if row is None:
                    raise ValueError(f"unknown rollout {rollout.rollout_id!r}")
                if float(row[0]) != float(expect_updated_at):
                    return False
            cur = db.execute(schema.UPDATE_ROLLOUT, (*params[1:], params[0]))
            if cur.rowcount == 0:
                raise ValueError(f"unknown rollout {rollout.rollout_id!r}")
            if executions:
                db.executemany(schema.UPSERT_EXECUTION, [schema.execution_params(e) for e in executions])
        return True

    def list_executions(self, rollout_id: str) -> list[Execution]:
        """The rollout's executions ordered by device id. Raises StorageError."""
        with self._tx("list_executions") as db:
            found = db.execute(
                f"SELECT {schema.EXECUTION_COLS} FROM executions WHERE rollout_id = ? ORDER BY device_id", (rollout_id,)
            ).fetchall()
        return [schema.execution_of(r) for r in found]

    # --- telemetry, events, alerts --------------------------------------------------------------------------

    def write_batch(self, batch: IngestBatch) -> tuple[int, int]:
        """Stores one ingest batch in ONE transaction: telemetry and events (a ``(device_id, seq)`` already stored
        is skipped), alerts opened and closed in time order (an open of a (device, kind) already open is skipped),
        ``last_seen`` of known devices raised (never lowered; ``online`` is not changed).

        Returns (telemetry rows inserted, events inserted). Raises StorageError (nothing is stored then)."""
        telemetry = [schema.telemetry_params(r) for r in batch.telemetry]
        events = [schema.event_params(e) for e in batch.events]
        seen = [(t, d, t) for d, t in batch.seen]
        with self._tx("write_batch", write=True) as db:
            n_tel = db.executemany(schema.INSERT_TELEMETRY, telemetry) if telemetry else 0
            n_ev = db.executemany(schema.INSERT_EVENT, events) if events else 0
            schema.apply_alerts(db, batch.open_alerts, batch.close_alerts)
            if seen:
                db.executemany("UPDATE devices SET last_seen = ? WHERE device_id = ? AND last_seen < ?", seen)
        return n_tel, n_ev

    def events_since(
        self, *, since: float, device_ids: Collection[str] | None = None, types: Collection[str] | None = None
    ) -> list[EventRow]:
        """Events received at or after ``since``, of ``device_ids`` and ``types`` when given, oldest first.
        Raises StorageError."""
        base = f"SELECT {schema.EVENT_COLS} FROM events WHERE received_at >= ?"
        params: list[Any] = [since]
        if types is not None:
            wanted = sorted(set(types))
            if not wanted:
                return []
            base += f" AND type IN ({_marks(len(wanted))})"
            params += wanted
        groups: list[list[str] | None] = [None] if device_ids is None else list(_chunks(device_ids))
        found: list[Any] = []
        with self._tx("events_since") as db:
            for ids in groups:
                sql, args = base, list(params)
                if ids is not None:
                    sql += f" AND device_id IN ({_marks(len(ids))})"
                    args += ids
                found += db.execute(sql + " ORDER BY received_at, device_id, seq", args).fetchall()
        events = [schema.event_of(r) for r in found]
        if len(groups) > 1:
            events.sort(key=lambda e: (e.received_at, e.device_id, e.seq))
        return events

    def recent_events(self, device_id: str | None = None, *, limit: int = 100) -> list[EventRow]:
        """The last ``limit`` events (of ``device_id`` when given), newest first. Raises ValueError for a negative
        limit, StorageError."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        where, params = schema.where_equal({"device_id": device_id})
        with self._tx("recent_events") as db:
            found = db.execute(
                f"SELECT {schema.EVENT_COLS} FROM events{where} ORDER BY received_at DESC, device_id, seq DESC LIMIT ?",
                [*params, limit],
            ).fetchall()
        return [schema.event_of(r) for r in found]

    def latest_telemetry(self, device_ids: Collection[str] | None = None) -> dict[str, TelemetryRow]:
        """The raw telemetry row of highest seq per device (of ``device_ids`` when given). Raises StorageError."""
        found: list[Any] = []
        with self._tx("latest_telemetry") as db:
            if device_ids is None:
                found = db.execute(schema.LATEST_ALL).fetchall()
            else:
                for ids in _chunks(device_ids):
                    values = ", ".join("(?)" for _ in ids)
                    found += db.execute(schema.LATEST_OF.format(values=values), ids).fetchall()
        return {r[0]: schema.telemetry_of(r) for r in found}

    def telemetry_series(
        self, device_id: str, *, since: float, until: float | None = None, max_points: int = 500
    ) -> list[dict[str, Any]]:
        """Chart points of one device, oldest first: raw rows (``ts`` = received_at) and rolled-up buckets (``ts`` =
        bucket start) within [since, until], evenly thinned to at most ``max_points`` (the newest point is kept).

        Raises ValueError for max_points < 1, StorageError."""
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        upper = until if until is not None else math.inf
        with self._tx("telemetry_series") as db:
            found = db.execute(
                schema.SERIES, (device_id, since, upper, device_id, since, upper, max_points, max_points)
            ).fetchall()
        return [dict(zip(SERIES_KEYS, r)) for r in found]

    def telemetry_count(self) -> int:
        """Raw telemetry rows stored. Raises StorageError."""
        with self._tx("telemetry_count") as db:
            return int(db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])

    def open_alert(self, alert: Alert) -> bool:
        """Opens ``alert`` (its ``alert_id`` is ignored: the store assigns one). Returns False when one of the same
        (device, kind) is open already. Raises StorageError."""
        with self._tx("open_alert", write=True) as db:
            return int(db.execute(schema.INSERT_ALERT, schema.alert_params(alert)).rowcount) > 0

    def close_alert(self, device_id: str, kind: AlertKind, *, at: float) -> bool:
        """Closes the open alert of (device, kind); False when none is open. Raises StorageError."""
        with self._tx("close_alert", write=True) as db:
            return int(db.execute(schema.CLOSE_ALERT, (at, device_id, AlertKind(kind).value)).rowcount) > 0

    def list_alerts(
        self, *, open_only: bool = True, device_id: str | None = None, since: float | None = None
    ) -> list[Alert]:
        """Alerts newest first; ``since``: opened at or after. Raises StorageError."""
        where, params = schema.where_equal({"device_id": device_id})
        extra = (["closed_at IS NULL"] if open_only else []) + (["opened_at >= ?"] if since is not None else [])
        params += [since] if since is not None else []
        if extra:
            where += (" AND " if where else " WHERE ") + " AND ".join(extra)
        with self._tx("list_alerts") as db:
            found = db.execute(
                f"SELECT {schema.ALERT_COLS} FROM alerts{where} ORDER BY opened_at DESC, alert_id DESC", params
            ).fetchall()
        return [schema.alert_of(r) for r in found]

    # --- retention ------------------------------------------------------------------------------------------

    def compact(
        self, *, now: float, raw_retention_s: float, rollup_s: float, rollup_retention_s: float
    ) -> dict[str, int]:
        """Rolls raw telemetry older than ``now - raw_retention_s`` into per-device buckets of ``rollup_s`` and
        deletes it; deletes buckets and events older than ``now - rollup_retention_s``. One transaction.

        Only whole buckets are rolled up (the cutoff is rounded down to a multiple of ``rollup_s``), so a bucket is
        written once; rows of a bucket the cutoff cuts through wait for the next compaction. Returns
        ``{"rolled_up", "buckets", "deleted_buckets", "deleted_events"}``.

        Raises ValueError for a window that is not a finite number (rollup_s > 0, retentions >= 0, the rollup
        retention not shorter than the raw one), StorageError."""
        figures = (now, raw_retention_s, rollup_s, rollup_retention_s)
        if not all(math.isfinite(x) for x in figures) or rollup_s <= 0 or raw_retention_s < 0:
            raise ValueError(f"compact needs finite windows with rollup_s > 0 and retentions >= 0, got {figures}")
        if rollup_retention_s < raw_retention_s:
            raise ValueError("rollup_retention_s must not be shorter than raw_retention_s")
        raw_cutoff = math.floor((now - raw_retention_s) / rollup_s) * rollup_s
        old_cutoff = now - rollup_retention_s
        with self._tx("compact", write=True) as db:
            buckets = int(db.execute(schema.rollup_sql(db.dialect, rollup_s), (raw_cutoff,)).rowcount)
            rolled = int(db.execute("DELETE FROM telemetry WHERE received_at < ?", (raw_cutoff,)).rowcount)
            gone = int(db.execute("DELETE FROM telemetry_rollup WHERE bucket_start < ?", (old_cutoff,)).rowcount)
            events = int(db.execute("DELETE FROM events WHERE received_at < ?", (old_cutoff,)).rowcount)
        return {"rolled_up": rolled, "buckets": buckets, "deleted_buckets": gone, "deleted_events": events}
