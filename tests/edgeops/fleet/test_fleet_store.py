"""The fleet store (edgeops.fleet.store) against real databases: SQLite files in tmp_path and a PostgreSQL server at
127.0.0.1:5432 (a fresh database for the session, a fresh schema per test, dropped at the end). Every behavioural
test runs against both; the PostgreSQL half skips only when no server is reachable."""

from __future__ import annotations

import itertools
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgeops.errors import RolloutError, StorageError
from edgeops.fleet.model import (
    Alert,
    AlertKind,
    AlertLevel,
    Approval,
    DeviceRecord,
    EventRow,
    ExecStatus,
    Execution,
    IngestBatch,
    ReleaseRecord,
    Rollout,
    RolloutKind,
    RolloutSpec,
    RolloutStatus,
    TelemetryRow,
)
from edgeops.fleet.store import FleetStore, open_store
from tests.support.postgres import PG_SERVER, fresh_database

# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server for this test session, dropped at the end."""
    with fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store: a SQLite file, or a fresh schema (search_path) in the session's PG database."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    import psycopg

    database = request.getfixturevalue("pg_database")
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{database}?options=-csearch_path%3D{schema}"


@pytest.fixture
def store(store_url: str) -> Iterator[FleetStore]:
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()


def raw_execute(url: str, sql: str) -> None:
    """Runs one statement on the store's database through a connection of its own."""
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute(sql)
    else:
        conn = sqlite3.connect(url, isolation_level=None)
        try:
            conn.execute(sql)
        finally:
            conn.close()


# --- value builders -----------------------------------------------------------------------------------------------


def device(device_id: str, *, online: bool = True, last_seen: float = 100.0, **kw: Any) -> DeviceRecord:
    return DeviceRecord(device_id=device_id, online=online, last_seen=last_seen, **kw)


def tel(device_id: str, seq: int, received_at: float, **kw: Any) -> TelemetryRow:
    fields: dict[str, Any] = dict(
        ts=received_at - 0.5, model_version="1.0.0", interval_s=10.0, latency_count=5, p50_ms=1.0, p95_ms=2.0,
        p99_ms=3.0, max_ms=4.0, requests=10, errors=0, fallback_answers=0, cpu_percent=5.0, rss_mb=60.0,
        temperature_c=None, drift_level="ok", drift_psi_max=0.01, health="ok", raw={"seq": seq, "device": device_id},
    )
    fields.update(kw)
    return TelemetryRow(device_id=device_id, seq=seq, received_at=received_at, **fields)


def event(device_id: str, seq: int, received_at: float, type_: str = "agent.started") -> EventRow:
    return EventRow(device_id, seq, received_at - 0.5, received_at, type_, {"type": type_, "seq": seq})


def release(release_id: str, created_at: float, **kw: Any) -> ReleaseRecord:
    fields: dict[str, Any] = dict(
        name="digits", version="1.0.0", profile="rpi4", target_sha256="ab" * 32, size=1234,
        payloads=({"kind": "full", "base_version": None, "size": 1234},), lineage={"source": "x", "metrics": {"a": 1}},
    )
    fields.update(kw)
    return ReleaseRecord(release_id=release_id, created_at=created_at, **fields)


def rollout(rollout_id: str, created_at: float, **kw: Any) -> Rollout:
    fields: dict[str, Any] = dict(
        kind=RolloutKind.UPDATE, release_id="r1", version="1.0.0", profile="rpi4", group="canary",
        spec=RolloutSpec(phases=(0.1, 0.5, 1.0), max_failures=0.2, min_devices=2, wait_s=30.0, timeout_s=120.0,
                         auto_rollback=True, continuous=False),
        status=RolloutStatus.RUNNING, updated_at=created_at,
    )
    fields.update(kw)
    return Rollout(rollout_id=rollout_id, created_at=created_at, **fields)


# --- devices ------------------------------------------------------------------------------------------------------


