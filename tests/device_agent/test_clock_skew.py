"""A device whose wall clock is wrong: ahead, behind, stepped by NTP mid-run, in 1970 under mutual TLS.

Real parts throughout: ``edgeops-agent run`` subprocesses whose clock libfaketime really skews
(tests/support/skewed_clock.py; the monotonic clock is left alone, as on a device), a real mosquitto, the fleet's
TUF trust repository (timestamp window 1 day) and release server, and the fleet's ingest worker writing the
device's telemetry into a SQLite fleet store. Commands are signed with the fleet's (correct) clock.

Scenarios, checked for what a user notices:

- ``ahead`` (clock +2 days, past the timestamp window): inference answers; telemetry flows and the fleet stores
  it (by ``seq`` and ``received_at``; its ``ts`` is the device's); a command is refused ``expired`` with the
  device's time and a clock offset of about -2 days in the event; a release published then is refused
  ``expired-metadata`` (the detail names the device's clock) while the old model serves. Once the clock is set
  right, telemetry goes on at once (no timer waits out the 2 days) and the update goes through.
- ``behind-then-ntp`` (the Raspberry Pi without RTC): an update asked for, then the device boots with yesterday's
  time. Commands are refused ``not-yet-valid`` with an offset of about +1 day; the update asked for before still
  installs (TUF has no not-before). NTP steps the clock forward: commands are accepted, the next update installs,
  telemetry keeps its ``seq`` order with neither a stall nor a burst at the step.
- ``tls-1970`` (mutual TLS, the device boots at the epoch, before the broker certificate's not-before): the
  handshake fails (certificate not yet valid) while inference answers; once the clock is stepped the agent
  connects within its backoff and obeys commands.

benchmarks/chaos/clock_skew.py runs the same scenarios repeatedly through :data:`SCENARIOS`.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.api_client import ApiClient
from device_agent.command_guard import (
    CommandClockRejected,
    CommandGuard,
    MemoryNonceStore,
    NonceStore,
    SqliteNonceStore,
)
from edgeops.errors import EdgeopsError, ReleaseRejected
from edgeops.fleet.ingest_worker import IngestWorker
from edgeops.fleet.store import open_store
from edgeops.pki import init_pki, issue_device
from edgeops.protocol import device_topics, parse_broker_url, sign_command
from edgeops.release_builder import PublishedRelease, build_release
from edgeops.release_server import ReleaseServer
from edgeops.signing import load_private_key
from edgeops.trust import TrustSession
from edgeops.trust_repo import TrustRepo, init_repo, load_repo
from tests.support.artifacts import ROOT
from tests.support.mosquitto import MosquittoBroker
from tests.support.skewed_clock import SkewedClock, agent_argv
from tests.support.subscriber import Collector
from tests.support.waiting import wait_for

FLEET, DEVICE, PROFILE = "skewfleet", "dev-1", "x86-gateway"
TOPICS = device_topics(FLEET, DEVICE)
DAY = 86400.0
WAIT_S = 60.0  # the most one step may take (normally a few seconds)
TELEMETRY_S = 0.2  # the agents' telemetry interval
SKEW_TOLERANCE_S = 600.0  # a reported time or offset is "right" within this (delivery delays, a loaded machine)


# -- the kit: artifacts, a trust repository template and its releases, made once ----------------------------------


@dataclass(frozen=True)
class Kit:
    keys: Path  # signing.key / signing.pub: the artifacts' build key
    digits: Path  # examples/digits/out
    arts: dict[str, Path]  # version -> x86-gateway artifact: 1.0.0, 1.1.0, 1.2.0
    repo: Path  # a trust repository (timestamp window 1 day) whose targets key signed the releases
    releases: dict[str, PublishedRelease]  # 1.1.0 (delta from 1.0.0), 1.2.0 (delta from 1.1.0), not listed yet


def build_kit(work: Path, keys: Path, digits: Path, arts: dict[str, Path]) -> Kit:
    repo = init_repo(work / "trust-repo", fleet=FLEET, artifacts_key=keys / "signing.pub")  # window: 1 day
    targets = load_private_key(repo.keys_dir / "targets.key")
    releases = {
        new: build_release(arts[new], [arts[old]], fleet=FLEET, key=targets, store=work / "releases")
        for old, new in (("1.0.0", "1.1.0"), ("1.1.0", "1.2.0"))
    }
    return Kit(keys, digits, arts, repo.directory, releases)


# -- one device's world: broker, trust, release server, ingest, an observer ---------------------------------------


class Watch(Collector):
    """A collector of the device's topics that also notes when (monotonic) each message arrived."""

    def __init__(self, broker: MosquittoBroker, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.arrived: list[float] = []
        super().__init__(broker.host, broker.port, [f"{TOPICS.state.rsplit('/', 1)[0]}/+"],
                         client_id=f"watch-{time.monotonic_ns()}", tls=tls)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.arrived.append(time.monotonic())
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def docs(self, leaf: str, since: int = 0) -> list[tuple[float, dict[str, Any]]]:
        """(arrival, payload) of the messages on the device's ``leaf`` topic from index ``since`` on."""
        with self._cond:
            found = list(zip(self.arrived[since:], self.messages[since:], strict=True))
        return [(at, json.loads(p)) for at, (t, p, _) in found if t.endswith("/" + leaf) and p]

    def wait(self, leaf: str, pred: Callable[[dict[str, Any]], bool], since: int, what: str,
             timeout: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for _, doc in self.docs(leaf, since):
                if pred(doc):
                    return doc
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [d for _, d in self.docs(leaf, since)][-3:]
                raise AssertionError(f"timed out waiting for {what}; last {leaf}: {seen}")
            with self._cond:
                self._cond.wait(min(left, 0.2))


class World:
    """The fleet side of one scenario, in ``site``; the device's data and config under ``site`` too."""

    def __init__(self, site: Path, kit: Kit, *, tls: bool = False) -> None:
        self.site, self.kit = site, kit
        site.mkdir(parents=True)
        shutil.copytree(kit.repo, site / "trust-repo")
        self.repo: TrustRepo = load_repo(site / "trust-repo")
        self.pki: Path | None = None
        fleet_id: tuple[Path, Path, Path] | None = None
        if tls:
            self.pki = site / "pki"
            init_pki(self.pki, fleet=FLEET)
            issue_device(self.pki, DEVICE, groups=["canary"])
            fleet_id = (self.pki / "ca.crt", self.pki / "fleet.crt", self.pki / "fleet.key")
            self.broker = MosquittoBroker.tls(site / "broker", self.pki)
        else:
            self.broker = MosquittoBroker(site / "broker")
        self.broker.start()
        self.url = self.broker.tls_url if tls else self.broker.url
        ca, cert, key = fleet_id or (None, None, None)
        self.server = ReleaseServer(parse_broker_url(self.url), FLEET, [], client_id="release-server", ca_certs=ca,
                                    cert_file=cert, key_file=key)
        self.server.start()
        self.publish_trust()
        self.watch = Watch(self.broker, fleet_id)
        self.store_path = site / "fleet.db"
        self.ingest: IngestWorker | None = None
        if not tls:
            self.ingest = IngestWorker(broker_url=self.url, fleet=FLEET, store_url=str(self.store_path),
                                       client_id="ingest-1", batch_interval_s=0.1)
            self.ingest.start()
            if not self.ingest.wait_connected(30):
                raise AssertionError("the ingest worker did not subscribe")
        self.procs: list[subprocess.Popen[bytes]] = []

    def close(self) -> None:
        for proc in self.procs:
            stop_agent(proc)
        if self.ingest is not None:
            self.ingest.stop()
        self.watch.close()
        self.server.stop()
        self.broker.stop()

    def _key(self, name: str) -> Any:
        return load_private_key(self.repo.keys_dir / f"{name}.key")

    def publish_trust(self) -> None:
        self.repo.publish_timestamp(self._key("timestamp"))
        self.server.set_retained(self.repo.retained_messages())
        if not self.server.flush(10):
            raise AssertionError("the release server did not publish the trust metadata")

    def release_id(self, version: str) -> str:
        return self.kit.releases[version].meta.release_id

    def publish(self, version: str) -> None:
        """List the release in targets.json, publish fresh trust metadata and serve the release."""
        rel = self.kit.releases[version]
        self.repo.add_release(rel.meta.release_id, rel.signed, self._key("targets"))
        self.publish_trust()
        self.server.add_release(rel)
        if not self.server.flush(10):
            raise AssertionError(f"the release server did not publish {version}")

    def command(self, name: str, args: dict[str, Any]) -> str:
        """A command signed now by the fleet's clock; returns its nonce."""
        nonce = secrets.token_hex(16)
        raw = sign_command(self._key("commands"), name=name, args=args, fleet=FLEET, target=f"device/{DEVICE}",
                           now=time.time(), nonce=nonce)
        self.watch.publish(TOPICS.cmd, raw)
        return nonce

    def answer(self, nonce: str, since: int) -> dict[str, Any]:
        """The device's final word on the command: command.done, command.failed or command.rejected."""
        final = ("command.done", "command.failed", "command.rejected")
        return self.watch.wait("event", lambda e: e.get("nonce") == nonce and e["type"] in final, since,
                               f"the answer to command {nonce}")

    def config(self, *, initial: str = "1.0.0") -> Path:
        lines = [f"{k} = {json.dumps(v)}" for k, v in {
            "device_id": DEVICE, "fleet": FLEET, "profile": PROFILE, "groups": ["canary"],
            "data_dir": str(self.site / "data"), "initial_artifact": str(self.kit.arts[initial])}.items()]
        broker = {"url": self.url, "max_backoff_s": 1.0}
        if self.pki is not None:
            dev = self.pki / "devices" / DEVICE
            broker |= {"ca_file": str(dev / "ca.crt"), "cert_file": str(dev / "device.crt"),
                       "key_file": str(dev / "device.key")}
        tables: dict[str, dict[str, Any]] = {
            "broker": broker,
            "api": {"address": f"unix:{self.site / 'api.sock'}"},
            "health": {"latency_runs": 5, "latency_budget_factor": 50.0},  # latency is not under test
            "telemetry": {"interval_s": TELEMETRY_S},
            "ota": {"repair_idle_s": 0.3, "repair_min_interval_s": 0.3},
            "trust": {"root": str(self.repo.root_path(1))},
        }
        for name, table in tables.items():
            lines += [f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
        path = self.site / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_agent(self, clock: SkewedClock) -> subprocess.Popen[bytes]:
        cfg = self.config()
        with (self.site / "agent.log").open("ab") as log:
            proc = subprocess.Popen(agent_argv("run", "--config", str(cfg)), stdout=subprocess.DEVNULL, stderr=log,
                                    env=clock.env(), cwd=ROOT)
        self.procs.append(proc)
        return proc

    def online(self, proc: subprocess.Popen[bytes], pred: Callable[[dict[str, Any]], bool] = lambda d: True,
               what: str = "the agent online", timeout: float = WAIT_S) -> dict[str, Any]:
        def match(doc: dict[str, Any]) -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the agent exited with {proc.returncode}: {self.log_tail()}")
            return doc.get("pid") == proc.pid and bool(doc.get("online")) and pred(doc)

        return self.watch.wait("state", match, 0, what, timeout)

    def infer(self) -> str | None:
        """The version that answers an inference through the agent's API (None when none answers)."""
        x = np.load(self.kit.digits / "eval_nchw.npz")["x"][:1].astype(np.float32)
        try:
            with ApiClient(f"unix:{self.site / 'api.sock'}", timeout=10) as api:
                return api.infer({"image": x})[1]
        except EdgeopsError:
            return None

    def stored(self, seq: int) -> Any:
        """The fleet store's newest telemetry row of the device once it has reached ``seq`` (None until then)."""
        with open_store(str(self.store_path)) as store:
            row = store.latest_telemetry([DEVICE]).get(DEVICE)
        return row if row is not None and row.seq >= seq else None

    def broker_log(self) -> str:
        try:
            return (self.broker.workdir / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        try:
            return (self.site / "agent.log").read_text(errors="replace")[-1500:]
        except OSError:
            return ""


def stop_agent(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def serving(version: str) -> Callable[[dict[str, Any]], bool]:
    """A state predicate: ``version`` serves and no OTA is under way."""

    def check(state: dict[str, Any]) -> bool:
        active = (state.get("models") or {}).get("active") or {}
        return bool(active.get("version") == version and state.get("ota") is None)

    return check


# -- outcomes ------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario showed, as a user would see it."""

    scenario: str
    offset_s: float  # the device clock's offset during the skewed part
    inference: bool = False  # the API answered throughout the skew
    telemetry_stored: bool | None = None  # telemetry with the device's skewed ts reached the fleet store (None: no
    # fleet store in the scenario)
    command_refusal: str = ""  # the reason of the command refused under skew ("" when none was)
    reported_offset_s: float | None = None  # clock_offset_s of that refusal
    ota_under_skew: str = ""  # "installed" or the refusal's reason
    converged: bool = False  # after the clock is right: commands obeyed and the last update installed
    timers_ok: bool = False  # telemetry across each step: no stall, no burst, seq order kept
    max_gap_s: float | None = None  # the longest wait between telemetry messages from 2 s before to 5 s after a step
    recovered_s: float | None = None  # from the clock set right to the end state (update installed / connected)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok


def _near(value: Any, want: float) -> bool:
    return isinstance(value, (int, float)) and abs(value - want) <= SKEW_TOLERANCE_S


def _unix(text: Any) -> float | None:
    try:
        return dt.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None


def _telemetry_steady(out: Outcome, w: World, steps: list[float]) -> bool:
    """Telemetry across the clock steps (monotonic instants): the first after each comes within a few intervals,
    the seconds after it hold no burst, and first deliveries keep ``seq`` order (across restarts too)."""
    ok = True
    arrivals = [(at, d["seq"]) for at, d in w.watch.docs("telemetry")]
    for step in steps:
        near = [at for at, _ in arrivals if step - 2.0 <= at <= step + 5.0]
        gap = max((y - x for x, y in itertools.pairwise(near)), default=None)
        out.max_gap_s = None if gap is None else round(max(gap, out.max_gap_s or 0.0), 2)
        after = [at for at, _ in arrivals if at > step]
        ok &= out.expect(bool(after) and after[0] - step < 10 * TELEMETRY_S + 3,
                         f"no telemetry within {10 * TELEMETRY_S + 3:.0f} s of a clock step (a stalled timer?)")
        burst = sum(1 for at in after if at - step <= 3.0)
        ok &= out.expect(burst <= 3 * 3.0 / TELEMETRY_S + 5, f"{burst} telemetry messages in the 3 s after a step")
    firsts = list(dict.fromkeys(seq for _, seq in arrivals))
    ok &= out.expect(all(b > a for a, b in itertools.pairwise(firsts)), "telemetry seq out of order across a step")
    return ok


def _skewed_telemetry(out: Outcome, w: World, offset_s: float, since: int) -> None:
    doc = w.watch.wait("telemetry", lambda d: _near(d["ts"] - time.time(), offset_s), since,
                       "telemetry stamped with the skewed clock")
    row = wait_for("the telemetry in the fleet store", lambda: w.stored(doc["seq"]), 30)
    out.telemetry_stored = out.expect(
        _near(row.ts - row.received_at, offset_s), f"stored telemetry ts {row.ts} / received {row.received_at}"
    )


# -- scenarios -----------------------------------------------------------------------------------------------------


def ahead_case(kit: Kit, site: Path, offset_s: float = 2 * DAY) -> Outcome:
    out = Outcome("ahead", offset_s)
    w = World(site, kit)
    clock = SkewedClock(site, 0.0)
    rid = w.release_id("1.1.0")
    try:
        proc = w.start_agent(clock)
        w.online(proc, serving("1.0.0"))
        m = w.watch.mark()
        w.answer(w.command("ota-update", {"release_id": rid}), m)  # waits for metadata not published yet
        clock.step(offset_s)
        m = w.watch.mark()
        out.inference = out.expect(w.infer() == "1.0.0", "inference did not answer with the clock ahead")
        _skewed_telemetry(out, w, offset_s, m)
        rej = w.answer(w.command("status", {}), m)
        out.command_refusal, out.reported_offset_s = str(rej.get("reason")), rej.get("clock_offset_s")
        out.expect(rej["type"] == "command.rejected" and rej.get("reason") == "expired", f"command: {rej}")
        out.expect(_near(rej.get("clock_offset_s"), -offset_s), f"reported clock offset {rej.get('clock_offset_s')}")
        out.expect(_near(_unix(rej.get("device_time")), clock.now()), f"the device time in the refusal: {rej}")
        w.publish("1.1.0")
        refused = w.watch.wait("event", lambda e: e.get("release_id") == rid and (
            e.get("reason") == "expired-metadata" or e["type"] in ("ota.completed", "ota.failed", "ota.rejected")),
            m, "the release refused for expired metadata")
        out.ota_under_skew = str(refused.get("reason") or refused["type"])
        out.expect(refused.get("reason") == "expired-metadata", f"OTA under skew: {refused}")
        out.expect("device clock" in str(refused.get("detail")), f"the refusal does not name the clock: {refused}")
        out.inference &= out.expect(w.infer() == "1.0.0", "the old model does not serve after the refusal")
        step = time.monotonic()
        clock.step(0.0)  # set right (NTP): the operator deploys again
        m = w.watch.mark()
        done = w.answer(w.command("ota-update", {"release_id": rid}), m)
        out.expect(done["type"] == "command.done", f"ota-update after the clock was set right: {done}")
        w.online(proc, serving("1.1.0"), "1.1.0 installed after the clock was set right")
        out.recovered_s = round(time.monotonic() - step, 2)
        out.converged = out.expect(w.infer() == "1.1.0", "1.1.0 does not answer after the update")
        out.timers_ok = _telemetry_steady(out, w, [step])
    except AssertionError as exc:
        out.problems.append(f"{exc}\n{w.log_tail()}")
    finally:
        out.expect(all(stop_agent(p) == 0 for p in w.procs), f"the agent did not stop cleanly: {w.log_tail()}")
        w.close()
    return out


def behind_case(kit: Kit, site: Path, offset_s: float = -DAY) -> Outcome:
    out = Outcome("behind-then-ntp", offset_s)
    w = World(site, kit)
    clock = SkewedClock(site, 0.0)
    rid, rid2 = w.release_id("1.1.0"), w.release_id("1.2.0")
    try:
        first = w.start_agent(clock)
        w.online(first, serving("1.0.0"))
        m = w.watch.mark()
        w.answer(w.command("ota-update", {"release_id": rid}), m)  # asked for before the power cut
        out.expect(stop_agent(first) == 0, "the first run did not stop cleanly")
        clock.step(offset_s)  # boots with yesterday's saved time
        m = w.watch.mark()
        proc = w.start_agent(clock)
        started = w.watch.wait("event", lambda e: e["type"] == "agent.started", m, "agent.started")
        out.expect(_near(started["ts"] - time.time(), offset_s), f"the agent's clock is not skewed: {started}")
        w.online(proc)
        rej = w.answer(w.command("status", {}), m)
        out.command_refusal, out.reported_offset_s = str(rej.get("reason")), rej.get("clock_offset_s")
        out.expect(rej.get("reason") == "not-yet-valid", f"command with the clock behind: {rej}")
        out.expect(_near(rej.get("clock_offset_s"), -offset_s), f"reported clock offset {rej.get('clock_offset_s')}")
        out.expect("behind" in str(rej.get("detail")), f"the refusal does not say the clock is behind: {rej}")
        w.publish("1.1.0")
        w.online(proc, serving("1.1.0"), "the update asked for before the reboot, installed with the clock behind")
        out.ota_under_skew = "installed"
        out.inference = out.expect(w.infer() == "1.1.0", "inference with the clock behind")
        _skewed_telemetry(out, w, offset_s, m)
        step = time.monotonic()
        clock.step(0.0)  # NTP steps the clock forward
        m = w.watch.mark()
        ok = w.answer(w.command("status", {}), m)
        out.expect(ok["type"] == "command.done", f"a command after the NTP step: {ok}")
        w.publish("1.2.0")
        done = w.answer(w.command("ota-update", {"release_id": rid2}), m)
        out.expect(done["type"] == "command.done", f"ota-update after the NTP step: {done}")
        w.online(proc, serving("1.2.0"), "1.2.0 installed after the NTP step")
        out.recovered_s = round(time.monotonic() - step, 2)
        out.converged = out.expect(w.infer() == "1.2.0", "1.2.0 does not answer after the update")
        out.timers_ok = _telemetry_steady(out, w, [step])
    except AssertionError as exc:
        out.problems.append(f"{exc}\n{w.log_tail()}")
    finally:
        out.expect(all(stop_agent(p) == 0 for p in w.procs), f"the agent did not stop cleanly: {w.log_tail()}")
        w.close()
    return out


def tls_1970_case(kit: Kit, site: Path, offset_s: float | None = None) -> Outcome:
    offset = -(time.time() - 1_000_000.0) if offset_s is None else offset_s  # 1970-01-12
    out = Outcome("tls-1970", offset)
    w = World(site, kit, tls=True)
    clock = SkewedClock(site, offset)
    try:
        proc = w.start_agent(clock)
        out.inference = out.expect(wait_for("the API", w.infer, 30) == "1.0.0", "inference offline in 1970")
        # the device refuses the broker's certificate (not yet valid by its clock): the broker logs the alert
        wait_for("two refused TLS handshakes", lambda: w.broker_log().count("alert bad certificate") >= 2, 30)
        online = [d for _, d in w.watch.docs("state") if d.get("pid") == proc.pid and d.get("online")]
        out.expect(not online, "the agent connected with its clock before the broker certificate's not-before")
        out.ota_under_skew = "no connection"
        step = time.monotonic()
        clock.step(0.0)
        w.online(proc, serving("1.0.0"), "the agent online after the clock step", timeout=30)
        out.recovered_s = round(time.monotonic() - step, 2)
        m = w.watch.mark()
        done = w.answer(w.command("status", {}), m)
        out.converged = out.expect(done["type"] == "command.done", f"a command after the step: {done}")
        # what was spooled in 1970 is delivered once connected, stamped 1970, and the seq order holds
        w.watch.wait("telemetry", lambda d: _near(d["ts"] - time.time(), 0.0), m, "telemetry stamped after the step")
        sent = [d for _, d in w.watch.docs("telemetry")]
        firsts = list(dict.fromkeys(d["seq"] for d in sent))
        out.timers_ok = out.expect(
            any(_near(d["ts"] - time.time(), offset) for d in sent) and firsts == sorted(firsts),
            f"telemetry spooled in 1970 not delivered in order: {[(d['seq'], d['ts']) for d in sent][:20]}",
        )
    except AssertionError as exc:
        out.problems.append(f"{exc}\n{w.log_tail()}")
    finally:
        out.expect(all(stop_agent(p) == 0 for p in w.procs), f"the agent did not stop cleanly: {w.log_tail()}")
        w.close()
    return out


SCENARIOS: dict[str, Callable[[Kit, Path], Outcome]] = {
    "ahead": ahead_case,
    "behind-then-ntp": behind_case,
    "tls-1970": tls_1970_case,
}


# -- the tests -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path], keys_dir: Path, digits_dir: Path) -> Kit:
    arts = {"1.0.0": artifacts["v1"], "1.1.0": artifacts["v1.1"], "1.2.0": artifacts["v1.2"]}
    return build_kit(tmp_path_factory.mktemp("skew-kit"), keys_dir, digits_dir, arts)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "site"


def _assert_ok(out: Outcome) -> None:
    assert out.problems == [], "\n".join(out.problems)
    assert out.inference and out.converged and out.timers_ok


def test_clock_ahead_blocks_updates_and_commands_but_nothing_else(kit: Kit, site: Path) -> None:
    out = ahead_case(kit, site)
    _assert_ok(out)
    assert out.telemetry_stored and out.command_refusal == "expired" and out.ota_under_skew == "expired-metadata"


def test_clock_behind_then_ntp_step(kit: Kit, site: Path) -> None:
    out = behind_case(kit, site)
    _assert_ok(out)
    assert out.telemetry_stored and out.command_refusal == "not-yet-valid" and out.ota_under_skew == "installed"


def test_mtls_device_booting_in_1970_connects_once_the_clock_is_set(kit: Kit, site: Path) -> None:
    _assert_ok(tls_1970_case(kit, site))


# -- the sans-I/O parts: what a refusal says, and a clock set back -------------------------------------------------

T0 = 1_790_000_000.0  # 2026-09-21T...Z


def _cmd(key: Ed25519PrivateKey, *, issued: float, ttl_s: float = 300, nonce: str | None = None) -> bytes:
    return sign_command(key, name="status", args={}, fleet=FLEET, target=f"device/{DEVICE}", now=issued, ttl_s=ttl_s,
                        nonce=nonce)


def _guard(key: Ed25519PrivateKey, nonces: NonceStore) -> CommandGuard:
    return CommandGuard(fleet=FLEET, device_id=DEVICE, groups=[], keys=[key.public_key()], nonces=nonces)


def test_a_refusal_for_the_clock_says_the_device_time_and_the_offset() -> None:
    key = Ed25519PrivateKey.generate()
    guard = _guard(key, MemoryNonceStore())
    with pytest.raises(CommandClockRejected) as behind:
        guard.check(_cmd(key, issued=T0), now=T0 - DAY)
    assert behind.value.reason == "not-yet-valid" and "is the device clock behind?" in behind.value.detail
    assert behind.value.fields()["clock_offset_s"] == DAY
    assert _unix(behind.value.fields()["device_time"]) == T0 - DAY and _unix(behind.value.fields()["issued_at"]) == T0
    with pytest.raises(CommandClockRejected) as ahead:
        guard.check(_cmd(key, issued=T0), now=T0 + 2 * DAY)
    assert ahead.value.reason == "expired" and "2.0 d before this device's clock" in ahead.value.detail
    assert ahead.value.fields()["clock_offset_s"] == -2 * DAY


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_clock_set_back_cannot_reopen_a_used_command(store: str, tmp_path: Path) -> None:
    """A command is accepted, a later one prunes its nonce, the device's clock is set back into the first one's
    window (a clock that ran ahead, corrected): its replay is refused, after a restart too."""
    key = Ed25519PrivateKey.generate()

    def nonces() -> NonceStore:
        return MemoryNonceStore() if store == "memory" else SqliteNonceStore(tmp_path / "nonces.sqlite")

    held = nonces()
    guard = _guard(key, held)
    first = _cmd(key, issued=T0, nonce="first-command-0001")
    guard.check(first, now=T0)
    guard.check(_cmd(key, issued=T0 + 400), now=T0 + 400)  # prunes the first nonce (expired + skew by then)
    assert len(held) == 1  # type: ignore[arg-type]
    if isinstance(held, SqliteNonceStore):
        held.close()
        guard = _guard(key, nonces())
    with pytest.raises(CommandClockRejected) as replay:
        guard.check(first, now=T0 + 100)  # the clock set back: by it, the first command is valid again
    assert replay.value.reason == "expired" and "before a command already accepted" in replay.value.detail


def test_expired_metadata_names_the_expiry_and_the_device_clock(tmp_path: Path) -> None:
    now = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    repo = init_repo(tmp_path / "trust", fleet=FLEET, now=now)  # timestamp window: 1 day
    repo.publish_timestamp(load_private_key(repo.keys_dir / "timestamp.key"), now=now)
    def refresh(at: dt.datetime) -> Any:
        role = repo.role_bytes
        return TrustSession(repo.root_bytes(1), now=at).refresh(
            timestamp=role("timestamp"), snapshot=role("snapshot"), targets=role("targets")
        )

    with pytest.raises(ReleaseRejected) as ahead:
        refresh(now + dt.timedelta(days=2))
    assert ahead.value.reason == "expired-metadata"
    assert ahead.value.detail == (
        "timestamp v1 expired 2026-06-02T00:00:00Z; device clock 2026-06-03T00:00:00Z (ahead? or a freeze)"
    )
    with pytest.raises(ReleaseRejected) as far:
        refresh(now + dt.timedelta(days=400))  # root and targets expired too
    assert far.value.reason == "expired-metadata" and "device clock 2027-07-06T00:00:00Z" in far.value.detail
    # no not-before in TUF: a device a day behind trusts this timestamp until a day after it expired (the freeze
    # window widens by the clock's error)
    assert refresh(now + dt.timedelta(days=2) - dt.timedelta(days=1, seconds=1)).root_version == 1
