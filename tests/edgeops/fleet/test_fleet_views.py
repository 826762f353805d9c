"""The dashboard/API/CLI views over a real SQLite store filled through the store API.

The fleet is tests/support/fleet_data.py's ``fill_fleet``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edgeops.fleet import views
from edgeops.fleet.model import ExecStatus, Execution, ReleaseRecord, Rollout, RolloutKind, RolloutSpec, RolloutStatus
from edgeops.fleet.store import FleetStore, open_store
from tests.support.fleet_data import NOW, OLD_ROLLOUT, OTHER_RELEASE, RELEASE, ROLLOUT, TELEMETRY_POINTS, fill_fleet


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