def test_put_device_keeps_assigned_groups_and_never_lowers_last_seen(store: FleetStore) -> None:
    store.put_device(device("pi-01", last_seen=100.0, profile="rpi4", groups=("lab", "canary"),
                            active_version="1.0.0", state={"online": True, "pid": 7}))
    store.assign_group("pi-01", "north")
    # a later state carrying an older last_seen (and no assigned groups) updates the rest but not those two
    store.put_device(device("pi-01", last_seen=50.0, profile="rpi4", groups=("lab",), active_version="1.1.0",
                            previous_version="1.0.0", health="degraded", agent_version="0.1.0", state={"pid": 8}))
    got = store.get_device("pi-01")
    assert got is not None
    assert got.last_seen == 100.0
    assert got.assigned_groups == ("north",)
    assert got.groups == ("lab",)
    assert (got.active_version, got.previous_version, got.health, got.agent_version) == (
        "1.1.0", "1.0.0", "degraded", "0.1.0")
    assert got.state == {"pid": 8}
    store.put_device(device("pi-01", last_seen=150.0, groups=("lab",)))
    got = store.get_device("pi-01")
    assert got is not None and got.last_seen == 150.0
    assert store.get_device("nope") is None


def test_group_filter_matches_agent_tags_and_assigned_groups(store: FleetStore) -> None:
    store.put_device(device("b-tagged", groups=("canary",), profile="rpi4"))
    store.put_device(device("c-other", groups=("lab",), profile="jetson", online=False))
    store.put_device(device("a-both", groups=("canary",), profile="rpi4"))
    store.assign_group("a-both", "canary")
    store.assign_group("d-assigned", "canary")  # unknown: recorded offline, never seen
    assert [d.device_id for d in store.list_devices(group="canary")] == ["a-both", "b-tagged", "d-assigned"]
    assert [d.device_id for d in store.list_devices()] == ["a-both", "b-tagged", "c-other", "d-assigned"]
    assert [d.device_id for d in store.list_devices(group="canary", online=True)] == ["a-both", "b-tagged"]
    assert [d.device_id for d in store.list_devices(profile="jetson")] == ["c-other"]
    assert [d.device_id for d in store.list_devices(online=False)] == ["c-other", "d-assigned"]
    fresh = store.get_device("d-assigned")
    assert fresh is not None and not fresh.online and fresh.all_groups == ("canary",)
    both = store.list_devices(group="canary")[0]
    assert both.groups == ("canary",) and both.assigned_groups == ("canary",)
    store.unassign_group("d-assigned", "canary")
    store.unassign_group("a-both", "canary")  # still in by its own tag
    assert [d.device_id for d in store.list_devices(group="canary")] == ["a-both", "b-tagged"]
    with pytest.raises(ValueError):
        store.assign_group("a-both", "")


def test_set_offline_and_silent_devices(store: FleetStore) -> None:
    store.put_device(device("quiet", last_seen=100.0))
    store.put_device(device("chatty", last_seen=100.0))
    store.put_device(device("gone", last_seen=10.0, online=False))
    store.write_batch(IngestBatch(seen=(("chatty", 400.0),)))
    assert store.mark_silent_offline(before=300.0, at=500.0) == ["quiet"]
    quiet = store.get_device("quiet")
    assert quiet is not None and not quiet.online and quiet.offline_reason == "silent" and quiet.last_seen == 100.0
    assert store.mark_silent_offline(before=300.0, at=510.0) == []  # already offline
    store.set_offline("chatty", at=600.0, reason="connection lost")
    chatty = store.get_device("chatty")
    assert chatty is not None and not chatty.online and chatty.offline_reason == "connection lost"
    store.set_offline("unknown", at=600.0, reason="shutdown")
    assert store.get_device("unknown") is None
    store.put_device(device("chatty", last_seen=700.0))
    back = store.get_device("chatty")
    assert back is not None and back.online and back.offline_reason is None


# --- releases -----------------------------------------------------------------------------------------------------


def test_releases_newest_first_and_approval_survives_a_reput(store: FleetStore) -> None:
    store.put_release(release("digits-1", 100.0))
    store.put_release(release("digits-3", 300.0, version="3.0.0"))
    store.put_release(release("other-2", 200.0, name="other", profile="jetson"))
    assert [r.release_id for r in store.list_releases()] == ["digits-3", "other-2", "digits-1"]
    assert [r.release_id for r in store.list_releases(name="digits")] == ["digits-3", "digits-1"]
    assert [r.release_id for r in store.list_releases(profile="jetson")] == ["other-2"]
    approved = store.set_approval("digits-3", Approval.APPROVED, by="alice", at=400.0)
    assert (approved.approval, approved.approved_by, approved.approved_at) == (Approval.APPROVED, "alice", 400.0)
    store.put_release(release("digits-3", 300.0, version="3.0.0", size=999))  # re-published: pending by default
    got = store.get_release("digits-3")
    assert got is not None
    assert got.approval is Approval.APPROVED and got.approved_by == "alice" and got.size == 999
    assert got.payloads == ({"kind": "full", "base_version": None, "size": 1234},)
    assert got.lineage == {"source": "x", "metrics": {"a": 1}}
    assert store.get_release("missing") is None
    with pytest.raises(RolloutError, match="missing"):
        store.set_approval("missing", Approval.REJECTED, by="bob", at=1.0)


