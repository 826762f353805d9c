"""The fleet service's value types: devices, releases, rollouts, executions, telemetry, events, alerts.

These are plain frozen dataclasses shared by the store (``edgeops.fleet.store``), the sans-I/O cores
(``registry``, ``ingest``, ``alerts``, ``rollout_planner``) and the adapters (controller, HTTP, CLI). The names of
the enums are on the wire and in the database: they never change meaning. Times are Unix seconds (float) of the
*fleet service's* clock unless a field says ``device clock``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "Alert",
    "AlertKind",
    "AlertLevel",
    "Approval",
    "DeviceRecord",
    "EventRow",
    "ExecStatus",
    "Execution",
    "IngestBatch",
    "ReleaseRecord",
    "Rollout",
    "RolloutKind",
    "RolloutSpec",
    "RolloutStatus",
    "TelemetryRow",
    "parse_percent",
    "parse_phases",
]


class _WireEnum(str, Enum):
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ExecStatus(_WireEnum):
    """One device's part in a rollout (as AWS IoT Jobs' job executions)."""

    QUEUED = "queued"  # in the rollout, its phase has not started (or it is offline and waits)
    IN_PROGRESS = "in_progress"  # the command was sent; no outcome yet
    SUCCEEDED = "succeeded"  # the device runs the target version, gate passed
    FAILED = "failed"  # the device refused or failed the update, or an alert fired in the wait window
    ROLLED_BACK = "rolled_back"  # sent back to its previous model by the rollout (auto-rollback / rollback)
    TIMED_OUT = "timed_out"  # no outcome within the rollout's timeout (counts as a failure)
    SKIPPED = "skipped"  # not eligible: another profile than the release's (listed, never sent)

    @property
    def terminal(self) -> bool:
        return self not in (ExecStatus.QUEUED, ExecStatus.IN_PROGRESS)

    @property
    def failure(self) -> bool:
        return self in (ExecStatus.FAILED, ExecStatus.TIMED_OUT, ExecStatus.ROLLED_BACK)


class RolloutStatus(_WireEnum):
    RUNNING = "running"  # phases advancing
    PAUSED = "paused"  # by the operator: nothing new is sent; outcomes are still recorded
    SUCCEEDED = "succeeded"  # every phase healthy; late members of the group still get the release
    FAILED = "failed"  # the failure threshold was crossed (auto-rollback, when asked, has been sent)
    ABORTED = "aborted"  # by the operator, or superseded by a newer rollout to the same group

    @property
    def active(self) -> bool:
        """Whether the controller still works on it (sends, records outcomes, adds late devices)."""
        return self in (RolloutStatus.RUNNING, RolloutStatus.PAUSED, RolloutStatus.SUCCEEDED)


class RolloutKind(_WireEnum):
    UPDATE = "update"  # install the release (ota-update)
    ROLLBACK = "rollback"  # send the devices running the release back to their previous model


class Approval(_WireEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class AlertKind(_WireEnum):
    DRIFT = "drift"  # the agent's PSI level is warn/alert
    ERROR_RATE = "error_rate"  # errors / requests over the interval above the threshold
    LATENCY = "latency"  # p95 over the profile's latency budget
    OFFLINE = "offline"  # last will or clean stop seen, or silent for longer than the offline timeout


class AlertLevel(_WireEnum):
    WARN = "warn"
    ALERT = "alert"


@dataclass(frozen=True)
class DeviceRecord:
    """What the fleet knows of one device, from its retained state, last will and telemetry."""

    device_id: str
    online: bool
    last_seen: float  # service clock: last message of any kind
    profile: str | None = None
    groups: tuple[str, ...] = ()  # the agent's own tags (agent.toml); fleet-assigned groups are apart
    active_version: str | None = None
    previous_version: str | None = None
    health: str | None = None  # ok | degraded | no-model (agent's word)
    agent_version: str | None = None
    offline_reason: str | None = None
    state: dict[str, Any] = field(default_factory=dict, compare=False)  # the last state payload as received
    assigned_groups: tuple[str, ...] = ()  # groups given from the fleet side (`edgeops devices assign`)

    @property
    def all_groups(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.groups) | set(self.assigned_groups)))


@dataclass(frozen=True)
class ReleaseRecord:
    """A release known to the fleet (from the release store) with its lineage and approval."""

    release_id: str
    name: str
    version: str
    profile: str
    created_at: float
    target_sha256: str
    size: int  # bytes of the target artifact
    payloads: tuple[dict[str, Any], ...] = ()  # {"kind", "base_version", "size"} per payload
    lineage: dict[str, Any] = field(default_factory=dict, compare=False)  # source/data hash, toolchain, metrics
    approval: Approval = Approval.PENDING
    approved_by: str | None = None
    approved_at: float | None = None


@dataclass(frozen=True)
class RolloutSpec:
    """How a rollout proceeds. ``phases`` are cumulative fractions of the eligible devices, the last one 1.0."""

    phases: tuple[float, ...] = (1.0,)
    max_failures: float = 0.1  # fraction of the devices that finished; crossing it stops the rollout
    min_devices: int = 1  # devices that must have finished before the threshold is evaluated
    wait_s: float = 0.0  # healthy window after a phase's devices all succeeded before the next phase
    timeout_s: float = 600.0  # per device: sent → outcome; past it the execution is timed_out
    auto_rollback: bool = False  # on failure, send the failed phase's updated devices back
    continuous: bool = True  # devices that join the group (or come online) later get the release

    def __post_init__(self) -> None:
        ph = self.phases
        if not ph or any(not (0.0 < p <= 1.0) for p in ph) or list(ph) != sorted(set(ph)) or ph[-1] != 1.0:
            raise ValueError(f"phases must rise strictly within (0, 1] and end at 1.0, got {ph}")
        if not 0.0 <= self.max_failures <= 1.0:
            raise ValueError(f"max_failures must be within [0, 1], got {self.max_failures}")
        if self.min_devices < 1 or self.wait_s < 0 or self.timeout_s <= 0:
            raise ValueError("min_devices must be >= 1, wait_s >= 0 and timeout_s > 0")

    def to_json(self) -> dict[str, Any]:
        return {
            "phases": list(self.phases),
            "max_failures": self.max_failures,
            "min_devices": self.min_devices,
            "wait_s": self.wait_s,
            "timeout_s": self.timeout_s,
            "auto_rollback": self.auto_rollback,
            "continuous": self.continuous,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RolloutSpec:
        return cls(
            phases=tuple(float(p) for p in doc["phases"]),
            max_failures=float(doc["max_failures"]),
            min_devices=int(doc["min_devices"]),
            wait_s=float(doc["wait_s"]),
            timeout_s=float(doc["timeout_s"]),
            auto_rollback=bool(doc["auto_rollback"]),
            continuous=bool(doc.get("continuous", True)),
        )


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    kind: RolloutKind
    release_id: str
    version: str  # the release's version (update) or the version rolled away from (rollback)
    profile: str
    group: str
    spec: RolloutSpec
    status: RolloutStatus
    created_at: float
    updated_at: float
    phase: int = 0  # index into spec.phases of the phase being sent / watched
    phase_started_at: float | None = None
    phase_healthy_since: float | None = None  # when every device of the phase had succeeded
    reason: str = ""  # why it failed / was aborted, or the last decision


@dataclass(frozen=True)
class Execution:
    rollout_id: str
    device_id: str
    status: ExecStatus
    phase: int  # the phase the device belongs to (late joiners: the phase current when they joined)
    updated_at: float
    reason: str = ""  # event type and reason code of the outcome ("ota.failed install-failed golden")
    nonce: str | None = None  # of the last command sent
    sent_at: float | None = None
    attempts: int = 0


@dataclass(frozen=True)
class TelemetryRow:
    """One telemetry message, flattened for the store; ``raw`` keeps the payload as received."""

    device_id: str
    seq: int
    ts: float  # device clock
    received_at: float
    model_version: str | None
    interval_s: float | None
    latency_count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    requests: int
    errors: int
    fallback_answers: int
    cpu_percent: float | None
    rss_mb: float | None
    temperature_c: float | None
    drift_level: str | None  # ok | warn | alert | insufficient
    drift_psi_max: float | None
    health: str | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class EventRow:
    device_id: str
    seq: int
    ts: float  # device clock
    received_at: float
    type: str
    body: dict[str, Any] = field(default_factory=dict, compare=False)  # the whole event payload


@dataclass(frozen=True)
class Alert:
    device_id: str
    kind: AlertKind
    level: AlertLevel
    opened_at: float
    detail: str
    version: str | None = None  # the model version the device ran when it opened
    closed_at: float | None = None
    alert_id: int | None = None  # assigned by the store


@dataclass(frozen=True)
class IngestBatch:
    """What one ingest commit writes, in one transaction (see FleetStore.write_batch)."""

    telemetry: tuple[TelemetryRow, ...] = ()
    events: tuple[EventRow, ...] = ()
    open_alerts: tuple[Alert, ...] = ()  # opened unless one of the same (device, kind) is open already
    close_alerts: tuple[tuple[str, AlertKind, float], ...] = ()  # (device_id, kind, closed_at)
    seen: tuple[tuple[str, float], ...] = ()  # (device_id, last_seen) to raise, never lower


def parse_percent(text: str) -> float:
    """``"5%"``, ``"5"`` or ``"0.05"``... → a fraction. Numbers above 1 (or with %) are percentages.

    Raises ValueError for anything else or a value outside (0, 100] %."""
    raw = text.strip()
    pct = raw.endswith("%")
    value = float(raw.rstrip("%"))
    if not math.isfinite(value):
        raise ValueError(f"not a percentage: {text!r}")
    frac = value / 100.0 if (pct or value > 1.0) else value
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"percentage out of range: {text!r}")
    return frac


def parse_phases(phases: str | None, canary: str | None) -> tuple[float, ...]:
    """The cumulative phase fractions of ``--canary`` and ``--phases`` (``"5,25,100"``), ending at 1.0.

    Raises ValueError for a malformed list, a non-rising list, or a canary not below the first phase."""
    out: list[float] = []
    if canary is not None:
        c = parse_percent(canary)
        if c <= 0.0:
            raise ValueError("--canary must be above 0%")
        out.append(c)
    for part in (phases.split(",") if phases else []):
        f = parse_percent(part)
        if f <= 0.0:
            raise ValueError("a phase must be above 0%")
        if out and f <= out[-1]:
            if f == out[-1] and canary is not None and len(out) == 1:
                continue  # --canary 5% --phases 5,25,100: the first phase is the canary
            raise ValueError(f"phases must rise: {phases!r}")
        out.append(f)
    if not out or out[-1] != 1.0:
        out.append(1.0)
    return tuple(out)
