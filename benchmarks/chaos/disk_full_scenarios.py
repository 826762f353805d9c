"""The disk-full scenarios, run on the small disk itself: ``python -m benchmarks.chaos.disk_full_scenarios SPEC``.

benchmarks/chaos/disk_full.py starts this module through tests/support/small_disk.py, so it runs with the data
directory on a small tmpfs of its own mount namespace (or under RLIMIT_FSIZE where no namespace can be made).
The tmpfs vanishes with this process, so everything that must happen on it — the fault, the check that nothing
is left behind, the recovery after the space is freed — happens here; the outcome is one JSON object on the last
line of stdout. SPEC is a JSON object: ``scenario``, ``root`` (the small disk), ``template`` (a data dir with
1.0.0 installed), ``keys`` (signing.key / signing.pub), ``base`` and ``target`` (the 1.0.0 and 1.1.0
artifacts), ``work`` (scratch space on the real disk), ``broker`` (a mosquitto URL, outside the namespace).

The agent runs in this process (a real :class:`~device_agent.agent.Agent`: slots, spool, OTA over the real
broker with a real :class:`~edgeops.release_server.ReleaseServer`), the disk is filled and freed with
:class:`tests.support.small_disk.Ballast`, inference is asked for every 20 ms throughout, and a subscriber on the
broker sees what the fleet would see. The scenarios are listed in :data:`SCENARIOS`; their checks in
benchmarks/chaos/disk_full.py's docstring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.config import AgentConfig, parse_config
from device_agent.model_host import ModelHost, load_model
from device_agent.slot_store import SlotStore
from device_agent.spool_fallback import HOLD_MAX_BYTES
from edgeops.errors import EdgeopsError
from edgeops.protocol import device_topics, parse_broker_url, release_topics, sign_command
from edgeops.release_builder import PublishedRelease, build_release
from edgeops.release_server import ReleaseServer
from edgeops.signing import load_private_key, load_public_key
from tests.support.mqtt_proxy import MqttProxy
from tests.support.small_disk import Ballast
from tests.support.subscriber import Collector

__all__ = ["SCENARIOS", "Result", "main"]

FLEET, DEVICE, PROFILE = "diskfleet", "dev-1", "x86-gateway"
TOPICS = device_topics(FLEET, DEVICE)
CHUNK = 4096
WAIT_S = 60.0  # the most one step may take (normally a few seconds)
SCENARIOS = (
    "ota-no-room-for-download",
    "ota-no-room-for-install",
    "ota-fills-during-download",
    "ota-fills-before-apply",
    "spool-offline",
    "spool-online",
    "restart-on-full-disk",
    "install-no-room",
)

log = logging.getLogger("disk-full")


@dataclass
class Result:
    """One run, as a user would see it (disk_full.py's docstring says what each field means)."""

    scenario: str
    mechanism: str
    converged: bool = False
    corrupted: bool = False
    lost: int = 0  # messages neither delivered nor counted in a spool.dropped event
    counted_drops: int = 0  # messages the agent could not keep, counted and reported
    duplicated: int = 0
    delivered: int = 0
    produced: int = 0
    infer_ok: int = 0
    infer_failed: int = 0
    reason: str | None = None  # the reason the agent gave (event), e.g. disk-full
    detail: str | None = None
    retried_by: str | None = None  # "agent" (by itself once space was free) or "operator" (a new ota-update)
    left_behind: list[str] = field(default_factory=list)  # files of a failed download / install left on disk
    state_intact: bool = True  # state.json unchanged by the failed update
    seconds: float = 0.0
    recovery_s: float | None = None  # space freed → converged
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok


# -- the device ------------------------------------------------------------------------------------------------------


def agent_config(spec: dict[str, Any], broker_url: str) -> AgentConfig:
    root = Path(spec["root"])
    doc = {
        "device_id": DEVICE,
        "fleet": FLEET,
        "profile": PROFILE,
        "data_dir": str(root / "data"),
        "trusted_keys": [str(Path(spec["keys"]) / "signing.pub")],
        "broker": {"url": broker_url, "max_backoff_s": 1.0},
        "telemetry": {"interval_s": 3600.0, "drift_min_samples": 10**9},  # ticks are driven by the scenario
        "api": {"address": ""},
        "health": {"latency_runs": 5, "latency_budget_factor": 50.0},
        "ota": {"repair_idle_s": 0.3, "repair_min_interval_s": 0.3},
    }
    return parse_config(doc, root, "<disk-full>")


class Events:
    """Every event the agent reports, recorded in process before the spool (the spool may be full)."""

    def __init__(self, agent: Agent) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        report = agent.reporter.event

        def event(kind: str, **fields: Any) -> None:
            with self._lock:
                self.events.append({"type": kind, **fields})
            report(kind, **fields)

        agent.reporter.event = event  # type: ignore[method-assign]

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["type"] == kind]

    def kinds(self) -> list[str]:
        with self._lock:
            return [e["type"] for e in self.events]


