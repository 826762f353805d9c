"""What the dashboard, the JSON API and the CLI show: store reads turned into JSON-able dicts.

Every function here reads the store (``edgeops.fleet.store.FleetStore``) and returns plain ``dict``/``list``/
``str``/``int``/``float``/``bool``/``None`` values, so that the HTTP server (``/api/...``) and the CLI
(``edgeops rollout status --json``, ``edgeops devices show --json``) print the same documents. The shapes are a
contract: keys may be added, never removed or renamed. Enums appear by their wire names; times are Unix seconds
of the fleet service's clock (``ts`` fields of telemetry and events: the device's clock).

Guarantees: a view never writes to the store and never raises for what the store holds (an unknown id gives
``None``); every status key is present in a ``counts`` map, with 0 where no execution has it. It does not
paginate or authorise (the HTTP adapter bounds what it asks for), and it does not format for humans.

Shapes (``...`` = the fields of the record, see the ``*_view`` / ``*_summary`` functions)::

    overview     {generated_at, devices: {total, online, offline, by_version: {v: n}, by_health: {h: n}},
                  rollouts: [rollout_view...], alerts: [alert...], releases: n}
    rollout_view {id, kind, release_id, version, profile, group, status, phase, phases: [fraction...], spec,
                  reason, created_at, updated_at, phase_started_at, devices, counts: {status: n},
                  per_phase: [{phase, fraction, devices, counts}], skipped: [device ids]
                  (+ executions: [execution...] when asked)}
    device_view  {device: {..., state}, latest: telemetry | None, series: [point...], window_s, events: [event...],
                  alerts: [alert...], slots: [{received_at, ts, type, version, previous, reason, automatic}]}
    release_view {release: {..., lineage, payloads}, rollouts: [rollout_view...]}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from edgeops.fleet.model import (
    Alert,
    DeviceRecord,
    EventRow,
    ExecStatus,
    Execution,
    ReleaseRecord,
    Rollout,
    RolloutStatus,
    TelemetryRow,
)

if TYPE_CHECKING:
    from edgeops.fleet.store import FleetStore

__all__ = [
    "ACTIVE_STATUSES",
    "EVENT_LIMIT",
    "NO_HEALTH",
    "NO_VERSION",
    "RECENT_ROLLOUTS",
    "SLOT_EVENTS",
    "alert_view",
    "device_summary",
    "device_view",
    "event_view",
    "execution_view",
    "overview",
    "release_summary",
    "release_view",
    "rollout_view",
    "rollouts_shown",
    "rollouts_view",
    "status_counts",
    "telemetry_view",
]

RECENT_ROLLOUTS = 10  # finished rollouts the overview lists beside the active ones
EVENT_LIMIT = 100  # events / alerts / slot changes a device view lists, newest first
NO_VERSION = "none"  # by_version key of devices that run no model (a semver is never "none")
NO_HEALTH = "unknown"  # by_health key of devices that never reported a health word
SLOT_EVENTS = ("install.succeeded", "shadow.promoted", "rollback")  # events that change a device's active slot
ACTIVE_STATUSES = tuple(s for s in RolloutStatus if s.active)


def status_counts(executions: Iterable[Execution]) -> dict[str, int]:
    """Executions per status: every ExecStatus wire name, 0 where none has it."""
    counts = Counter(e.status.value for e in executions)
    return {s.value: counts.get(s.value, 0) for s in ExecStatus}


def execution_view(e: Execution) -> dict[str, Any]:
    return {
        "device_id": e.device_id,
        "status": e.status.value,
        "phase": e.phase,
        "updated_at": e.updated_at,
        "reason": e.reason,
        "sent_at": e.sent_at,
        "attempts": e.attempts,
    }


def rollout_view(
    rollout: Rollout, executions: Sequence[Execution], *, include_executions: bool = False
) -> dict[str, Any]:
    """One rollout with its progress: totals, per phase, and the skipped devices.

    ``devices`` and ``per_phase`` count the eligible executions (skipped ones are listed apart, in ``skipped``);
    ``counts`` counts all of them. An execution of a phase index past the spec's (a late joiner) gets its own
    ``per_phase`` entry with ``fraction`` None. Raises nothing."""
    phases = rollout.spec.phases
    eligible = [e for e in executions if e.status is not ExecStatus.SKIPPED]
    indices = sorted(set(range(len(phases))) | {e.phase for e in eligible})
    per_phase = []
    for i in indices:
        members = [e for e in eligible if e.phase == i]
        fraction = phases[i] if 0 <= i < len(phases) else None
        per_phase.append({"phase": i, "fraction": fraction, "devices": len(members), "counts": status_counts(members)})
    doc: dict[str, Any] = {
        "id": rollout.rollout_id,
        "kind": rollout.kind.value,
        "release_id": rollout.release_id,
        "version": rollout.version,
        "profile": rollout.profile,
        "group": rollout.group,
        "status": rollout.status.value,
        "phase": rollout.phase,
        "phases": list(phases),
        "spec": rollout.spec.to_json(),
        "reason": rollout.reason,
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
        "phase_started_at": rollout.phase_started_at,
        "devices": len(eligible),
        "counts": status_counts(executions),
        "per_phase": per_phase,
        "skipped": sorted(e.device_id for e in executions if e.status is ExecStatus.SKIPPED),
    }
    if include_executions:
        doc["executions"] = [execution_view(e) for e in sorted(executions, key=lambda e: e.device_id)]
    return doc


def device_summary(rec: DeviceRecord) -> dict[str, Any]:
    """A registry record without its raw state payload."""
    return {
        "device_id": rec.device_id,
        "online": rec.online,
        "last_seen": rec.last_seen,
        "profile": rec.profile,
        "groups": list(rec.groups),
        "assigned_groups": list(rec.assigned_groups),
        "all_groups": list(rec.all_groups),
        "active_version": rec.active_version,
        "previous_version": rec.previous_version,
        "health": rec.health,
        "agent_version": rec.agent_version,
        "offline_reason": rec.offline_reason,
    }


def release_summary(rec: ReleaseRecord, *, lineage: bool = True) -> dict[str, Any]:
    """A release record; ``lineage`` False leaves out the lineage (lists of many releases)."""
    doc: dict[str, Any] = {
        "release_id": rec.release_id,
        "name": rec.name,
        "version": rec.version,
        "profile": rec.profile,
        "created_at": rec.created_at,
        "target_sha256": rec.target_sha256,
        "size": rec.size,
        "payloads": [dict(p) for p in rec.payloads],
        "approval": rec.approval.value,
        "approved_by": rec.approved_by,
        "approved_at": rec.approved_at,
    }
    if lineage:
        doc["lineage"] = dict(rec.lineage)
    return doc


def alert_view(a: Alert) -> dict[str, Any]:
    return {
        "alert_id": a.alert_id,
        "device_id": a.device_id,
        "kind": a.kind.value,
        "level": a.level.value,
        "opened_at": a.opened_at,
        "closed_at": a.closed_at,
        "detail": a.detail,
        "version": a.version,
    }


def event_view(e: EventRow) -> dict[str, Any]:
    return {
        "device_id": e.device_id,
        "seq": e.seq,
        "ts": e.ts,
        "received_at": e.received_at,
        "type": e.type,
        "body": dict(e.body),
    }


def telemetry_view(row: TelemetryRow) -> dict[str, Any]:
    """A telemetry row without its raw payload."""
    return {
        "device_id": row.device_id,
        "seq": row.seq,
        "ts": row.ts,
        "received_at": row.received_at,
        "model_version": row.model_version,
        "interval_s": row.interval_s,
        "latency_count": row.latency_count,
        "p50_ms": row.p50_ms,
        "p95_ms": row.p95_ms,
        "p99_ms": row.p99_ms,
        "max_ms": row.max_ms,
        "requests": row.requests,
        "errors": row.errors,
        "fallback_answers": row.fallback_answers,
        "cpu_percent": row.cpu_percent,
        "rss_mb": row.rss_mb,
        "temperature_c": row.temperature_c,
        "drift_level": row.drift_level,
        "drift_psi_max": row.drift_psi_max,
        "health": row.health,
    }


def _rollouts_with_progress(store: FleetStore, rollouts: Iterable[Rollout]) -> list[dict[str, Any]]:
    return [rollout_view(r, store.list_executions(r.rollout_id)) for r in rollouts]


def rollouts_shown(rollouts: Iterable[Rollout]) -> list[Rollout]:
    """The rollouts the overview (and the metrics) show, in the given order: every active one, and the first
    RECENT_ROLLOUTS of the others."""
    shown: list[Rollout] = []
    others = 0
    for r in rollouts:
        if r.status.active:
            shown.append(r)
        elif others < RECENT_ROLLOUTS:
            shown.append(r)
            others += 1
    return shown


def overview(store: FleetStore, now: float) -> dict[str, Any]:
    """The fleet at a glance: device counts, the active rollouts and the RECENT_ROLLOUTS most recent others
    (newest first), open alerts (newest first) and the number of releases.

    Raises StorageError when the store is down."""
    devices = store.list_devices()
    online = sum(1 for d in devices if d.online)
    by_version = Counter(d.active_version or NO_VERSION for d in devices)
    by_health = Counter(d.health or NO_HEALTH for d in devices)
    return {
        "generated_at": now,
        "devices": {
            "total": len(devices),
            "online": online,
            "offline": len(devices) - online,
            "by_version": dict(sorted(by_version.items())),
            "by_health": dict(sorted(by_health.items())),
        },
        "rollouts": _rollouts_with_progress(store, rollouts_shown(store.list_rollouts())),
        "alerts": [alert_view(a) for a in store.list_alerts(open_only=True)],
        "releases": len(store.list_releases()),
    }


def rollouts_view(
    store: FleetStore, *, statuses: Iterable[RolloutStatus] | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The ``limit`` newest rollouts (of ``statuses``, when given) with their progress.

    Raises StorageError when the store is down; ValueError for a negative limit."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    wanted = None if statuses is None else tuple(statuses)
    return _rollouts_with_progress(store, store.list_rollouts(statuses=wanted)[:limit])


def _slot_change(e: EventRow) -> dict[str, Any]:
    body = e.body
    return {
        "received_at": e.received_at,
        "ts": e.ts,
        "type": e.type,
        "version": body.get("version"),
        "previous": body.get("previous"),
        "reason": body.get("reason"),
        "automatic": body.get("automatic"),
    }


def device_view(store: FleetStore, device_id: str, now: float, window_s: float = 3600.0) -> dict[str, Any] | None:
    """One device: its record (with the raw state payload), latest telemetry, the telemetry series of the last
    ``window_s`` seconds before ``now`` (oldest first; points as ``FleetStore.telemetry_series``), its
    EVENT_LIMIT most recent events and alerts (open or closed), and its slot history (SLOT_EVENTS, newest first).
    ``None`` for a device the registry does not know.

    Raises StorageError when the store is down; ValueError for a window that is not positive."""
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    rec = store.get_device(device_id)
    if rec is None:
        return None
    latest = store.latest_telemetry([device_id]).get(device_id)
    device = device_summary(rec)
    device["state"] = dict(rec.state)
    slots = store.events_since(since=0.0, device_ids=[device_id], types=SLOT_EVENTS)
    return {
        "device": device,
        "latest": telemetry_view(latest) if latest is not None else None,
        "window_s": window_s,
        "series": store.telemetry_series(device_id, since=now - window_s),
        "events": [event_view(e) for e in store.recent_events(device_id, limit=EVENT_LIMIT)],
        "alerts": [alert_view(a) for a in store.list_alerts(open_only=False, device_id=device_id)[:EVENT_LIMIT]],
        "slots": [_slot_change(e) for e in reversed(slots[-EVENT_LIMIT:])],
    }


def release_view(store: FleetStore, release_id: str) -> dict[str, Any] | None:
    """One release with its lineage and payloads, and every rollout of it (newest first) with its progress.
    ``None`` for an unknown release.

    Raises StorageError when the store is down."""
    rec = store.get_release(release_id)
    if rec is None:
        return None
    mine = [r for r in store.list_rollouts() if r.release_id == release_id]
    return {"release": release_summary(rec), "rollouts": _rollouts_with_progress(store, mine)}
