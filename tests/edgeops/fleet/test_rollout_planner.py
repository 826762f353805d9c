"""edgeops.fleet.rollout_planner: phases, outcomes, timeouts, thresholds, late joiners, rollbacks (no I/O).

Whole rollouts are driven through a fake controller (`Sim`): it plans, applies the decision the way the store
does (executions by (rollout_id, device_id), the rollout replaced, a nonce given to each sent execution), and
plans again at the same instant to check that an applied decision has nothing left to do.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

from edgeops.errors import RolloutError
from edgeops.fleet.model import (
    Alert,
    AlertKind,
    AlertLevel,
    DeviceRecord,
    EventRow,
    ExecStatus,
    Execution,
    Rollout,
    RolloutKind,
    RolloutSpec,
    RolloutStatus,
)
from edgeops.fleet.rollout_planner import Decision, assign_phase, plan_rollout, start_rollout

PROFILE = "rpi4"
OLD, NEW = "1.0.0", "2.0.0"
RELEASE = "digits-2.0.0-rpi4"
T0 = 1_000_000.0

Q, P, S, F = ExecStatus.QUEUED, ExecStatus.IN_PROGRESS, ExecStatus.SUCCEEDED, ExecStatus.FAILED
RB, TO, SK = ExecStatus.ROLLED_BACK, ExecStatus.TIMED_OUT, ExecStatus.SKIPPED


def device(
    device_id: str, *, online: bool = True, profile: str | None = PROFILE, version: str | None = OLD
) -> DeviceRecord:
    return DeviceRecord(device_id, online=online, last_seen=T0 - 10, profile=profile, active_version=version)


def fleet(n: int, **kw: Any) -> list[DeviceRecord]:
    return [device(f"d{i:02d}", **kw) for i in range(n)]


class Sim:
    """A fake controller and store around the planner, with a fake fleet that answers."""

    def __init__(
        self,
        devices: Iterable[DeviceRecord],
        spec: RolloutSpec,
        *,
        kind: RolloutKind = RolloutKind.UPDATE,
        version: str = NEW,
    ) -> None:
        self.now = T0
        self.devices = {d.device_id: d for d in devices}
        self.events: list[EventRow] = []
        self.alerts: list[Alert] = []
        self.seq = itertools.count(1)
        plan = start_rollout(
            rollout_id="r1", kind=kind, release_id=RELEASE, version=version, profile=PROFILE, group="lab",
            spec=spec, devices=list(self.devices.values()), now=self.now,
        )  # fmt: skip
        self.skipped = plan.skipped
        self.rollout: Rollout = plan.rollout
        self.execs = {e.device_id: e for e in plan.executions}
        self.sent: list[str] = []  # every device the rollout's command went to, in order
        self.sent_back: list[str] = []
        self.notes: list[str] = []

    # -- controller -------------------------------------------------------------------------------------------
    def plan(self) -> Decision:
        return plan_rollout(
            self.rollout, devices=list(self.devices.values()), executions=list(self.execs.values()),
            events=self.events, alerts=self.alerts, now=self.now,
        )  # fmt: skip

    def tick(self, dt: float = 1.0) -> Decision:
        self.now += dt
        decision = self.plan()
        for ex in decision.executions:
            assert ex.rollout_id == "r1"
            if ex.device_id in decision.send:
                ex = replace(ex, nonce=f"n-{ex.device_id}-{ex.attempts}")
            self.execs[ex.device_id] = ex
        self.rollout = decision.rollout
        self.sent += decision.send
        self.sent_back += decision.send_back
        self.notes += decision.notes
        again = self.plan()  # applied, nothing new: nothing to do
        assert (again.changed, again.send, again.send_back, again.executions) == (False, (), (), ())
        assert again.rollout == self.rollout
        return decision

    def set_status(self, status: RolloutStatus) -> None:
        self.rollout = replace(self.rollout, status=status)

    # -- fleet --------------------------------------------------------------------------------------------------
    def event(self, device_id: str, type_: str, **body: Any) -> None:
        seq = next(self.seq)
        self.events.append(EventRow(device_id, seq, self.now, self.now, type_, {"type": type_, "seq": seq, **body}))

    def set_device(self, device_id: str, **changes: Any) -> None:
        self.devices[device_id] = replace(self.devices[device_id], last_seen=self.now, **changes)

    def install(self, *device_ids: str) -> None:
        for d in device_ids:
            self.event(d, "ota.started", release_id=RELEASE, version=NEW)
            self.event(d, "install.succeeded", version=NEW, previous=OLD, source="ota")
            self.event(d, "ota.completed", release_id=RELEASE, version=NEW)

    def gate_fail(self, device_id: str) -> None:
        self.event(device_id, "install.rejected", check="golden", reason="outputs differ", version=NEW)
        self.event(device_id, "ota.failed", release_id=RELEASE, reason="install-failed", detail="x", check="golden")

    def alert(self, device_id: str, kind: AlertKind = AlertKind.ERROR_RATE, version: str | None = NEW) -> None:
        self.alerts.append(Alert(device_id, kind, AlertLevel.ALERT, self.now, "errors 30% > 5%", version=version))

    def status(self, *device_ids: str) -> list[ExecStatus]:
        return [self.execs[d].status for d in device_ids]

    def count(self, status: ExecStatus) -> int:
        return sum(e.status is status for e in self.execs.values())


def ids(a: int, b: int) -> list[str]:
    return [f"d{i:02d}" for i in range(a, b)]


CANARY = RolloutSpec(phases=(0.05, 0.25, 1.0), max_failures=0.1, min_devices=5, wait_s=60.0, timeout_s=600.0)


# -- phases -------------------------------------------------------------------------------------------------------
def test_phases_are_cumulative_ceilings_with_at_least_one_canary() -> None:
    assert assign_phase((0.05, 0.25, 1.0), 20) == [0] + [1] * 4 + [2] * 15
    assert assign_phase((0.1, 1.0), 30) == [0] * 3 + [1] * 27  # 0.1 * 30 is not rounded up to 4
    assert assign_phase((0.05, 0.25, 1.0), 2) == [0, 2]  # phase 1 is empty
    assert assign_phase((0.01, 1.0), 3) == [0, 1, 1]  # the canary holds at least one device
    assert assign_phase((1.0,), 3) == [0, 0, 0]
    assert assign_phase((0.5, 1.0), 0) == []
    for bad in [(), (0.5,), (0.5, 0.5, 1.0), (0.0, 1.0), (0.6, 0.3, 1.0)]:
        with pytest.raises(ValueError, match="phases must rise"):
            assign_phase(bad, 4)
    with pytest.raises(ValueError):
        assign_phase((1.0,), -1)


def test_start_orders_by_id_skips_other_profiles_and_counts_devices_already_there() -> None:
    members = [*reversed(fleet(6)), device("x-jetson", profile="jetson"), device("y-done", version=NEW)]
    sim = Sim(members, RolloutSpec(phases=(0.34, 1.0)))
    phases = {d: (e.status, e.phase) for d, e in sim.execs.items()}
    assert [phases[d] for d in ids(0, 6)] == [(Q, 0), (Q, 0), (Q, 0), (Q, 1), (Q, 1), (Q, 1)]
    assert sim.skipped == ("x-jetson",)
    assert sim.execs["x-jetson"].reason == "profile jetson, release is for rpi4"
    assert (sim.execs["y-done"].status, sim.execs["y-done"].reason) == (S, "already at version")
    r = sim.rollout
    assert (r.status, r.phase, r.phase_started_at, r.created_at) == (RolloutStatus.RUNNING, 0, T0, T0)
    assert "6 to send in 2 phase(s), 1 already there, 1 skipped" in r.reason


def test_start_refuses_an_empty_group_and_a_group_without_an_eligible_device() -> None:
    spec = RolloutSpec()
    common: dict[str, Any] = {"rollout_id": "r", "release_id": RELEASE, "version": NEW, "group": "lab", "now": T0}
    with pytest.raises(RolloutError, match="group lab has no devices"):
        start_rollout(kind=RolloutKind.UPDATE, profile=PROFILE, spec=spec, devices=[], **common)
    others = [device("a", profile="jetson"), device("b", profile=None)]
    with pytest.raises(RolloutError, match=r"profile rpi4.*profiles found: jetson, unknown"):
        start_rollout(kind=RolloutKind.UPDATE, profile=PROFILE, spec=spec, devices=others, **common)
    with pytest.raises(RolloutError, match=r"runs 2\.0\.0 \(versions found: 1\.0\.0\)"):
        start_rollout(kind=RolloutKind.ROLLBACK, profile=PROFILE, spec=spec, devices=fleet(2), **common)
    with pytest.raises(ValueError, match="one phase"):
        two = RolloutSpec(phases=(0.5, 1.0))
        start_rollout(kind=RolloutKind.ROLLBACK, profile=PROFILE, spec=two, devices=fleet(2, version=NEW), **common)
    with pytest.raises(ValueError, match="duplicate"):
        start_rollout(kind=RolloutKind.UPDATE, profile=PROFILE, spec=spec, devices=fleet(1) + fleet(1), **common)


# -- whole rollouts -----------------------------------------------------------------------------------------------
def test_canary_then_25_then_100_percent_of_20_devices_succeeds_phase_by_phase() -> None:
    sim = Sim(fleet(20), CANARY)
    assert sim.tick().send == ("d00",)
    assert sim.status("d00") == [P] and sim.execs["d00"].attempts == 1 and sim.execs["d00"].sent_at == sim.now
    sim.install("d00")
    d = sim.tick()
    assert d.notes == ("device d00 succeeded: ota.completed digits-2.0.0-rpi4", "phase 1 healthy: 1/1 succeeded")
    assert sim.rollout.phase_healthy_since == sim.now and d.send == ()
    assert not sim.tick(30).changed  # inside the 60 s healthy window: nothing moves
    d = sim.tick(31)
    assert d.send == tuple(ids(1, 5)) and sim.rollout.phase == 1 and sim.rollout.phase_started_at == sim.now
    assert "phase 2 started: 4 device(s)" in d.notes and sim.rollout.phase_healthy_since is None
    sim.install(*ids(1, 5))
    assert "phase 2 healthy: 4/4 succeeded" in sim.tick().notes
    assert sim.tick(60).send == tuple(ids(5, 20))
    sim.install(*ids(5, 20))
    sim.tick()
    d = sim.tick(60)
    assert sim.rollout.status is RolloutStatus.SUCCEEDED and sim.rollout.updated_at == sim.now
    assert d.rollout.reason == "rollout succeeded: all 3 phase(s) healthy"
    assert sorted(sim.sent) == ids(0, 20) and len(sim.sent) == 20  # each device was sent the update once
    assert sim.count(S) == 20


def test_one_gate_failure_among_20_stays_under_10_percent_and_the_rollout_succeeds() -> None:
    sim = Sim(fleet(20), CANARY)
    sim.tick()
    sim.install("d00")
    sim.tick()
    sim.tick(60)
    sim.install(*ids(1, 5))
    sim.tick()
    sim.tick(60)
    sim.install(*ids(5, 19))
    sim.gate_fail("d19")
    d = sim.tick()
    assert "device d19 failed: ota.failed install-failed golden" in d.notes
    assert "phase 3 healthy: 14/15 succeeded" in d.notes  # 1/20 = 5% <= 10%
    sim.tick(60)
    assert sim.rollout.status is RolloutStatus.SUCCEEDED
    assert (sim.count(S), sim.count(F)) == (19, 1)


def test_a_failure_over_the_threshold_stops_the_rollout_and_rolls_back_the_failed_phase() -> None:
    sim = Sim(fleet(20), replace(CANARY, auto_rollback=True, min_devices=4))
    sim.tick()
    sim.install("d00")
    sim.tick()
    sim.tick(60)
    sim.install("d01", "d02")
    sim.gate_fail("d03")  # d04 has not answered yet
    d = sim.tick()
    assert sim.rollout.status is RolloutStatus.FAILED
    assert sim.rollout.reason == "rollout failed: 1/4 > 10%" and "rollout failed: 1/4 > 10%" in d.notes
    assert d.send_back == ("d01", "d02")  # the canary (phase 0) keeps the release; phase 2 is never sent
    assert sim.status("d00", "d01", "d02", "d03", "d04") == [S, RB, RB, F, P]
    assert all(sim.execs[x].reason == "auto-rollback" for x in ("d01", "d02"))
    sim.install("d04")  # the late answer of the failed phase is sent back as well
    d = sim.tick()
    assert d.send_back == ("d04",) and sim.status("d04") == [RB]
    sim.devices["d99"] = device("d99")  # a failed rollout adds no one and sends nothing
    sim.set_device("d05", online=True)
    assert not sim.tick(600).changed
    assert sim.sent == ids(0, 5) and sim.status(*ids(5, 20)) == [Q] * 15


def test_the_threshold_waits_for_min_devices_and_is_checked_before_advancing() -> None:
    spec = RolloutSpec(phases=(0.5, 1.0), max_failures=0.25, min_devices=3)
    sim = Sim(fleet(4), spec)
    sim.tick()
    sim.gate_fail("d00")  # 1/1 failed, but fewer than 3 finished: the rollout goes on
    sim.install("d01")
    sim.tick()
    assert sim.rollout.status is RolloutStatus.RUNNING and sim.rollout.phase == 1
    sim.install("d02")
    sim.tick()
    assert sim.rollout.status is RolloutStatus.FAILED  # 1/3 > 25% before phase 1 could be declared healthy
    assert sim.rollout.reason == "rollout failed: 1/3 > 25%" and sim.status("d03") == [P]


def test_pause_records_outcomes_and_timeouts_but_sends_nothing_and_does_not_advance() -> None:
    sim = Sim(fleet(4), RolloutSpec(phases=(0.5, 1.0), timeout_s=100, max_failures=0.5, min_devices=2))
    sim.tick()
    sim.set_status(RolloutStatus.PAUSED)
    sim.install("d00")
    sim.devices["d10"] = device("d10")
    d = sim.tick(150)
    assert sim.status("d00", "d01", "d10") == [S, TO, Q]  # outcome and timeout recorded, the joiner waits
    assert d.send == () and sim.rollout.phase_healthy_since is None
    assert "device d01 timed_out: no outcome within 100 s" in d.notes
    assert not sim.tick(1000).changed
    sim.set_status(RolloutStatus.RUNNING)
    assert sim.tick().send == ("d10",)  # the joiner of phase 0 first: the phase is not done without it
    sim.install("d10")
    d = sim.tick()
    assert d.send == ("d02", "d03") and sim.rollout.phase == 1  # 1/3 failed is not over 50%


def test_timeouts_count_as_failures_and_a_late_success_overrides_a_timeout() -> None:
    sim = Sim(fleet(3), RolloutSpec(timeout_s=100, max_failures=0.5, min_devices=1))
    sim.tick()
    assert not sim.tick(100).changed  # exactly the timeout is not past it
    d = sim.tick(1)
    assert sim.status(*ids(0, 3)) == [TO] * 3 and sim.rollout.status is RolloutStatus.FAILED
    assert sim.rollout.reason == "rollout failed: 3/3 > 50%"
    assert d.send == () and d.send_back == ()
    sim.install("d01")  # a late answer still counts for the device
    sim.tick()
    assert sim.status(*ids(0, 3)) == [TO, S, TO] and sim.rollout.status is RolloutStatus.FAILED


def test_offline_devices_wait_without_blocking_and_get_the_release_when_back() -> None:
    members = [device("d00", online=False), *fleet(4)[1:]]
    sim = Sim(members, RolloutSpec(phases=(0.5, 1.0)))
    assert sim.tick().send == ("d01",)
    sim.install("d01")
    d = sim.tick()
    assert "phase 1 healthy: 1/2 succeeded" in d.notes and d.send == ("d02", "d03")
    sim.install("d02", "d03")
    sim.tick()
    assert sim.rollout.status is RolloutStatus.SUCCEEDED and sim.status("d00") == [Q]
    sim.set_device("d00", online=True)
    assert sim.tick().send == ("d00",)  # continuous: it comes back and gets the release
    sim.install("d00")
    sim.tick()
    assert sim.count(S) == 4 and sim.rollout.status is RolloutStatus.SUCCEEDED


def test_a_phase_of_offline_devices_only_does_not_advance() -> None:
    sim = Sim([*fleet(2, online=False), *fleet(4)[2:]], RolloutSpec(phases=(0.5, 1.0)))
    assert not sim.tick().changed and not sim.tick(3600).changed
    assert sim.rollout.phase == 0 and sim.sent == []
    sim.set_device("d01", online=True)
    assert sim.tick().send == ("d01",)


def test_a_non_continuous_rollout_leaves_late_devices_alone() -> None:
    sim = Sim([device("d00", online=False), device("d01")], RolloutSpec(continuous=False))
    sim.tick()
    sim.install("d01")
    sim.tick()
    assert sim.rollout.status is RolloutStatus.SUCCEEDED
    sim.set_device("d00", online=True)
    sim.devices["d02"] = device("d02")
    assert not sim.tick().changed and "d02" not in sim.execs and sim.status("d00") == [Q]


def test_late_joiners_join_the_current_phase_then_the_last_one() -> None:
    sim = Sim(fleet(4), RolloutSpec(phases=(0.5, 1.0), wait_s=10))
    sim.tick()
    sim.install("d00", "d01")
    sim.tick()
    sim.devices["j1"] = device("j1")
    sim.devices["j2"] = device("j2", profile="jetson")
    sim.devices["j3"] = device("j3", version=NEW)
    sim.devices["j4"] = device("j4", profile=None)  # profile not known yet: no execution until it is
    d = sim.tick()
    assert d.send == ("j1",) and sim.execs["j1"].phase == 0
    assert (sim.execs["j2"].status, sim.execs["j2"].reason) == (SK, "profile jetson, release is for rpi4")
    assert (sim.execs["j3"].status, sim.execs["j3"].reason) == (S, "already at version")
    assert "j4" not in sim.execs and sim.rollout.phase_healthy_since is None  # j1 reopened phase 0
    assert "device j1 joined: queued in phase 1" in d.notes
    sim.install("j1")
    sim.tick()
    sim.tick(10)
    sim.install("d02", "d03")
    sim.tick()
    sim.tick(10)
    assert sim.rollout.status is RolloutStatus.SUCCEEDED
    sim.set_device("j4", profile=PROFILE)
    d = sim.tick()
    assert d.send == ("j4",) and sim.execs["j4"].phase == 1  # after success: the last phase


def test_an_alert_in_the_wait_window_fails_the_device_and_restarts_the_window() -> None:
    spec = RolloutSpec(phases=(0.5, 1.0), wait_s=300, max_failures=0.5, min_devices=2)
    sim = Sim(fleet(4), spec)
    sim.tick()
    sim.install("d00", "d01")
    sim.tick()
    healthy = sim.rollout.phase_healthy_since
    sim.now += 100
    sim.alert("d01", AlertKind.OFFLINE)  # not a health alert
    sim.alert("d00", version=OLD)  # opened on the old model
    sim.alert("d01", AlertKind.DRIFT)
    d = sim.tick(0)
    assert sim.status("d00", "d01") == [S, F] and sim.execs["d01"].reason == "alert: drift errors 30% > 5%"
    assert sim.rollout.phase_healthy_since == sim.now != healthy  # 1/2 is not over 50%: the window restarts
    assert "phase 1 healthy: 1/2 succeeded" in d.notes
    assert not sim.tick(250).changed  # 350 s after the first healthy mark, 250 s into the new window
    assert sim.tick(50).send == ("d02", "d03")


def test_an_alert_on_a_device_of_an_earlier_phase_fails_it_too() -> None:
    sim = Sim(fleet(4), RolloutSpec(phases=(0.5, 1.0), max_failures=0.5, min_devices=4))
    sim.tick()
    sim.install("d00", "d01")
    sim.tick()
    sim.alert("d00", AlertKind.LATENCY)
    sim.install("d02", "d03")
    d = sim.tick()
    assert "device d00 failed: alert: latency errors 30% > 5%" in d.notes
    assert sim.rollout.status is RolloutStatus.SUCCEEDED  # 1/4 <= 50%


# -- outcomes -----------------------------------------------------------------------------------------------------
def test_outcome_events_are_matched_to_the_release_version_and_nonce() -> None:
    sim = Sim(fleet(8), RolloutSpec(max_failures=1.0))
    sim.tick()
    sim.set_device("d00", active_version=NEW)
    sim.event("d00", "ota.rejected", release_id=RELEASE, reason="not-newer", detail="same version")
    sim.event("d01", "ota.rejected", release_id=RELEASE, reason="wrong-profile", detail="built for jetson")
    sim.event("d02", "install.rejected", version=NEW, check="latency", reason="p95 9 ms > 5 ms")
    sim.event("d03", "command.rejected", nonce="someone-else", reason="expired")
    sim.event("d03", "command.failed", nonce="n-d03-1", reason="busy")
    sim.event("d04", "ota.completed", release_id="other-release")
    sim.event("d04", "install.succeeded", version="3.0.0")
    sim.event("d05", "ota.failed", release_id=RELEASE, reason="storage", detail="disk full")
    sim.event("d06", "ota.failed", release_id=RELEASE, reason="storage", detail="disk full")
    sim.event("d06", "install.succeeded", version=NEW)  # the last decisive event wins
    sim.set_device("d07", active_version=NEW)  # the state alone shows the version
    sim.tick()
    assert sim.status(*ids(0, 8)) == [S, F, F, F, P, F, S, S]
    reasons = [sim.execs[x].reason for x in ids(0, 8)]
    assert reasons[0] == "ota.rejected not-newer: already at version"
    assert reasons[1] == "ota.rejected wrong-profile: built for jetson"
    assert reasons[2] == "install.rejected latency p95 9 ms > 5 ms"
    assert reasons[3] == "command.failed busy"
    assert reasons[5] == "ota.failed storage: disk full"
    assert reasons[7] == "state shows 2.0.0 active"


def test_events_from_before_the_rollout_are_ignored() -> None:
    sim = Sim(fleet(1), RolloutSpec())
    sim.tick()
    sim.events.append(EventRow("d00", 99, T0 - 5, T0 - 5, "ota.failed", {"release_id": RELEASE, "reason": "storage"}))
    assert not sim.tick().changed and sim.status("d00") == [P]


def test_a_device_that_rolls_itself_back_after_success_fails_only_then() -> None:
    sim = Sim(fleet(3), RolloutSpec(max_failures=1.0, wait_s=100))
    sim.tick()
    sim.event("d00", "rollback", previous=NEW, version=OLD, reason="older")  # before its install: no meaning
    sim.install("d00", "d01", "d02")
    sim.event("d02", "rollback", automatic=True, previous=NEW, version=OLD, reason="error rate 40%")
    sim.tick()
    assert sim.status("d00", "d01", "d02") == [S, S, F]
    assert sim.execs["d02"].reason == "rolled back by the device: error rate 40%"
    sim.event("d01", "rollback", automatic=True, previous=NEW, version=OLD, reason="error rate 50%")
    sim.event("d01", "ota.failed", release_id=RELEASE, reason="storage")  # cannot undo a terminal state
    d = sim.tick()
    assert sim.status("d00", "d01") == [S, F]
    assert d.notes == ("device d01 failed: rolled back by the device: error rate 50%",)


# -- rollback kind ------------------------------------------------------------------------------------------------
def test_a_rollback_rollout_sends_back_the_devices_running_the_version() -> None:
    members = [*fleet(4, version=NEW), device("d04", version=OLD)]
    sim = Sim(members, RolloutSpec(max_failures=0.5, min_devices=4), kind=RolloutKind.ROLLBACK)
    assert sim.skipped == ("d04",) and sim.execs["d04"].reason == "not running 2.0.0"
    sim.set_device("d03", online=False, active_version="3.0.0")  # moved on while offline
    assert sim.tick().send == ("d00", "d01", "d02")
    sim.event("d00", "rollback", automatic=False, previous=NEW, version=OLD, reason="fleet command")
    sim.set_device("d01", active_version=OLD)
    sim.event("d02", "command.rejected", nonce="stale", reason="replayed")
    sim.tick()
    assert sim.status("d00", "d01", "d02") == [S, S, P]
    assert sim.execs["d01"].reason == "state shows 1.0.0 active"
    sim.event("d02", "command.rejected", nonce="n-d02-1", reason="expired", detail="expired 3 s ago")
    sim.set_device("d03", online=True)  # no longer running the version: not sent
    d = sim.tick()
    assert sim.status("d02", "d03") == [F, SK] and d.send == ()
    assert sim.execs["d02"].reason == "command.rejected expired: expired 3 s ago"
    assert sim.rollout.status is RolloutStatus.SUCCEEDED  # 1 failure in 3 is not over 50%
    assert sim.sent == ["d00", "d01", "d02"] and sim.sent_back == []


# -- decisions ----------------------------------------------------------------------------------------------------
def test_an_aborted_rollout_records_outcomes_but_never_adds_or_sends() -> None:
    sim = Sim([device("d00"), device("d01"), device("d02", online=False)], RolloutSpec())
    sim.tick()
    sim.set_status(RolloutStatus.ABORTED)
    sim.install("d00")
    sim.set_device("d02", online=True)
    sim.devices["d03"] = device("d03")
    d = sim.tick()
    assert d.send == () and [e.device_id for e in d.executions] == ["d00"] and sim.status("d00") == [S]
    assert sim.rollout.status is RolloutStatus.ABORTED and "d03" not in sim.execs


def test_a_decision_lists_only_changed_executions_and_keeps_the_rollout_when_nothing_changed() -> None:
    sim = Sim(fleet(3), RolloutSpec(phases=(0.3, 1.0), wait_s=60))
    before = sim.rollout
    d = sim.tick()
    assert [e.device_id for e in d.executions] == ["d00"] and d.changed
    assert d.rollout == replace(before, updated_at=sim.now)
    d = sim.tick()
    assert (d.changed, d.executions, d.notes, d.rollout.updated_at) == (False, (), (), before.created_at + 1)
    ex: Execution = sim.execs["d00"]
    assert (ex.status, ex.nonce, ex.attempts) == (P, "n-d00-1", 1)