class Inference:
    """Asks the agent for an answer every 20 ms on a thread; counts answers, failures and versions seen."""

    def __init__(self, agent: Agent, digits: Path) -> None:
        self.agent = agent
        self.x = np.load(digits / "eval_nchw.npz")["x"][:1].astype(np.float32)
        self.ok = self.failed = 0
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.versions.add(self.agent.infer({"image": self.x}).version)
                self.ok += 1
            except Exception:  # counted: a user would see this request fail
                self.failed += 1

    def stop(self, out: Result) -> None:
        self._stop.set()
        self._thread.join(5)
        out.infer_ok += self.ok
        out.infer_failed += self.failed
        out.expect(self.ok > 0 and self.failed == 0, f"inference: {self.ok} answered, {self.failed} failed")


def wait(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def deploy(publisher: Collector, keys: Path, release_id: str) -> None:
    raw = sign_command(
        load_private_key(keys / "signing.key"),
        name="ota-update",
        args={"release_id": release_id},
        fleet=FLEET,
        target=f"device/{DEVICE}",
        now=time.time(),
    )
    publisher.publish(TOPICS.cmd, raw)


def check_slots(spec: dict[str, Any], data: Path, out: Result) -> str | None:
    """The version the data dir serves: every slot state.json names re-verified and holding the version it says,
    the active one loaded and asked for an answer (as a restarted agent would)."""
    keys = [load_public_key(Path(spec["keys"]) / "signing.pub")]
    store = SlotStore(data / "slots", trusted_keys=keys, profile=PROFILE, read_only=True)
    state = store.state
    for slot in (state.active, state.previous):
        if slot is None:
            continue
        try:
            held = store.verify_slot(slot).manifest.version
        except EdgeopsError as exc:
            out.corrupted = True
            out.problems.append(f"slot {slot} fails verification: {exc}")
            continue
        if held != state.versions.get(slot):
            out.corrupted = True
            out.problems.append(f"slot {slot} holds {held}, state.json says {state.versions.get(slot)}")
    if state.active is None or out.corrupted:
        out.expect(state.active is not None, "no active model")
        return None
    host = ModelHost(agent_config(spec, "mqtt://127.0.0.1:1").health)
    host.set_models(load_model(store.verify_slot(state.active), state.active, threads=1), None)
    x = np.load(Path(spec["digits"]) / "eval_nchw.npz")["x"][:1].astype(np.float32)
    return host.infer({"image": x}).version


def leftovers(data: Path) -> list[str]:
    """Files a failed download or install may leave: anything under ota/, temp files in slots/."""
    ota = sorted(str(p.relative_to(data)) for p in (data / "ota").rglob("*")) if (data / "ota").exists() else []
    return ota + sorted(str(p.relative_to(data)) for p in (data / "slots").glob(".*.tmp"))


@contextlib.contextmanager
def device(spec: dict[str, Any], broker_url: str) -> Iterator[tuple[Agent, Events]]:
    agent = Agent(agent_config(spec, broker_url))
    events = Events(agent)
    agent.start()
    try:
        yield agent, events
    finally:
        agent.stop()


# -- OTA -------------------------------------------------------------------------------------------------------------


def _release(spec: dict[str, Any], kind: str) -> PublishedRelease:
    bases = [Path(spec["base"])] if kind == "delta" else []
    store = Path(spec["work"]) / f"release-{kind}"
    key = load_private_key(Path(spec["keys"]) / "signing.key")
    return build_release(Path(spec["target"]), bases, fleet=FLEET, key=key, store=store, chunk_size=CHUNK)


def ota(spec: dict[str, Any], out: Result, ballast: Ballast) -> None:
    """Fill the disk before (no room for the download / the install) or during the download; the update must wait
    (or fail) with a clear reason, 1.0.0 serving, nothing left; after the space is freed it must converge."""
    scenario = out.scenario
    data = Path(spec["root"]) / "data"
    kind = "delta" if scenario in ("ota-no-room-for-install", "ota-fills-before-apply") else "full"
    rel = _release(spec, kind)
    payload = rel.meta.payloads[-1] if kind == "delta" else rel.meta.payloads[0]
    out.notes.append(f"{payload.kind.value} payload {payload.size} B, target {rel.meta.target_size} B")
    during = scenario.startswith("ota-fills")
    keys = Path(spec["keys"])
    server = ReleaseServer(parse_broker_url(spec["broker"]), FLEET, [rel], client_id="disk-full-releases")
    publisher = Collector(*_host_port(spec["broker"]), [TOPICS.event, TOPICS.state], client_id="disk-full-watch")
    try:
        with device(spec, spec["broker"]) as (agent, events):
            wait("the agent connected", lambda: agent.reporter.connected)
            infer = Inference(agent, Path(spec["digits"]))
            state_before = (data / "slots" / "state.json").read_bytes()
            if scenario == "ota-no-room-for-download":
                ballast.fill(leave=payload.size // 2)
            elif scenario == "ota-no-room-for-install":
                ballast.fill(leave=payload.size + 64 * 1024)
            if during:  # metadata now, chunks only once the disk is full: the download itself has room
                publisher.client.publish(release_topics(FLEET, rel.meta.release_id).manifest, rel.signed, 1, True)
            else:
                server.start()
            deploy(publisher, keys, rel.meta.release_id)
            if during:
                wait("the download to start", lambda: (agent.ota.progress() or {}).get("phase") == "downloading")
                ballast.fill(leave=0)
                server.start()
            gave_up = wait(
                "ota.deferred or ota.failed", lambda: events.of("ota.deferred") or events.of("ota.failed")
            )[0]
            out.reason, out.detail = gave_up.get("reason"), gave_up.get("detail")
            out.left_behind = leftovers(data)
            out.expect(not out.left_behind, f"left behind after the failure: {out.left_behind}")
            out.state_intact = (data / "slots" / "state.json").read_bytes() == state_before
            out.expect(out.state_intact, "state.json changed by the failed update")
            out.expect(agent.active_version() == "1.0.0", f"serves {agent.active_version()} after the failure")
            if gave_up["type"] == "ota.deferred":
                phase = (agent.ota.progress() or {}).get("phase")
                out.expect(phase == "waiting-for-space", f"the state's ota phase is {phase}")
            freed = time.monotonic()
            ballast.free()
            if gave_up["type"] == "ota.failed":  # a final failure (not a full disk): the operator asks again
                out.retried_by = "operator"
                deploy(publisher, keys, rel.meta.release_id)
            else:
                out.retried_by = "agent"
            wait("1.1.0 serving", lambda: agent.active_version() == "1.1.0" and events.of("ota.completed"))
            out.recovery_s = round(time.monotonic() - freed, 2)
            publisher.wait_for("/event", lambda d: d["type"] == "ota.completed", timeout=WAIT_S)
            reported = [d for d in publisher.json("/event") if d["type"] in ("ota.deferred", "ota.failed")]
            out.expect(bool(reported), "the fleet never received the deferral / failure event")
            wait("an answer from 1.1.0", lambda: "1.1.0" in infer.versions, 10)
            infer.stop(out)
            out.expect("1.0.0" in infer.versions, f"answered by {infer.versions}")
            out.notes.append(f"events: {[k for k in events.kinds() if k.startswith(('ota.', 'install.'))]}")
    finally:
        server.stop()
        publisher.close()
    served = check_slots(spec, data, out)
    left = leftovers(data)
    out.expect(not left, f"left behind after the update: {left}")
    out.converged = out.expect(served == "1.1.0", f"serves {served} after recovery") and not out.problems


def _subscriber(host: str, port: int) -> Collector:
    """What the fleet receives from the device: telemetry, events, the retained state (a persistent session)."""
    topics = [TOPICS.telemetry, TOPICS.event, TOPICS.state]
    return Collector(host, port, topics, client_id="disk-full-sub", persistent=True)


def _count(sub: Collector, kind: str) -> int:
    return sum(1 for d in sub.json("/event") if d["type"] == kind)


def _host_port(url: str) -> tuple[str, int]:
    host, port, _ = parse_broker_url(url)
    return host, port


# -- the spool -------------------------------------------------------------------------------------------------------


def _telemetry_seen(sub: Collector) -> tuple[list[float], int]:
    """(the ``ts`` of each distinct telemetry message received, in seq order; the number of duplicate copies)."""
    by_seq: dict[int, float] = {}
    copies = 0
    for doc in sub.json("/telemetry"):
        copies += 1
        by_seq[int(doc["seq"])] = float(doc["ts"])
    return [by_seq[s] for s in sorted(by_seq)], copies - len(by_seq)


def spool(spec: dict[str, Any], out: Result, ballast: Ballast) -> None:
    """Telemetry every tick while the disk is full, the broker unreachable (spool-offline: until the RAM buffer
    overflows) or up (spool-online); then space and the network come back. Every tick must be delivered once or
    counted in a spool.dropped event; the agent must answer inference throughout and spool again unrestarted."""
    online = out.scenario == "spool-online"
    host, port = _host_port(spec["broker"])
    proxy = MqttProxy(host, port).start()
    sub = _subscriber(host, port)
    ticks: list[float] = []
    try:
        with device(spec, proxy.url) as (agent, events):
            wait("the agent connected", lambda: agent.reporter.connected)
            infer = Inference(agent, Path(spec["digits"]))
            if not online:
                proxy.refuse()
                wait("the agent disconnected", lambda: not agent.reporter.connected)

            def tick() -> None:
                agent.telemetry.tick()
                ticks.append(time.time())

            for _ in range(5):
                tick()
            ballast.fill(leave=0)
            fallback = agent.reporter.fallback
            limit = 5000 if not online else 300
            while len(ticks) < limit and (online or fallback.status()["lost"] < 100):
                tick()
            full = fallback.status()
            out.notes.append(f"while full: {full}")
            out.expect(full["error"] is not None, "the spool never refused a write on the full disk")
            if online:
                sub.wait_for("/state", lambda d: bool((d.get("spool") or {}).get("error")), timeout=WAIT_S)
            else:
                out.expect(full["lost"] >= 100, f"the RAM buffer ({HOLD_MAX_BYTES} B) never overflowed: {full}")
            freed = time.monotonic()
            ballast.free()
            for _ in range(5):
                tick()
            if not online:
                proxy.accept()
            wait("the agent connected", lambda: agent.reporter.connected)
            reporter = agent.reporter
            wait("the spool to empty", lambda: reporter.spool_status()["held"] == 0 and reporter.spool.pending() == 0)
            out.recovery_s = round(time.monotonic() - freed, 2)
            infer.stop(out)
            reported = sum(e["count"] for e in events.of("spool.dropped") if e.get("reason") != "bound")
            out.counted_drops = reported
            out.expect(reported == fallback.status()["lost"], f"{reported} reported, {fallback.status()} lost")
            wait("every message delivered", lambda: len(_telemetry_seen(sub)[0]) + reported >= len(ticks), 30)
            delivered_events = [d for d in sub.json("/event") if d["type"] == "spool.dropped"]
            out.expect(sum(d["count"] for d in delivered_events) == reported, "spool.dropped events not delivered")
    finally:
        sub.close()
        proxy.stop()
    seen, dup = _telemetry_seen(sub)
    out.produced, out.delivered, out.duplicated = len(ticks), len(seen), dup
    out.lost = len(ticks) - len(seen) - out.counted_drops
    out.expect(out.lost == 0, f"{out.lost} telemetry message(s) neither delivered nor counted")
    out.expect(seen == sorted(seen), "telemetry delivered out of order")
    served = check_slots(spec, Path(spec["root"]) / "data", out)
    out.converged = out.expect(served == "1.0.0", f"serves {served}") and not out.problems


def restart(spec: dict[str, Any], out: Result, ballast: Ballast) -> None:
    """The device boots on a full disk (the agent stopped cleanly, then the disk filled): the agent must start,
    serve and say so in its retained state; once space is freed it must spool and deliver again, unrestarted."""
    host, port = _host_port(spec["broker"])
    sub = _subscriber(host, port)
    try:
        with device(spec, spec["broker"]) as (agent, _):
            wait("the agent connected", lambda: agent.reporter.connected)
        ballast.fill(leave=0)
        with device(spec, spec["broker"]) as (agent, _):
            wait("the agent connected", lambda: agent.reporter.connected)
            infer = Inference(agent, Path(spec["digits"]))
            sub.wait_for("/state", lambda d: bool(d.get("online") and (d.get("spool") or {}).get("error")), WAIT_S)
            agent.telemetry.tick()
            wait("answers on the full disk", lambda: infer.ok >= 10)
            out.notes.append(f"on the full disk: {agent.reporter.spool_status()}")
            freed = time.monotonic()
            ballast.free()
            agent.telemetry.tick()
            wait("both agent.started events delivered", lambda: _count(sub, "agent.started") >= 2)
            wait("telemetry delivered", lambda: len(_telemetry_seen(sub)[0]) >= 2, 30)
            out.recovery_s = round(time.monotonic() - freed, 2)
            infer.stop(out)
            out.produced = 2
            out.delivered = len(_telemetry_seen(sub)[0])
            out.lost = out.produced - out.delivered
            out.expect(out.lost == 0, f"{out.lost} telemetry message(s) lost")
    finally:
        sub.close()
    served = check_slots(spec, Path(spec["root"]) / "data", out)
    out.converged = out.expect(served == "1.0.0", f"serves {served}") and not out.problems


# -- a local install -------------------------------------------------------------------------------------------------


def _cli_install(spec: dict[str, Any], cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "install", "--config", str(cfg), spec["target"]],
        capture_output=True,
        text=True,
        timeout=2 * WAIT_S,
    )


def install(spec: dict[str, Any], out: Result, ballast: Ballast) -> None:
    """``edgeops-agent install`` with no room for the slot copy, and (tmpfs) room for the copy but not for the state
    commit: refused with a clear message, state.json intact, 1.0.0 serving, no temp file; after freeing it works."""
    data = Path(spec["root"]) / "data"
    cfg = Path(spec["work"]) / "agent.toml"
    cfg.write_text(_toml(spec))
    state_before = (data / "slots" / "state.json").read_bytes()
    ballast.fill(leave=64 * 1024)
    done = _cli_install(spec, cfg)
    out.detail = (done.stderr.strip().splitlines() or [""])[-1]
    out.expect(done.returncode != 0, f"install on a full disk exited {done.returncode}")
    out.expect("No space left" in out.detail or "disk full" in out.detail or "too large" in out.detail, out.detail)
    out.state_intact = (data / "slots" / "state.json").read_bytes() == state_before
    out.left_behind = leftovers(data)
    out.expect(out.state_intact and not out.left_behind, f"state changed or left behind: {out.left_behind}")
    out.expect(check_slots(spec, data, out) == "1.0.0", "1.0.0 does not serve after the refused install")
    ballast.free()
    if ballast.mechanism == "tmpfs":  # room for the slot copy, none for the commit of state.json
        agent = Agent(agent_config(spec, "mqtt://127.0.0.1:1"), connect=False, serve_api=False)
        try:
            agent.load_slots()
            page = 4096
            ballast.fill(leave=math.ceil(Path(spec["target"]).stat().st_size / page) * page)
            try:
                agent.install(Path(spec["target"]), source="cli")
                out.problems.append("the install committed on a disk with no room for state.json")
            except EdgeopsError as exc:
                out.notes.append(f"commit refused: {exc}")
                out.expect("No space left" in str(exc), f"commit error: {exc}")
            out.expect(agent.active_version() == "1.0.0", f"serves {agent.active_version()} after a failed commit")
        finally:
            agent.stop()
        ballast.free()
        out.state_intact = out.state_intact and (data / "slots" / "state.json").read_bytes() == state_before
        out.expect(out.state_intact, "state.json changed by the failed commit")
        out.expect(check_slots(spec, data, out) == "1.0.0", "1.0.0 does not serve after the failed commit")
    else:
        out.notes.append("rlimit: a per-file limit cannot starve the state commit alone; only the slot copy is tried")
    freed = time.monotonic()
    done = _cli_install(spec, cfg)
    out.expect(done.returncode == 0, f"install after freeing exited {done.returncode}: {done.stderr[-500:]}")
    out.recovery_s = round(time.monotonic() - freed, 2)
    out.retried_by = "operator"
    out.converged = out.expect(check_slots(spec, data, out) == "1.1.0", "1.1.0 not serving") and not out.problems


def _toml(spec: dict[str, Any]) -> str:
    root = Path(spec["root"])
    lines = [
        f'device_id = "{DEVICE}"',
        f'fleet = "{FLEET}"',
        f'profile = "{PROFILE}"',
        f'data_dir = "{root / "data"}"',
        f'trusted_keys = ["{Path(spec["keys"]) / "signing.pub"}"]',
        "[broker]",
        'url = "mqtt://127.0.0.1:1"',
        "[api]",
        'address = ""',
        "[health]",
        "latency_runs = 5",
        "latency_budget_factor = 50.0",
    ]
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[dict[str, Any], Result, Ballast], None]] = {
    **{s: ota for s in SCENARIOS if s.startswith("ota-")},
    "spool-offline": spool,
    "spool-online": spool,
    "restart-on-full-disk": restart,
    "install-no-room": install,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    ballast = Ballast(Path(spec["root"]))
    out = Result(spec["scenario"], ballast.mechanism)
    started = time.monotonic()
    shutil.copytree(spec["template"], Path(spec["root"]) / "data")
    try:
        RUNNERS[spec["scenario"]](spec, out, ballast)
    except Exception as exc:  # the run failed: reported as such, with its reason, never as a crash of the harness
        log.exception("scenario %s", spec["scenario"])
        out.problems.append(f"{type(exc).__name__}: {exc}")
        out.converged = False
    finally:
        ballast.free()
    out.seconds = round(time.monotonic() - started, 2)
    print(json.dumps(asdict(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