# --- rollouts -----------------------------------------------------------------------------------------------------


def test_rollouts_and_executions_round_trip(store: FleetStore) -> None:
    first = rollout("ro-1", 100.0)
    execs = [
        Execution("ro-1", "pi-02", ExecStatus.QUEUED, 1, 100.0),
        Execution("ro-1", "pi-01", ExecStatus.IN_PROGRESS, 0, 101.0, reason="sent", nonce="n1", sent_at=101.0,
                  attempts=1),
    ]
    store.create_rollout(first, execs)
    assert store.get_rollout("ro-1") == first
    assert store.list_executions("ro-1") == sorted(execs, key=lambda e: e.device_id)
    second = rollout("ro-2", 200.0, kind=RolloutKind.ROLLBACK, group="lab", spec=RolloutSpec())
    store.create_rollout(second, [])
    assert [r.rollout_id for r in store.list_rollouts()] == ["ro-2", "ro-1"]
    assert [r.rollout_id for r in store.list_rollouts(group="canary")] == ["ro-1"]
    assert store.list_rollouts(statuses=[]) == []

    later = replace(first, status=RolloutStatus.PAUSED, updated_at=150.0, phase=1, phase_started_at=140.0,
                    phase_healthy_since=145.0, reason="paused by alice")
    done = replace(execs[1], status=ExecStatus.SUCCEEDED, updated_at=150.0, reason="install.succeeded 1.0.0")
    store.save_rollout(later, [done, Execution("ro-1", "pi-03", ExecStatus.SKIPPED, 0, 150.0, reason="profile")])
    assert store.get_rollout("ro-1") == later
    assert [(e.device_id, e.status) for e in store.list_executions("ro-1")] == [
        ("pi-01", ExecStatus.SUCCEEDED), ("pi-02", ExecStatus.QUEUED), ("pi-03", ExecStatus.SKIPPED)]
    assert store.list_executions("ro-1")[0] == done
    assert [r.rollout_id for r in store.list_rollouts(statuses=[RolloutStatus.PAUSED, RolloutStatus.FAILED])] == [
        "ro-1"]

    with pytest.raises(ValueError, match="exists"):
        store.create_rollout(rollout("ro-1", 500.0), [])
    with pytest.raises(ValueError, match=r"belongs to .ro-9."):
        store.create_rollout(rollout("ro-3", 500.0), [Execution("ro-9", "pi-01", ExecStatus.QUEUED, 0, 1.0)])
    with pytest.raises(ValueError, match="unknown"):
        store.save_rollout(rollout("ro-404", 1.0))
    assert store.get_rollout("ro-3") is None and store.get_rollout("ro-404") is None


def test_save_rollout_compare_and_set_keeps_an_operators_change(store: FleetStore) -> None:
    """The controller's decision, computed from a rollout read before the operator paused it, must not undo the
    pause: save_rollout(expect_updated_at=what it read) writes nothing and says so."""
    read = rollout("ro-1", 100.0)
    store.create_rollout(read, [Execution("ro-1", "pi-01", ExecStatus.QUEUED, 0, 100.0)])
    paused = replace(read, status=RolloutStatus.PAUSED, updated_at=120.0, reason="paused by operator")
    store.save_rollout(paused)
    decision = replace(read, phase=1, updated_at=130.0)
    sent = Execution("ro-1", "pi-01", ExecStatus.IN_PROGRESS, 0, 130.0, sent_at=130.0, attempts=1)
    assert store.save_rollout(decision, [sent], expect_updated_at=read.updated_at) is False
    assert store.get_rollout("ro-1") == paused
    assert store.list_executions("ro-1")[0].status is ExecStatus.QUEUED
    assert store.save_rollout(replace(paused, updated_at=140.0), [sent], expect_updated_at=120.0) is True
    assert store.list_executions("ro-1")[0].status is ExecStatus.IN_PROGRESS
    with pytest.raises(ValueError, match="unknown"):
        store.save_rollout(rollout("ro-404", 1.0), expect_updated_at=1.0)


