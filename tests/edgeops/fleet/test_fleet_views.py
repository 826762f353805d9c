"""The dashboard/API/CLI views over a real SQLite store filled through the store API.

``fill_fleet`` (also used by test_fleet_http.py and test_dashboard_browser.py) writes a small fleet: four
devices (one offline, one of another profile), two releases, a running rollout in two phases, an older aborted
one, telemetry of pi-01, events with slot changes, and alerts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from edgeops.fleet import views
from edgeops.fleet.model import (
    Alert,
    AlertKind,
    AlertLevel,
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

NOW = 1_800_000_000.0
RELEASE = "digits-1.1.0-rpi4"
OTHER_RELEASE = "digits-1.0.0-rpi4"
ROLLOUT = "r-1799999000-aaaaaa"
OLD_ROLLOUT = "r-1799990000-bbbbbb"
TELEMETRY_POINTS = 12  # rows of pi-01 within the last hour
LINEAGE = {
    "source": {"file": "digits.keras", "format": "keras", "sha256": "5a" * 32},
    "data": {"calib_sha256": "c4" * 32, "eval_sha256": "e7" * 32},
    "toolchain": {"edgeops": "0.1.0", "tensorflow": "2.19.0"},
    "gate": {"metrics": {"agreement": 0.996, "accuracy": 0.972}, "budgets": {"agreement": 0.99}, "executed": True},
    "format": "tflite",
    "precision": "int8",
}


@dataclass(frozen=True)
class Fleet:
    """What fill_fleet wrote, for assertions."""

    telemetry: tuple[TelemetryRow, ...]  # pi-01's rows, oldest first (the last one is the latest)
    executions: tuple[Execution, ...]


def telemetry_row(device: str, seq: int, at: float, *, p50: float, psi: float | None, version: str) -> TelemetryRow:
    return TelemetryRow(
        device_id=device,
        seq=seq,
        ts=at - 0.5,
        received_at=at,
        model_version=version,
        interval_s=60.0,
        latency_count=100 + seq,
        p50_ms=p50,
        p95_ms=p50 * 1.5,
        p99_ms=p50 * 2.0,
        max_ms=p50 * 3.0,
        requests=100 + seq,
        errors=seq % 3,
        fallback_answers=0,
        cpu_percent=7.5,
        rss_mb=61.0,
        temperature_c=None,
        drift_level="ok",
        drift_psi_max=psi,
        health="ok",
    )


def event(device: str, seq: int, at: float, type_: str, **body: object) -> EventRow:
    return EventRow(device, seq, at - 0.5, at, type_, {"device": device, "seq": seq, "type": type_, **body})


def fill_fleet(store: FleetStore, now: float = NOW) -> Fleet:
    """Writes the small fleet described in the module docstring; returns what tests compare against."""
    devices = [
        DeviceRecord("jet-01", True, now - 5, profile="jetson", groups=("lab",), health="no-model"),
        DeviceRecord("pi-01", True, now - 2, profile="rpi4", groups=("lab",), active_version="1.1.0",
                     previous_version="1.0.0", health="ok", agent_version="0.1.0"),
        DeviceRecord("pi-02", True, now - 3, profile="rpi4", groups=("lab",), active_version="1.0.0", health="ok"),
        DeviceRecord("pi-03", False, now - 900, profile="rpi4", groups=("lab",), active_version="1.0.0",
                     health="degraded", offline_reason="connection lost"),
    ]  # fmt: skip
    for d in devices:
        store.put_device(d)
    payloads = (
        {"id": "aa" * 8, "kind": "full", "base_version": None, "size": 120320, "codec": None},
        {"id": "bb" * 8, "kind": "delta", "base_version": "1.0.0", "size": 18004, "codec": "tensor-planes-zstd"},
    )
    store.put_release(ReleaseRecord(OTHER_RELEASE, "digits", "1.0.0", "rpi4", now - 86400, "11" * 32, 120000))
    store.put_release(
        ReleaseRecord(RELEASE, "digits", "1.1.0", "rpi4", now - 3600, "22" * 32, 120320, payloads, LINEAGE)
    )
    spec = RolloutSpec(phases=(0.34, 1.0))
    old = Rollout(OLD_ROLLOUT, RolloutKind.UPDATE, OTHER_RELEASE, "1.0.0", "rpi4", "lab", RolloutSpec(),
                  RolloutStatus.ABORTED, now - 10000, now - 1000, reason=f"superseded by {ROLLOUT}")  # fmt: skip
    store.create_rollout(old, [Execution(OLD_ROLLOUT, "pi-01", ExecStatus.SUCCEEDED, 0, now - 9000)])
    rollout = Rollout(ROLLOUT, RolloutKind.UPDATE, RELEASE, "1.1.0", "rpi4", "lab", spec, RolloutStatus.RUNNING,
                      now - 1000, now - 10, phase=1, phase_started_at=now - 300)  # fmt: skip
    executions = (
        Execution(ROLLOUT, "jet-01", ExecStatus.SKIPPED, 0, now - 1000, reason="profile jetson"),
        Execution(ROLLOUT, "pi-01", ExecStatus.SUCCEEDED, 0, now - 400, reason="install.succeeded", attempts=1),
        Execution(ROLLOUT, "pi-02", ExecStatus.IN_PROGRESS, 1, now - 300, sent_at=now - 300, attempts=1),
        Execution(ROLLOUT, "pi-03", ExecStatus.QUEUED, 1, now - 300),
    )
    store.create_rollout(rollout, executions)
    rows = tuple(
        telemetry_row("pi-01", i + 1, now - 60 * (TELEMETRY_POINTS - i), p50=0.4 + 0.01 * i, psi=0.02 * i,
                      version="1.1.0")
        for i in range(TELEMETRY_POINTS)
    )  # fmt: skip
    too_old = telemetry_row("pi-01", 0, now - 7200, p50=9.9, psi=0.5, version="1.0.0")
    pi02 = telemetry_row("pi-02", 1, now - 30, p50=0.5, psi=None, version="1.0.0")
    events = (
        event("pi-01", 1, now - 500, "ota.started", release_id=RELEASE, version="1.1.0", payload="delta"),
        event("pi-01", 2, now - 450, "install.succeeded", version="1.1.0", previous="1.0.0", source="ota"),
        event("pi-01", 3, now - 200, "rollback", automatic=True, reason="error rate", version="1.0.0",
              previous="1.1.0"),
        event("pi-01", 4, now - 100, "install.succeeded", version="1.1.0", previous="1.0.0", source="command"),
        event("pi-02", 1, now - 250, "ota.started", release_id=RELEASE, version="1.1.0", payload="delta"),
    )  # fmt: skip
    alerts = (
        Alert("pi-01", AlertKind.ERROR_RATE, AlertLevel.ALERT, now - 220, "errors 40% > 5%", version="1.1.0"),
        Alert("pi-02", AlertKind.DRIFT, AlertLevel.WARN, now - 60, "psi 0.14 (warn)", version="1.0.0"),
    )
    store.write_batch(IngestBatch(telemetry=(too_old, *rows, pi02), events=events, open_alerts=alerts))
    store.close_alert("pi-01", AlertKind.ERROR_RATE, at=now - 150)
    return Fleet(rows, executions)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    s = open_store(tmp_path / "fleet.db")
    try:
        yield s
    finally:
        s.close()


def test_overview_counts_devices_rollouts_alerts_and_releases(store: FleetStore) -> None:
    fill_fleet(store)
    ov = views.overview(store, NOW)
    assert ov["devices"] == {
        "total": 4,
        "online": 3,
        "offline": 1,
        "by_version": {"1.0.0": 2, "1.1.0": 1, views.NO_VERSION: 1},
        "by_health": {"degraded": 1, "no-model": 1, "ok": 2},
    }
    assert [r["id"] for r in ov["rollouts"]] == [ROLLOUT, OLD_ROLLOUT]  # newest first
    running = ov["rollouts"][0]
    assert running["status"] == "running" and running["phase"] == 1 and running["phases"] == [0.34, 1.0]
    assert running["counts"]["succeeded"] == 1 and running["counts"]["skipped"] == 1
    assert [(a["device_id"], a["kind"]) for a in ov["alerts"]] == [("pi-02", "drift")]  # the closed one is gone
    assert ov["releases"] == 2
    json.dumps(ov, allow_nan=False)  # the API can send it as is


def test_rollout_view_progress_per_phase_and_skipped() -> None:
    spec = RolloutSpec(phases=(0.25, 0.5, 1.0))
    r = Rollout("r1", RolloutKind.UPDATE, "rel", "2.0.0", "rpi4", "g", spec, RolloutStatus.RUNNING, 1.0, 2.0)
    ex = [
        Execution("r1", "a", ExecStatus.SUCCEEDED, 0, 2.0),
        Execution("r1", "b", ExecStatus.FAILED, 1, 2.0),
        Execution("r1", "c", ExecStatus.IN_PROGRESS, 1, 2.0),
        Execution("r1", "d", ExecStatus.QUEUED, 2, 2.0),
        Execution("r1", "e", ExecStatus.SKIPPED, 0, 2.0),
        Execution("r1", "f", ExecStatus.QUEUED, 4, 2.0),  # a late joiner's phase index beyond the spec
    ]
    v = views.rollout_view(r, ex)
    assert v["devices"] == 5 and v["skipped"] == ["e"]
    assert set(v["counts"]) == {s.value for s in ExecStatus} and v["counts"]["timed_out"] == 0
    phases = {p["phase"]: p for p in v["per_phase"]}
    assert sorted(phases) == [0, 1, 2, 4]
    assert phases[0]["devices"] == 1 and phases[0]["counts"]["succeeded"] == 1 and phases[0]["fraction"] == 0.25
    assert phases[1]["counts"]["failed"] == 1 and phases[1]["counts"]["in_progress"] == 1
    assert phases[4]["fraction"] is None and phases[4]["devices"] == 1
    assert "executions" not in v
    full = views.rollout_view(r, ex, include_executions=True)
    assert [e["device_id"] for e in full["executions"]] == ["a", "b", "c", "d", "e", "f"]


def test_overview_lists_active_rollouts_and_only_the_ten_most_recent_others(store: FleetStore) -> None:
    store.put_release(ReleaseRecord("rel", "m", "1.0.0", "rpi4", NOW, "00" * 32, 1))
    oldest_active = Rollout("r-000", RolloutKind.UPDATE, "rel", "1.0.0", "rpi4", "g0", RolloutSpec(),
                            RolloutStatus.SUCCEEDED, NOW - 5000, NOW - 5000)  # fmt: skip
    store.create_rollout(oldest_active, [])
    for i in range(1, 13):
        r = replace(oldest_active, rollout_id=f"r-{i:03d}", group=f"g{i}", status=RolloutStatus.FAILED,
                    created_at=NOW - 5000 + i)  # fmt: skip
        store.create_rollout(r, [])
    shown = [r["id"] for r in views.overview(store, NOW)["rollouts"]]
    assert shown == [f"r-{i:03d}" for i in range(12, 2, -1)] + ["r-000"]


def test_device_view_has_record_series_events_alerts_and_slot_history(store: FleetStore) -> None:
    fleet = fill_fleet(store)
    v = views.device_view(store, "pi-01", NOW, 3600)
    assert v is not None
    assert v["device"]["active_version"] == "1.1.0" and v["device"]["all_groups"] == ["lab"]
    assert v["latest"]["seq"] == TELEMETRY_POINTS and v["latest"]["p95_ms"] == fleet.telemetry[-1].p95_ms
    series = v["series"]  # the row of two hours ago is outside the window
    assert [p["ts"] for p in series] == [r.received_at for r in fleet.telemetry]
    assert [p["p99_ms"] for p in series] == pytest.approx([r.p99_ms for r in fleet.telemetry])
    assert [e["seq"] for e in v["events"]] == [4, 3, 2, 1]  # newest first, pi-01's only
    assert [(s["type"], s["version"], s["previous"]) for s in v["slots"]] == [
        ("install.succeeded", "1.1.0", "1.0.0"),
        ("rollback", "1.0.0", "1.1.0"),
        ("install.succeeded", "1.1.0", "1.0.0"),
    ]
    assert v["slots"][1]["automatic"] is True and v["slots"][1]["reason"] == "error rate"
    assert [(a["kind"], a["closed_at"]) for a in v["alerts"]] == [("error_rate", NOW - 150)]
    wide = views.device_view(store, "pi-01", NOW, 3 * 3600)
    assert wide is not None and len(wide["series"]) == TELEMETRY_POINTS + 1
    assert views.device_view(store, "nobody", NOW) is None
    json.dumps(v, allow_nan=False)


def test_device_view_of_a_device_without_telemetry(store: FleetStore) -> None:
    fill_fleet(store)
    v = views.device_view(store, "pi-03", NOW)
    assert v is not None
    assert v["latest"] is None and v["series"] == [] and v["slots"] == []
    assert v["device"]["online"] is False and v["device"]["offline_reason"] == "connection lost"


def test_release_view_has_lineage_payloads_and_its_rollouts_only(store: FleetStore) -> None:
    fill_fleet(store)
    v = views.release_view(store, RELEASE)
    assert v is not None
    rel = v["release"]
    assert rel["lineage"]["source"]["sha256"] == "5a" * 32
    assert rel["lineage"]["gate"]["metrics"]["agreement"] == 0.996
    assert [p["kind"] for p in rel["payloads"]] == ["full", "delta"]
    assert rel["approval"] == "pending" and rel["size"] == 120320
    assert [r["id"] for r in v["rollouts"]] == [ROLLOUT]
    assert v["rollouts"][0]["per_phase"][1]["counts"]["queued"] == 1
    old = views.release_view(store, OTHER_RELEASE)
    assert old is not None and [r["id"] for r in old["rollouts"]] == [OLD_ROLLOUT]
    assert views.release_view(store, "nope") is None


def test_rollouts_view_filters_by_status_and_limits(store: FleetStore) -> None:
    fill_fleet(store)
    assert [r["id"] for r in views.rollouts_view(store)] == [ROLLOUT, OLD_ROLLOUT]
    assert [r["id"] for r in views.rollouts_view(store, statuses=[RolloutStatus.ABORTED])] == [OLD_ROLLOUT]
    assert [r["id"] for r in views.rollouts_view(store, limit=1)] == [ROLLOUT]
    with pytest.raises(ValueError):
        views.rollouts_view(store, limit=-1)
