"""A small fleet written through the store API, for the views, HTTP and browser tests: four devices (one
offline, one of another profile), two releases, a running rollout in two phases, an older aborted one, telemetry
of pi-01, events with slot changes, and alerts."""

from __future__ import annotations

from dataclasses import dataclass

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
from edgeops.fleet.store import FleetStore

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