# --- telemetry, events, alerts ------------------------------------------------------------------------------------


def test_write_batch_drops_duplicates_and_returns_counts(store: FleetStore) -> None:
    store.put_device(device("pi-01", last_seen=100.0))
    rows = tuple(tel("pi-01", seq, 100.0 + seq) for seq in range(1, 6))
    events = (event("pi-01", 1, 101.0), event("pi-01", 2, 102.0, "install.succeeded"))
    batch = IngestBatch(telemetry=rows + rows[:2], events=events + events[:1],
                        seen=(("pi-01", 105.0), ("pi-01", 90.0), ("ghost", 105.0)))
    assert store.write_batch(batch) == (5, 2)
    assert store.write_batch(batch) == (0, 0)  # redelivered after a crash: nothing twice
    assert store.write_batch(IngestBatch(telemetry=(tel("pi-01", 6, 106.0),))) == (1, 0)
    assert store.telemetry_count() == 6
    pi = store.get_device("pi-01")
    assert pi is not None and pi.last_seen == 105.0 and pi.online
    assert store.get_device("ghost") is None  # telemetry does not register devices
    assert store.latest_telemetry()["pi-01"].seq == 6
    assert store.write_batch(IngestBatch()) == (0, 0)


def test_latest_telemetry_per_device(store: FleetStore) -> None:
    rows = [tel(f"d{i % 3}", seq, 100.0 + seq) for i, seq in enumerate(range(1, 31))]
    store.write_batch(IngestBatch(telemetry=tuple(rows), events=()))
    latest = store.latest_telemetry()
    assert sorted(latest) == ["d0", "d1", "d2"]
    assert {k: v.seq for k, v in latest.items()} == {"d0": 28, "d1": 29, "d2": 30}
    assert latest["d2"] == rows[-1] and latest["d2"].raw == {"seq": 30, "device": "d2"}
    assert sorted(store.latest_telemetry(["d1", "nobody"])) == ["d1"]
    assert store.latest_telemetry([]) == {}


def test_alerts_one_open_per_device_and_kind(store: FleetStore) -> None:
    drift = Alert("pi-01", AlertKind.DRIFT, AlertLevel.WARN, 100.0, "psi 0.12", version="1.0.0")
    assert store.open_alert(drift)
    assert not store.open_alert(replace(drift, opened_at=110.0, level=AlertLevel.ALERT))
    assert store.open_alert(Alert("pi-01", AlertKind.LATENCY, AlertLevel.WARN, 120.0, "p95 9 ms"))
    assert store.open_alert(Alert("pi-02", AlertKind.DRIFT, AlertLevel.ALERT, 130.0, "psi 0.3"))
    opened = store.list_alerts()
    assert [(a.device_id, a.kind) for a in opened] == [
        ("pi-02", AlertKind.DRIFT), ("pi-01", AlertKind.LATENCY), ("pi-01", AlertKind.DRIFT)]
    assert opened[2] == replace(drift, alert_id=opened[2].alert_id) and opened[2].alert_id is not None
    assert store.close_alert("pi-01", AlertKind.DRIFT, at=140.0)
    assert not store.close_alert("pi-01", AlertKind.DRIFT, at=141.0)
    assert store.open_alert(replace(drift, opened_at=150.0))  # closed, so a new one may open
    history = store.list_alerts(open_only=False, device_id="pi-01")
    assert [(a.kind, a.opened_at, a.closed_at) for a in history] == [
        (AlertKind.DRIFT, 150.0, None), (AlertKind.LATENCY, 120.0, None), (AlertKind.DRIFT, 100.0, 140.0)]
    assert [a.opened_at for a in store.list_alerts(open_only=False, since=125.0)] == [150.0, 130.0]

    # inside a batch: in time order; a close and a reopen of the same kind both apply
    batch = IngestBatch(
        open_alerts=(Alert("pi-01", AlertKind.DRIFT, AlertLevel.ALERT, 170.0, "psi 0.4"),
                     Alert("pi-02", AlertKind.DRIFT, AlertLevel.ALERT, 170.0, "again")),
        close_alerts=(("pi-01", AlertKind.DRIFT, 160.0), ("pi-01", AlertKind.ERROR_RATE, 160.0)),
    )
    store.write_batch(batch)
    now_open = {(a.device_id, a.kind): a for a in store.list_alerts(open_only=True)}
    assert now_open[("pi-01", AlertKind.DRIFT)].detail == "psi 0.4"
    assert now_open[("pi-02", AlertKind.DRIFT)].detail == "psi 0.3"  # was open: the second open is skipped
    assert len(now_open) == 3


