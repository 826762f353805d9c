"""The rollout planner: what to do next for one rollout, from what the store holds (sans-I/O).

:func:`start_rollout` turns a group's members into a rollout and one execution per member (queued with its
phase, already succeeded, or skipped). :func:`plan_rollout` is called on every controller tick with the rollout,
its executions, the group's current members, the group's events and the health alerts since the rollout began,
and returns a :class:`Decision`: the executions that change, the devices to send the rollout's command to, the
devices to send back (auto-rollback), and the rollout's new status and phase.

Guarantees:

* it opens no file and no socket, reads no clock (``now`` is passed in) and keeps no state between calls: the
  same inputs give the same decision, and a decision applied and planned again with nothing new is
  ``changed=False`` with nothing to send (so a controller killed at any point may simply tick again);
* phases are reproducible: the N devices to send ordered by id, phase *i* holding ``ceil(phases[i] * N)`` of
  them cumulatively, the first phase at least one (devices already at the version take no place: they are
  succeeded in phase 0);
* auto-rollback sends back only devices that this rollout sent the release to (never one that had it already);
* an outcome is read from the device's own events, in the device's order (``seq``), the last decisive one
  winning; a terminal execution changes only when a succeeded device rolls itself back (→ failed) or an alert
  opens on it in the watch window (→ failed), and a timed-out one only on a late outcome;
* a paused rollout sends nothing and does not advance; a failed or aborted one never adds or sends (a failed one
  may still send back late successes of its failed phase when ``auto_rollback`` is on);
* the failure threshold is evaluated before the rollout may advance.

It does not: sign, publish or choose nonces (the caller fills ``Execution.nonce`` in when it sends), decide which
devices belong to the group, read alerts of kind ``offline`` as failures, evaluate the threshold while paused or
after the rollout succeeded, or retry a failed or timed-out device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgeops.errors import RolloutError
from edgeops.fleet.model import (
    Alert,
    AlertKind,
    DeviceRecord,
    EventRow,
    ExecStatus,
    Execution,
    Rollout,
    RolloutKind,
    RolloutSpec,
    RolloutStatus,
)

__all__ = ["Decision", "StartPlan", "assign_phase", "plan_rollout", "start_rollout"]

_OPEN = (ExecStatus.QUEUED, ExecStatus.IN_PROGRESS, ExecStatus.TIMED_OUT)  # an outcome may still land on these
_HEALTH_ALERTS = (AlertKind.ERROR_RATE, AlertKind.DRIFT, AlertKind.LATENCY)
_SUCCESS, _FAILURE, _DEVICE_ROLLBACK = "success", "failure", "device-rollback"  # what one event says
_EPS = 1e-9  # so that ceil(0.1 * 30) is 3, not 4


@dataclass(frozen=True)
class StartPlan:
    rollout: Rollout
    executions: tuple[Execution, ...]  # one per group member: queued, succeeded (already there) or skipped
    skipped: tuple[str, ...]  # ids of the skipped devices


@dataclass(frozen=True)
class Decision:
    rollout: Rollout  # the rollout as it should be stored (updated_at=now when anything changed)
    executions: tuple[Execution, ...]  # only new or changed executions, by device id
    send: tuple[str, ...]  # devices to send the rollout's command to now (ota-update or rollback)
    send_back: tuple[str, ...]  # devices to send `rollback` (auto-rollback)
    notes: tuple[str, ...]  # one human line per change
    changed: bool


def assign_phase(fraction_list: Sequence[float], n: int) -> list[int]:
    """The phase index of each of ``n`` devices in rollout order.

    Phase *i* holds the devices up to ``ceil(fraction_list[i] * n)`` counted from the first; the first phase holds
    at least one device (when ``n >= 1``); later phases may be empty when ``n`` is small.

    Raises ValueError for a negative ``n`` or fractions that do not rise strictly within (0, 1] to 1.0."""
    fractions = list(fraction_list)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rising = all(b > a for a, b in itertools.pairwise(fractions))
    if not fractions or fractions[-1] != 1.0 or not rising or fractions[0] <= 0.0:
        raise ValueError(f"phases must rise strictly within (0, 1] and end at 1.0, got {fractions}")
    out: list[int] = []
    for index, fraction in enumerate(fractions):
        bound = min(n, math.ceil(fraction * n - _EPS))
        if index == 0:
            bound = max(bound, min(n, 1))
        out.extend([index] * max(0, bound - len(out)))
    return out


def start_rollout(
    *,
    rollout_id: str,
    kind: RolloutKind,
    release_id: str,
    version: str,
    profile: str,
    group: str,
    spec: RolloutSpec,
    devices: Sequence[DeviceRecord],
    now: float,
) -> StartPlan:
    """A new running rollout of ``version`` to ``devices`` (the group's members), at phase 0.

    Update: devices of another profile are skipped, devices already at the version succeed at once, the others
    are queued in phases. Rollback: the devices running ``version`` are queued in one phase, the others skipped.

    Raises RolloutError when the group has no devices or none is eligible (the message names the profiles or
    versions found); ValueError for duplicate device ids or a rollback whose spec has more than one phase."""
    if not devices:
        raise RolloutError(f"group {group} has no devices")
    if kind is RolloutKind.ROLLBACK and len(spec.phases) != 1:
        raise ValueError(f"a rollback has one phase (phases=(1.0,)), got {spec.phases}")
    ordered = sorted(devices, key=lambda d: d.device_id)
    if len({d.device_id for d in ordered}) != len(ordered):
        raise ValueError("duplicate device ids")
    entries = [(d.device_id, *_entry(kind, version, profile, d)) for d in ordered]
    if all(status is ExecStatus.SKIPPED for _, status, _ in entries):
        raise RolloutError(_nothing_eligible(kind, version, profile, group, ordered))
    queued = [device_id for device_id, status, _ in entries if status is ExecStatus.QUEUED]
    phase_of = dict(zip(queued, assign_phase(spec.phases, len(queued))))
    executions = tuple(
        Execution(rollout_id, device_id, status, phase_of.get(device_id, 0), now, reason)
        for device_id, status, reason in entries
    )
    skipped = tuple(device_id for device_id, status, _ in entries if status is ExecStatus.SKIPPED)
    ready = len(entries) - len(queued) - len(skipped)
    reason = f"started: {len(queued)} to send in {len(spec.phases)} phase(s), {ready} already there"
    reason += f", {len(skipped)} skipped"
    rollout = Rollout(
        rollout_id=rollout_id, kind=kind, release_id=release_id, version=version, profile=profile, group=group,
        spec=spec, status=RolloutStatus.RUNNING, created_at=now, updated_at=now, phase=0, phase_started_at=now,
        reason=reason,
    )  # fmt: skip
    return StartPlan(rollout, executions, skipped)


def _entry(kind: RolloutKind, version: str, profile: str, device: DeviceRecord) -> tuple[ExecStatus, str]:
    """How a member enters a rollout: QUEUED (needs the command), SUCCEEDED (already there) or SKIPPED."""
    if kind is RolloutKind.ROLLBACK:
        if device.active_version == version:
            return ExecStatus.QUEUED, ""
        return ExecStatus.SKIPPED, f"not running {version}"
    if device.profile != profile:
        return ExecStatus.SKIPPED, f"profile {device.profile or 'unknown'}, release is for {profile}"
    if device.active_version == version:
        return ExecStatus.SUCCEEDED, "already at version"
    return ExecStatus.QUEUED, ""


def _nothing_eligible(
    kind: RolloutKind, version: str, profile: str, group: str, devices: Sequence[DeviceRecord]
) -> str:
    if kind is RolloutKind.ROLLBACK:
        versions = ", ".join(sorted({d.active_version or "none" for d in devices}))
        return f"no device of group {group} runs {version} (versions found: {versions})"
    profiles = ", ".join(sorted({d.profile or "unknown" for d in devices}))
    return f"no device of group {group} has profile {profile}, the release's (profiles found: {profiles})"


class _Tick:
    """The working state of one plan_rollout call: executions by device, the rollout, and what to report."""

    def __init__(
        self, rollout: Rollout, executions: Sequence[Execution], devices: Sequence[DeviceRecord], now: float
    ) -> None:
        self.now = now
        self.original = self.rollout = rollout
        self.before = {e.device_id: e for e in executions}
        self.execs = dict(self.before)
        self.devices = {d.device_id: d for d in devices}
        self.notes: list[str] = []
        self.send: list[str] = []
        self.send_back: list[str] = []

    def set_exec(self, ex: Execution, status: ExecStatus, reason: str, *, note: bool = True, **more: Any) -> None:
        self.execs[ex.device_id] = replace(ex, status=status, reason=reason, updated_at=self.now, **more)
        if note:
            self.notes.append(f"device {ex.device_id} {status}: {reason}")

    def set_rollout(self, note: str | None, **changes: Any) -> None:
        if note is not None:
            changes["reason"] = note
            self.notes.append(note)
        self.rollout = replace(self.rollout, **changes)

    def members(self, phase: int) -> list[Execution]:
        return [e for e in self.execs.values() if e.phase == phase and e.status is not ExecStatus.SKIPPED]

    def online(self, device_id: str) -> bool:
        device = self.devices.get(device_id)
        return device is not None and device.online

    def decision(self) -> Decision:
        changed_execs = tuple(e for key, e in sorted(self.execs.items()) if self.before.get(key) != e)
        changed = bool(changed_execs) or self.rollout != self.original
        rollout = replace(self.rollout, updated_at=self.now) if changed else self.original
        return Decision(rollout, changed_execs, tuple(self.send), tuple(self.send_back), tuple(self.notes), changed)


def plan_rollout(
    rollout: Rollout,
    *,
    devices: Sequence[DeviceRecord],
    executions: Sequence[Execution],
    events: Sequence[EventRow],
    alerts: Sequence[Alert],
    now: float,
) -> Decision:
    """The next step of ``rollout``, in this order:

    1. (continuous, running/paused/succeeded) group members without an execution join (late joiners);
    2. outcomes from the devices' events and reported state, then timeouts of in-progress executions;
    3. (update, running/paused) a health alert on a succeeded device of the phases so far fails it;
    4. (running) the failure threshold; a failed update with auto_rollback sends back its failed phase's installs;
    5. (running) a done phase with a success (or empty) is healthy from now; after wait_s, next phase or succeeded;
    6. (running, or succeeded and continuous) queued devices of the phases so far that are online are sent.

    Raises nothing for device data: an event field that is missing or of the wrong type says nothing."""
    tick = _Tick(rollout, executions, devices, now)
    status = rollout.status
    if status.active and rollout.spec.continuous:
        _add_late_joiners(tick)
    _record_outcomes(tick, events)
    _record_timeouts(tick)
    if status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED) and rollout.kind is RolloutKind.UPDATE:
        _record_alerts(tick, alerts)
    if status is RolloutStatus.RUNNING:
        _check_threshold(tick)
    if tick.rollout.status is RolloutStatus.FAILED:
        _auto_rollback(tick)
    if tick.rollout.status is RolloutStatus.RUNNING:
        _advance(tick)
    if tick.rollout.status is RolloutStatus.RUNNING or (
        tick.rollout.status is RolloutStatus.SUCCEEDED and rollout.spec.continuous
    ):
        _send(tick)
    return tick.decision()


def _add_late_joiners(tick: _Tick) -> None:
    """Members without an execution join: in the current phase, or the last one once the rollout succeeded."""
    r = tick.rollout
    phase = len(r.spec.phases) - 1 if r.status is RolloutStatus.SUCCEEDED else r.phase
    for device_id, device in sorted(tick.devices.items()):
        if device_id in tick.execs or (r.kind is RolloutKind.UPDATE and device.profile is None):
            continue  # an unknown profile waits for the device's state rather than being skipped for good
        status, reason = _entry(r.kind, r.version, r.profile, device)
        tick.execs[device_id] = Execution(r.rollout_id, device_id, status, phase, tick.now, reason)
        why = f" ({reason})" if reason else ""
        tick.notes.append(f"device {device_id} joined: {status} in phase {phase + 1}{why}")


def _record_outcomes(tick: _Tick, events: Sequence[EventRow]) -> None:
    r = tick.rollout
    by_device: dict[str, list[EventRow]] = {}
    for ev in events:
        if ev.received_at >= r.created_at and ev.device_id in tick.execs:
            by_device.setdefault(ev.device_id, []).append(ev)
    for device_id, ex in sorted(tick.execs.items()):
        device = tick.devices.get(device_id)
        status, reason = _fold(r, ex, device, sorted(by_device.get(device_id, ()), key=lambda e: e.seq))
        if r.kind is RolloutKind.ROLLBACK and status is ExecStatus.QUEUED and _moved_on(r, device):
            status, reason = ExecStatus.SKIPPED, f"no longer running {r.version}"
        if status is not ex.status:
            tick.set_exec(ex, status, reason)


def _fold(r: Rollout, ex: Execution, device: DeviceRecord | None, events: list[EventRow]) -> tuple[ExecStatus, str]:
    """The execution's status after the device's events (in its order), then after its reported state."""
    status, reason = ex.status, ex.reason
    still_open = status in _OPEN  # then the last decisive event wins; a terminal one only fails on a rollback
    seen_success = False
    for ev in events:
        verdict = _verdict(r, ev, device, ex.nonce)
        if verdict is None:
            continue
        said, why = verdict
        seen_success = seen_success or said == _SUCCESS
        if said == _DEVICE_ROLLBACK:
            # only a rollback after the success: one seen in this stream, or received since it was recorded
            if status is ExecStatus.SUCCEEDED and (seen_success or ev.received_at >= ex.updated_at):
                status, reason = ExecStatus.FAILED, why
        elif still_open:
            status, reason = (ExecStatus.SUCCEEDED if said == _SUCCESS else ExecStatus.FAILED), why
    if status in _OPEN and device is not None:
        by_state = _state_outcome(r, ex, device)
        if by_state is not None:
            status, reason = ExecStatus.SUCCEEDED, by_state
    return status, reason


def _verdict(r: Rollout, ev: EventRow, device: DeviceRecord | None, nonce: str | None) -> tuple[str, str] | None:
    """What one event says of the device's part in the rollout, if anything: (_SUCCESS|_FAILURE|..., reason)."""
    b = ev.body
    if ev.type in ("command.rejected", "command.failed"):
        if nonce is not None and b.get("nonce") == nonce:
            return _FAILURE, _line(ev.type, _text(b, "reason"), detail=_text(b, "detail"))
        return None
    if r.kind is RolloutKind.ROLLBACK:
        if ev.type == "rollback" and b.get("previous") == r.version:
            return _SUCCESS, f"rollback to {_text(b, 'version') or 'the previous model'}"
        return None
    if ev.type == "rollback" and b.get("previous") == r.version:
        return _DEVICE_ROLLBACK, f"rolled back by the device: {_text(b, 'reason')}"
    if ev.type == "install.succeeded" and b.get("version") == r.version:
        return _SUCCESS, f"install.succeeded {r.version}"
    if ev.type == "install.rejected" and b.get("version") == r.version:
        return _FAILURE, _line("install.rejected", _text(b, "check"), _text(b, "reason"))
    if b.get("release_id") != r.release_id:
        return None
    if ev.type == "ota.completed":
        return _SUCCESS, f"ota.completed {r.release_id}"
    if ev.type == "ota.rejected":
        if b.get("reason") == "not-newer" and device is not None and device.active_version == r.version:
            return _SUCCESS, "ota.rejected not-newer: already at version"
        return _FAILURE, f"ota.rejected {_text(b, 'reason')}: {_text(b, 'detail')}"
    if ev.type == "ota.failed":
        check = _text(b, "check")
        return _FAILURE, _line("ota.failed", _text(b, "reason"), check, detail="" if check else _text(b, "detail"))
    return None


def _state_outcome(r: Rollout, ex: Execution, device: DeviceRecord) -> str | None:
    """Success read from the device's reported state: the version active (update), or no longer (rollback)."""
    if r.kind is RolloutKind.UPDATE:
        return f"state shows {r.version} active" if device.active_version == r.version else None
    sent = ex.sent_at is not None and device.last_seen >= ex.sent_at
    if sent and device.active_version != r.version:
        return f"state shows {device.active_version or 'no model'} active"
    return None


def _moved_on(r: Rollout, device: DeviceRecord | None) -> bool:
    """A device queued to be sent back that now reports another version than the one to leave: leave it."""
    return device is not None and device.online and device.active_version != r.version


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    return value if isinstance(value, str) else ""


def _line(*words: str, detail: str = "") -> str:
    head = " ".join(w for w in words if w)
    return f"{head}: {detail}" if detail else head


def _record_timeouts(tick: _Tick) -> None:
    timeout = tick.rollout.spec.timeout_s
    for _, ex in sorted(tick.execs.items()):
        if ex.status is ExecStatus.IN_PROGRESS and ex.sent_at is not None and tick.now - ex.sent_at > timeout:
            tick.set_exec(ex, ExecStatus.TIMED_OUT, f"no outcome within {timeout:g} s")


def _record_alerts(tick: _Tick, alerts: Sequence[Alert]) -> None:
    """A health alert on a succeeded device of the phases so far fails it and restarts the healthy window."""
    failed_any = False
    for alert in sorted(alerts, key=lambda a: (a.opened_at, a.device_id)):
        ex = tick.execs.get(alert.device_id)
        if ex is not None and _alert_counts(tick.rollout, alert, ex):
            tick.set_exec(ex, ExecStatus.FAILED, _line("alert:", str(alert.kind), alert.detail))
            failed_any = True
    if failed_any and tick.rollout.phase_healthy_since is not None:
        tick.set_rollout(None, phase_healthy_since=None)


def _alert_counts(r: Rollout, alert: Alert, ex: Execution) -> bool:
    if alert.kind not in _HEALTH_ALERTS or ex.status is not ExecStatus.SUCCEEDED or ex.phase > r.phase:
        return False
    if alert.version == r.version:  # opened while the device ran the release: any time since it was sent
        since = ex.sent_at if ex.sent_at is not None else ex.updated_at
    elif alert.version is None:
        since = ex.updated_at
    else:
        return False  # opened on another model (before the install)
    return alert.opened_at >= since


def _check_threshold(tick: _Tick) -> None:
    spec = tick.rollout.spec
    finished = [e for e in tick.execs.values() if e.status.terminal and e.status is not ExecStatus.SKIPPED]
    failures = sum(e.status in (ExecStatus.FAILED, ExecStatus.TIMED_OUT) for e in finished)
    if len(finished) >= spec.min_devices and failures / len(finished) > spec.max_failures:
        limit = f"{round(spec.max_failures * 100, 4):g}%"
        tick.set_rollout(f"rollout failed: {failures}/{len(finished)} > {limit}", status=RolloutStatus.FAILED)


def _auto_rollback(tick: _Tick) -> None:
    """Send back the devices of the failed phase that installed the release from this rollout's command."""
    r = tick.rollout
    if r.kind is not RolloutKind.UPDATE or not r.spec.auto_rollback:
        return
    for device_id, ex in sorted(tick.execs.items()):
        if ex.status is ExecStatus.SUCCEEDED and ex.phase == r.phase and ex.sent_at is not None:
            tick.set_exec(ex, ExecStatus.ROLLED_BACK, "auto-rollback")
            tick.send_back.append(device_id)


def _phase_state(tick: _Tick, phase: int) -> tuple[bool, int, int]:
    """(done, succeeded, members): done when each member is terminal, or queued while offline."""
    members = tick.members(phase)
    done = all(e.status.terminal or (e.status is ExecStatus.QUEUED and not tick.online(e.device_id)) for e in members)
    return done, sum(e.status is ExecStatus.SUCCEEDED for e in members), len(members)


def _advance(tick: _Tick) -> None:
    """Mark the current phase healthy, and after the wait move to the next phase or succeed."""
    spec = tick.rollout.spec
    while True:
        r = tick.rollout
        done, succeeded, members = _phase_state(tick, r.phase)
        if not done or (members and not succeeded):
            if r.phase_healthy_since is not None:
                tick.set_rollout(None, phase_healthy_since=None)
            return
        if r.phase_healthy_since is None:
            note = f"phase {r.phase + 1} healthy: {succeeded}/{members} succeeded"
            tick.set_rollout(note, phase_healthy_since=tick.now)
            r = tick.rollout
        if r.phase_healthy_since is None or tick.now - r.phase_healthy_since < spec.wait_s:
            return
        if r.phase + 1 >= len(spec.phases):
            note = f"rollout succeeded: all {len(spec.phases)} phase(s) healthy"
            tick.set_rollout(note, status=RolloutStatus.SUCCEEDED)
            return
        nxt = r.phase + 1
        tick.set_rollout(
            f"phase {nxt + 1} started: {len(tick.members(nxt))} device(s)",
            phase=nxt,
            phase_started_at=tick.now,
            phase_healthy_since=None,
        )


def _send(tick: _Tick) -> None:
    """Queued executions of the phases so far whose device is online get the rollout's command."""
    r = tick.rollout
    command = "ota-update" if r.kind is RolloutKind.UPDATE else "rollback"
    for device_id, ex in sorted(tick.execs.items()):
        if ex.status is not ExecStatus.QUEUED or ex.phase > r.phase or not tick.online(device_id):
            continue
        sent = {"sent_at": tick.now, "attempts": ex.attempts + 1}
        tick.set_exec(ex, ExecStatus.IN_PROGRESS, f"sent {command}", note=False, **sent)
        tick.send.append(device_id)
    if tick.send:
        tick.notes.append(f"sent {command} to {len(tick.send)} device(s): {', '.join(tick.send)}")