def test_events_since_filters_and_recent_events(store: FleetStore) -> None:
    evs = [event(f"d{i % 4}", i, 100.0 + i, "install.succeeded" if i % 2 else "agent.started") for i in range(20)]
    store.write_batch(IngestBatch(events=tuple(evs)))
    since = store.events_since(since=110.0)
    assert [e.seq for e in since] == list(range(10, 20))
    assert since[0] == evs[10] and since[0].body == {"type": "agent.started", "seq": 10}
    assert [e.seq for e in store.events_since(since=0.0, device_ids=["d1", "d3"], types=["install.succeeded"])] == [
        1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert [e.seq for e in store.events_since(since=112.0, device_ids={"d0"})] == [12, 16]
    assert store.events_since(since=0.0, device_ids=[]) == []
    assert store.events_since(since=0.0, types=[]) == []
    many = [f"x{i:04d}" for i in range(1200)] + ["d2"]  # more ids than one IN list holds
    assert [e.seq for e in store.events_since(since=0.0, device_ids=many)] == [2, 6, 10, 14, 18]
    assert [e.seq for e in store.recent_events(limit=3)] == [19, 18, 17]
    assert [e.seq for e in store.recent_events("d1", limit=2)] == [17, 13]
    with pytest.raises(ValueError):
        store.recent_events(limit=-1)


def test_telemetry_series_merges_rollups_and_thins(store: FleetStore) -> None:
    rows = [tel("pi-01", i + 1, 10.0 * i, requests=i, p95_ms=float(i)) for i in range(100)]  # 0..990 s
    store.write_batch(IngestBatch(telemetry=tuple(rows)))
    store.write_batch(IngestBatch(telemetry=(tel("pi-02", 1, 500.0),)))
    stats = store.compact(now=1000.0, raw_retention_s=400.0, rollup_s=300.0, rollup_retention_s=10_000.0)
    assert stats["buckets"] == 3  # pi-01's [0, 300) and [300, 600), pi-02's [300, 600)
    full = store.telemetry_series("pi-01", since=0.0)
    assert [p["ts"] for p in full[:3]] == [0.0, 300.0, 600.0]
    assert len(full) == 2 + 40
    assert full[0]["requests"] == sum(range(30)) and full[0]["p95_ms"] == 29.0
    assert full[-1] == {"ts": 990.0, "p50_ms": 1.0, "p95_ms": 99.0, "p99_ms": 3.0, "requests": 99, "errors": 0,
                        "drift_psi_max": 0.01, "cpu_percent": 5.0, "rss_mb": 60.0, "model_version": "1.0.0"}
    thin = store.telemetry_series("pi-01", since=0.0, max_points=7)
    assert len(thin) == 7
    assert thin[-1]["ts"] == 990.0  # the newest point is kept
    assert [p["ts"] for p in thin] == sorted(p["ts"] for p in thin)
    steps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(thin)]
    assert max(steps) - min(steps) <= 10.0  # evenly spread over the raw rows
    window = store.telemetry_series("pi-01", since=300.0, until=650.0)
    assert [p["ts"] for p in window] == [300.0, 600.0, 610.0, 620.0, 630.0, 640.0, 650.0]
    with pytest.raises(ValueError):
        store.telemetry_series("pi-01", since=0.0, max_points=0)


def test_compact_rolls_up_and_deletes_per_the_windows(store: FleetStore) -> None:
    rows = [tel("pi-01", i + 1, 10.0 * i, p50_ms=float(i), p95_ms=float(i), requests=1, errors=i % 2,
                model_version="1.0.0" if i < 20 else "2.0.0") for i in range(100)]
    store.write_batch(IngestBatch(telemetry=tuple(rows), events=tuple(event("pi-01", s, 300.0 * s) for s in range(4))))
    # cutoff 1000 - 450 = 550 is rounded down to 300: only the whole bucket [0, 300) is rolled up
    first = store.compact(now=1000.0, raw_retention_s=450.0, rollup_s=300.0, rollup_retention_s=5_000.0)
    assert first == {"rolled_up": 30, "buckets": 1, "deleted_buckets": 0, "deleted_events": 0}
    assert store.telemetry_count() == 70
    bucket = store.telemetry_series("pi-01", since=0.0, until=0.0)
    assert bucket == [{"ts": 0.0, "p50_ms": 14.5, "p95_ms": 29.0, "p99_ms": 3.0, "requests": 30, "errors": 15,
                       "drift_psi_max": 0.01, "cpu_percent": 5.0, "rss_mb": 60.0, "model_version": "2.0.0"}]
    second = store.compact(now=1000.0, raw_retention_s=400.0, rollup_s=300.0, rollup_retention_s=5_000.0)
    assert second == {"rolled_up": 30, "buckets": 1, "deleted_buckets": 0, "deleted_events": 0}
    # much later: everything raw is rolled up; buckets and events older than now - 5000 = 1000 are deleted
    third = store.compact(now=6_000.0, raw_retention_s=400.0, rollup_s=300.0, rollup_retention_s=5_000.0)
    assert third == {"rolled_up": 40, "buckets": 2, "deleted_buckets": 4, "deleted_events": 4}
    assert store.telemetry_count() == 0
    assert store.telemetry_series("pi-01", since=0.0) == []
    with pytest.raises(ValueError):
        store.compact(now=1.0, raw_retention_s=10.0, rollup_s=0.0, rollup_retention_s=10.0)
    with pytest.raises(ValueError):
        store.compact(now=1.0, raw_retention_s=10.0, rollup_s=5.0, rollup_retention_s=1.0)


# --- failures and durability --------------------------------------------------------------------------------------


def hold_lock(url: str) -> Callable[[], None]:
    """Takes the database's write lock from another connection; returns the function that releases it."""
    if url.startswith("postgresql://"):
        import psycopg

        pg = psycopg.connect(url)
        pg.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")

        def release_pg() -> None:
            pg.rollback()
            pg.close()

        return release_pg
    conn = sqlite3.connect(url, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")

    def release_sqlite() -> None:
        conn.execute("ROLLBACK")
        conn.close()

    return release_sqlite


def test_a_locked_database_fails_the_batch_within_the_timeout_then_it_goes_through(store_url: str) -> None:
    s = open_store(store_url, busy_timeout_s=0.5)
    try:
        batch = IngestBatch(telemetry=(tel("pi-01", 1, 100.0),), events=(event("pi-01", 1, 100.0),))
        release_lock = hold_lock(store_url)
        try:
            started = time.monotonic()
            with pytest.raises(StorageError, match=r"^write_batch: .*lock") as info:
                s.write_batch(batch)
            assert 0.3 <= time.monotonic() - started < 3.0
            assert "Traceback" not in str(info.value)
        finally:
            release_lock()
        assert s.telemetry_count() == 0
        assert s.write_batch(batch) == (1, 1)
    finally:
        s.close()


def test_a_reopened_store_keeps_everything(store_url: str) -> None:
    with open_store(store_url) as s:
        s.put_device(device("pi-01", groups=("lab",), state={"k": [1, 2]}))
        s.assign_group("pi-01", "north")
        s.put_release(release("rel-1", 10.0))
        s.set_approval("rel-1", Approval.APPROVED, by="alice", at=11.0)
        s.create_rollout(rollout("ro-1", 20.0), [Execution("ro-1", "pi-01", ExecStatus.QUEUED, 0, 20.0)])
        s.write_batch(IngestBatch(telemetry=(tel("pi-01", 1, 30.0),), events=(event("pi-01", 1, 30.0),),
                                  open_alerts=(Alert("pi-01", AlertKind.DRIFT, AlertLevel.WARN, 30.0, "psi"),)))
        before = (s.list_devices(), s.list_releases(), s.list_rollouts(), s.list_executions("ro-1"),
                  s.latest_telemetry(), s.events_since(since=0.0), s.list_alerts())
    with open_store(store_url) as again:
        after = (again.list_devices(), again.list_releases(), again.list_rollouts(), again.list_executions("ro-1"),
                 again.latest_telemetry(), again.events_since(since=0.0), again.list_alerts())
        assert after == before
        assert after[0][0].state == {"k": [1, 2]} and after[0][0].assigned_groups == ("north",)
        assert not again.open_alert(Alert("pi-01", AlertKind.DRIFT, AlertLevel.WARN, 40.0, "psi"))


def test_a_newer_schema_version_is_refused(store_url: str) -> None:
    open_store(store_url).close()
    raw_execute(store_url, "UPDATE schema_version SET version = 99")
    with pytest.raises(StorageError, match="schema version 99"):
        open_store(store_url)


def test_threads_share_one_store(store: FleetStore) -> None:
    def ingest(worker: int) -> None:
        for b in range(5):
            rows = tuple(tel(f"w{worker}", b * 20 + i, 100.0 + i) for i in range(20))
            store.write_batch(IngestBatch(telemetry=rows))

    threads = [threading.Thread(target=ingest, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.telemetry_count() == 400
    assert sorted(store.latest_telemetry()) == ["w0", "w1", "w2", "w3"]


# --- opening ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing-dir", "parent-is-a-file", "not-a-database", "proc"])
def test_an_unusable_sqlite_path_is_a_storage_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "garbage.db").write_bytes(b"this is not a database file, not at all" * 100)
    path = {
        "missing-dir": tmp_path / "missing" / "fleet.db",
        "parent-is-a-file": tmp_path / "afile" / "fleet.db",
        "not-a-database": tmp_path / "garbage.db",
        "proc": Path("/proc/edgeops-fleet.db"),  # a directory nobody may create files in, root included
    }[where]
    with pytest.raises(StorageError, match=r"^open_store: "):
        open_store(path)


def test_store_urls(tmp_path: Path) -> None:
    with open_store(f"sqlite://{tmp_path / 'abs.db'}") as s:
        assert s.dialect == "sqlite"
    assert (tmp_path / "abs.db").is_file()
    with open_store("sqlite:///:memory:") as mem:
        mem.put_device(device("pi-01"))
        assert mem.get_device("pi-01") is not None
    for bad in ("mysql://root@localhost/fleet", ""):
        with pytest.raises(ValueError):
            open_store(bad)
    with pytest.raises(ValueError):
        open_store(tmp_path / "x.db", busy_timeout_s=-1.0)
    closed = open_store(tmp_path / "closed.db")
    closed.close()
    closed.close()
    with pytest.raises(RuntimeError):
        closed.telemetry_count()


def test_an_unreachable_postgresql_is_a_storage_error_without_the_password() -> None:
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"^open_store: ") as info:
        open_store("postgresql://fleet:s3cret@127.0.0.1:1/fleet", busy_timeout_s=1.0)
    assert "s3cret" not in str(info.value)
    assert time.monotonic() - started < 10.0


def test_postgresql_unknown_database_and_reconnect(pg_database: str) -> None:
    import psycopg

    with pytest.raises(StorageError, match="edgeops_no_such_db"):
        open_store(f"{PG_SERVER}/edgeops_no_such_db_{secrets.token_hex(3)}")
    with open_store(pg_database) as s:
        s.write_batch(IngestBatch(telemetry=(tel("pi-01", 1, 1.0),)))
        name = pg_database.rsplit("/", 1)[1]
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:  # as a server restart would
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        with pytest.raises(StorageError, match=r"^write_batch: "):
            s.write_batch(IngestBatch(telemetry=(tel("pi-01", 2, 2.0),)))
        assert s.write_batch(IngestBatch(telemetry=(tel("pi-01", 2, 2.0),))) == (1, 0)  # the next try reconnects
        assert s.telemetry_count() >= 1


def test_opening_a_store_does_not_wait_for_a_busy_writer(tmp_path: Path) -> None:
    """The dashboard, the CLI and housekeeping open the store while ingest writes: opening an existing store
    only reads its schema version, so another connection's write lock does not make it fail."""
    path = tmp_path / "fleet.db"
    open_store(path).close()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        store = open_store(path, busy_timeout_s=0.2)
        assert store.list_devices() == []
        store.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
