"""The crash-point matrix: the agent is killed (SIGKILL) at every named point of device_agent/fault_points.py and
started again without the fault; what a user would notice is then checked.

One scenario per group of points, real parts throughout (``edgeops-agent`` subprocesses, a real mosquitto, the
release server in this process, the fleet's trust repository):

- install: ``edgeops-agent install`` of 1.3.0 on a device whose three slots are in use (1.0.0, 1.1.0, 1.2.0
  active) so the candidate overwrites an old slot. After the kill the device serves 1.2.0 (1.3.0 once state.json
  was committed), re-verified from disk, and the next install (1.4.0) goes through and leaves no temp file.
- rollback: a signed ``rollback`` command to the daemon on 1.2.0; after the kill the device serves 1.1.0 (the
  rollback was committed before either point).
- OTA: a delta from 1.0.0 to a fine-tuned 2.0.0 in 1 KiB chunks; after the kill the restarted daemon resumes and
  converges on 2.0.0 with nothing of the download left behind.
- spool: the daemon spools telemetry every 0.1 s; every message ever spooled (seq 1..max) reaches the broker,
  first deliveries in seq order (a re-send of a message in flight at the kill is a duplicate, counted).
- trust: TUF mode with the targets key rotated (root v2) and a release listed; after the kill the trust store
  loads, root v2 is kept and the OTA converges.

Every case also checks that each slot the state names verifies and holds the version the state says (never a mix
or a corrupt file), and fails when the point was never reached (the first run must end by SIGKILL).
benchmarks/chaos/crash_matrix.py runs the same cases repeatedly through :func:`run_case`.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Metadata

from device_agent.config import HealthConfig, load_config
from device_agent.fault_points import (
    INSTALL_POINTS,
    OTA_POINTS,
    POINTS,
    SLOT_POINTS,
    SPOOL_POINTS,
    SWAP_POINTS,
    TRUST_POINTS,
)
from device_agent.model_host import ModelHost, load_model
from device_agent.slot_store import SlotStore
from device_agent.trust_client import TrustClient
from edgeops.errors import EdgeopsError
from edgeops.protocol import device_topics, parse_broker_url, sign_command
from edgeops.release_builder import PublishedRelease, build_release
from edgeops.release_server import ReleaseServer
from edgeops.signing import load_private_key, load_public_key
from edgeops.trust_repo import init_repo
from tests.support.artifacts import ROOT, build_digits, repack
from tests.support.mosquitto import MosquittoBroker
from tests.support.subscriber import Collector

FLEET, DEVICE, PROFILE = "testfleet", "dev-1", "x86-gateway"
TOPICS = device_topics(FLEET, DEVICE)
CHUNK = 1024  # the 2.0.0 delta spans ~50 chunks
WAIT_S = 60.0  # the most any one step may take (normally well under 5 s)
# which hit of a point is killed (default: the first): mid-download, mid-apply, after some traffic
HIT = {
    "transfer.chunk.written": 20,
    "ota.chunk.stored": 30,
    "transfer.synced": 2,
    "ota.apply.record": 30,
    "spool.put.committed": 5,
    "outbox.published": 5,
    "outbox.confirmed": 5,
    "spool.acked": 5,
}


def specs(points: tuple[str, ...]) -> tuple[str, ...]:
    """``EDGEOPS_FAULT_POINT`` values for ``points``: ``name@N`` where :data:`HIT` says N."""
    return tuple(f"{p}@{HIT[p]}" if p in HIT else p for p in points)


# the root is written at provisioning (first start, hit 1) and again when the rotation to v2 is followed (hit 2)
TRUST_CASES = ("trust.root.written@1", "trust.root.written@2", *TRUST_POINTS[1:])


# -- the kit: artifacts, the release and data-dir templates, made once ------------------------------------------


@dataclass(frozen=True)
class Kit:
    keys: Path  # signing.key / signing.pub: artifacts, static-key releases and commands
    digits: Path  # examples/digits/out
    arts: dict[str, Path]  # version -> x86-gateway artifact: 1.0.0 .. 1.4.0 (same model), 2.0.0 (fine-tuned)
    release: PublishedRelease  # 2.0.0 as a delta from 1.0.0, CHUNK-sized chunks, signed with signing.key
    one: Path  # a data dir with 1.0.0 installed
    three: Path  # a data dir with 1.0.0, 1.1.0 and 1.2.0 installed (1.2.0 active, 1.1.0 previous)


def _with_version(version: str) -> Callable[[dict[str, Any]], None]:
    def set_version(doc: dict[str, Any]) -> None:
        doc["version"] = version

    return set_version


def build_kit(work: Path, keys: Path, digits: Path, built: Mapping[str, Path] | None = None) -> Kit:
    """Build what the cases share under ``work`` (~15 s); ``built`` gives artifacts already built, by version."""
    key = keys / "signing.key"
    arts = dict(built or {})
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        if version not in arts:
            arts[version] = build_digits(digits, work / "arts", key, version, profiles=(PROFILE,))[PROFILE]
    for version in ("1.3.0", "1.4.0"):
        dst = work / f"digits-{version}-{PROFILE}.edgeops"
        arts[version] = repack(arts["1.2.0"], dst, key, manifest=_with_version(version))
    tuned = work / "tuned"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/digits/fine_tune.py"),
            "--base",
            str(digits),
            "--out",
            str(tuned),
            "--epochs",
            "1",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    arts["2.0.0"] = build_digits(tuned, work / "arts-2", key, "2.0.0", profiles=(PROFILE,))[PROFILE]
    release = build_release(
        arts["2.0.0"],
        [arts["1.0.0"]],
        fleet=FLEET,
        key=load_private_key(key),
        store=work / "releases",
        chunk_size=CHUNK,
    )
    one = _template(work / "one", keys, [arts["1.0.0"]])
    three = _template(work / "three", keys, [arts[v] for v in ("1.0.0", "1.1.0", "1.2.0")])
    return Kit(keys, digits, arts, release, one, three)


def _template(site: Path, keys: Path, installs: list[Path]) -> Path:
    from device_agent.agent import Agent

    agent = Agent(load_config(write_agent_config(site, keys)), connect=False, serve_api=False)
    try:
        agent.load_slots()
        for artifact in installs:
            gate = agent.install(artifact, source="cli")
            if not gate.passed:
                raise RuntimeError(f"template install of {artifact} failed: {gate.reason}")
    finally:
        agent.stop()
    return site / "data"


def write_agent_config(
    site: Path,
    keys: Path,
    *,
    broker: str = "mqtt://127.0.0.1:1",
    trust_root: Path | None = None,
    **sections: dict[str, Any],
) -> Path:
    """``site/agent.toml`` for a device whose data dir is ``site/data``; ``sections`` override table entries."""
    top: dict[str, Any] = {"device_id": DEVICE, "fleet": FLEET, "profile": PROFILE, "groups": ["canary"]}
    top["data_dir"] = str(site / "data")
    if trust_root is None:
        top["trusted_keys"] = [str(keys / "signing.pub")]
    tables: dict[str, dict[str, Any]] = {
        "broker": {"url": broker},
        "api": {"address": ""},
        # the gate's latency check is not under test here, and a loaded 2-core machine misses a 1x budget now and then
        "health": {"latency_runs": 5, "latency_budget_factor": 50.0},
        "telemetry": {"interval_s": 60},
        "ota": {"repair_idle_s": 0.3, "repair_min_interval_s": 0.3, "sync_every_chunks": 8},
    }
    if trust_root is not None:
        tables["trust"] = {"root": str(trust_root)}
    for name, over in sections.items():
        tables[name] = {**tables.get(name, {}), **over}
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
    site.mkdir(parents=True, exist_ok=True)
    path = site / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- outcomes ------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one kill-and-restart did, as a user would see it."""

    spec: str  # the EDGEOPS_FAULT_POINT value
    killed: bool = False  # the first run ended by SIGKILL at the point
    converged: bool = False  # the restarted agent reached the expected end state
    corrupted: bool = False  # a slot the state names failed verification or holds another version
    lost: int = 0  # spooled messages never delivered (spool cases)
    duplicated: int = 0  # deliveries beyond the first of a message (spool cases; at-least-once)
    reordered: int = 0  # first deliveries out of seq order (spool cases)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok


def check_slots(kit: Kit, data: Path, out: Outcome) -> str | None:
    """The version the device serves from ``data``: every slot the state names re-verified from disk (as the agent
    does at start) and holding the version the state records; the active one loaded and asked for an answer."""
    store = SlotStore(
        data / "slots", trusted_keys=[load_public_key(kit.keys / "signing.pub")], profile=PROFILE, read_only=True
    )
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
    host = ModelHost(HealthConfig())
    host.set_models(load_model(store.verify_slot(state.active), state.active, threads=1), None)
    x = np.load(kit.digits / "eval_nchw.npz")["x"][:1].astype(np.float32)
    return host.infer({"image": x}).version


# -- processes and MQTT --------------------------------------------------------------------------------------------


def _env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPS_FAULT_POINT"}
    if fault:
        env["EDGEOPS_FAULT_POINT"] = fault
    return env


def agent_cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent.cli", *args],
        capture_output=True,
        text=True,
        env=_env(fault),
        timeout=WAIT_S,
        cwd=ROOT,
    )


def start_agent(cfg: Path, fault: str | None = None) -> subprocess.Popen[bytes]:
    with (cfg.parent / "agent.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "device_agent.cli", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=_env(fault),
            cwd=ROOT,
        )


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = WAIT_S) -> int | None:
    """The exit status, or None (and the process killed) when it was still running after ``timeout`` s."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def stop_agent(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return wait_exit(proc, 30)


def _log_tail(cfg: Path) -> str:
    try:
        return (cfg.parent / "agent.log").read_text(errors="replace")[-1500:]
    except OSError:
        return ""


def _online(
    watch: Collector,
    proc: subprocess.Popen[bytes],
    pred: Callable[[dict[str, Any]], bool] = lambda d: True,
    timeout: float = WAIT_S,
    since: float | None = None,
) -> dict[str, Any] | None:
    """The first retained state this process published that satisfies ``pred``; None when the process ended.

    Raises AssertionError after ``timeout`` s, or at once when, ``since`` then (wall clock), the device reported
    that it gave an update up (``ota.rejected``, ``ota.failed``): nothing would bring it to ``pred`` then.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for doc in reversed(watch.json("/state")):
            if doc.get("pid") == proc.pid and doc.get("online") and pred(doc):
                return doc
        if proc.poll() is not None:
            return None
        if since is not None:
            for event in watch.json("/event"):
                if event["type"] in ("ota.rejected", "ota.failed") and event["ts"] >= since:
                    raise AssertionError(
                        f"the restarted agent gave the update up: {event['type']} {event.get('reason')}: "
                        f"{event.get('detail')}"
                    )
        time.sleep(0.05)
    raise AssertionError(f"no state from agent {proc.pid} matched within {timeout}s")


def _command(watch: Collector, key: Ed25519PrivateKey, name: str, args: dict[str, Any]) -> str:
    """Send a signed command to the device; returns its nonce."""
    nonce = secrets.token_hex(16)
    raw = sign_command(key, name=name, args=args, fleet=FLEET, target=f"device/{DEVICE}", now=time.time(), nonce=nonce)
    watch.publish(TOPICS.cmd, raw)
    return nonce


def _active(version: str) -> Callable[[dict[str, Any]], bool]:
    """A state predicate: ``version`` serves and no OTA is under way."""

    def serving(state: dict[str, Any]) -> bool:
        active = (state.get("models") or {}).get("active") or {}
        return bool(active.get("version") == version and state.get("ota") is None)

    return serving


def _first_run(out: Outcome, proc: subprocess.Popen[bytes], cfg: Path, timeout: float = WAIT_S) -> None:
    rc = wait_exit(proc, timeout)
    out.killed = out.expect(
        rc == -signal.SIGKILL,
        f"{out.spec}: first run ended with {rc}, not SIGKILL (point not reached?): {_log_tail(cfg)}",
    )


def _fallback_loaded(watch: Collector, proc: subprocess.Popen[bytes], key: Ed25519PrivateKey) -> None:
    """Wait until the agent has loaded its previous slot as the fallback (a background load at start; its state
    says so once re-published, which a ``status`` command asks for). A SIGTERM during that load can abort the
    process in the runtime's C++ code — a stop-at-start matter, not what these cases test."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        states = [d for d in watch.json("/state") if d.get("pid") == proc.pid and d.get("online")]
        last = states[-1] if states else {}
        if (last.get("slots") or {}).get("previous") is None or (last.get("models") or {}).get("previous"):
            return
        _command(watch, key, "status", {})
        until = time.monotonic() + 1
        while len([d for d in watch.json("/state") if d.get("pid") == proc.pid]) <= len(states):
            if time.monotonic() > until or proc.poll() is not None:
                break
            time.sleep(0.05)


def _restart_until(
    out: Outcome,
    watch: Collector,
    cfg: Path,
    key: Ed25519PrivateKey,
    pred: Callable[[dict[str, Any]], bool],
    then: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> bool:
    """Start the agent without the fault, wait for a state matching ``pred``, stop it (SIGTERM, exit 0); ``key``
    signs the commands the device obeys."""
    since = time.time()
    proc = start_agent(cfg)
    reached = False
    try:
        if then is None or _online(watch, proc, since=since) is not None:
            if then is not None:
                then(proc)
            reached = _online(watch, proc, pred, since=since) is not None
        out.expect(reached or proc.poll() is None, f"the restarted agent died: {_log_tail(cfg)}")
        _fallback_loaded(watch, proc, key)
    except AssertionError as exc:
        out.problems.append(str(exc))
    finally:
        rc = stop_agent(proc)
    return out.expect(rc == 0, f"the restarted agent stopped with {rc}: {_log_tail(cfg)}") and reached


def _watch(broker: MosquittoBroker, *topics: str) -> Collector:
    return Collector(broker.host, broker.port, [TOPICS.state, *topics], client_id=f"watch-{time.monotonic_ns()}")


# -- scenarios -----------------------------------------------------------------------------------------------------


def install_case(kit: Kit, spec: str, site: Path) -> Outcome:
    out = Outcome(spec)
    data = site / "data"
    shutil.copytree(kit.three, data)
    cfg = write_agent_config(site, kit.keys)
    killed = agent_cli("install", "--config", str(cfg), str(kit.arts["1.3.0"]), fault=spec)
    out.killed = out.expect(
        killed.returncode == -signal.SIGKILL,
        f"install ended with {killed.returncode}, not SIGKILL: {killed.stderr[-1500:]}",
    )
    expect = "1.3.0" if spec in ("install.committed", "install.swapped") else "1.2.0"
    served = check_slots(kit, data, out)
    out.expect(served == expect, f"serves {served} after the kill, expected {expect}")
    nxt = agent_cli("install", "--config", str(cfg), str(kit.arts["1.4.0"]))
    out.expect(nxt.returncode == 0, f"the next install ended with {nxt.returncode}: {nxt.stderr[-1500:]}")
    state = json.loads((data / "slots" / "state.json").read_text())
    out.expect(state["versions"].get(state["previous"]) == expect, f"previous is not {expect}: {state}")
    out.expect(not list((data / "slots").glob(".*.tmp")), "a temp file is left in the slots")
    after = check_slots(kit, data, out)
    out.converged = out.expect(after == "1.4.0", f"serves {after} after the next install") and not out.problems
    return out


def rollback_case(kit: Kit, spec: str, site: Path, broker: MosquittoBroker) -> Outcome:
    out = Outcome(spec)
    shutil.copytree(kit.three, site / "data")
    cfg = write_agent_config(site, kit.keys, broker=broker.url)
    key = load_private_key(kit.keys / "signing.key")
    watch = _watch(broker, TOPICS.event)
    try:
        proc = start_agent(cfg, fault=spec)
        if _online(watch, proc) is not None:
            for _ in range(100):  # refused ("no previous model loaded") until the fallback has loaded: again
                nonce = _command(watch, key, "rollback", {})
                deadline = time.monotonic() + 5
                while proc.poll() is None and time.monotonic() < deadline:
                    if any(
                        e.get("nonce") == nonce and e["type"] in ("command.failed", "command.done")
                        for e in watch.json("/event")
                    ):
                        break
                    time.sleep(0.05)
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        _first_run(out, proc, cfg)
        _restart_until(out, watch, cfg, key, _active("1.1.0"))
    finally:
        watch.close()
    served = check_slots(kit, site / "data", out)
    state = json.loads((site / "data" / "slots" / "state.json").read_text())
    out.expect(state["versions"].get(state["previous"]) == "1.2.0", f"1.2.0 is not kept as previous: {state}")
    out.converged = out.expect(served == "1.1.0", f"serves {served}, expected 1.1.0") and not out.problems
    return out


def ota_case(kit: Kit, spec: str, site: Path, broker: MosquittoBroker) -> Outcome:
    out = Outcome(spec)
    data = site / "data"
    shutil.copytree(kit.one, data)
    cfg = write_agent_config(site, kit.keys, broker=broker.url)
    rid = kit.release.meta.release_id
    key = load_private_key(kit.keys / "signing.key")
    server = ReleaseServer(parse_broker_url(broker.url), FLEET, [kit.release], client_id="release-server")
    server.start()
    watch = _watch(broker, TOPICS.event)
    try:
        proc = start_agent(cfg, fault=spec)
        if _online(watch, proc) is not None:
            _command(watch, key, "ota-update", {"release_id": rid})
        _first_run(out, proc, cfg)
        done = _restart_until(out, watch, cfg, key, _active("2.0.0"))
    finally:
        watch.close()
        server.stop()
    served = check_slots(kit, data, out)
    out.expect(served == "2.0.0", f"serves {served}, expected 2.0.0")
    left = sorted(p.name for p in (data / "ota").iterdir()) if (data / "ota").exists() else []
    out.expect(not left, f"the download is left behind: {left}")
    out.expect(not (data / "ota-wanted.json").exists(), "ota-wanted.json is left behind")
    out.converged = done and served == "2.0.0" and not out.problems
    return out


def _spool_seqs(path: Path) -> tuple[int, set[int]]:
    """(the highest seq ever given, the seqs still waiting) of a spool file no process holds."""
    conn = sqlite3.connect(str(path))
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        pending = {int(r[0]) for r in conn.execute("SELECT seq FROM messages")}
    finally:
        conn.close()
    return (int(row[0]) if row else 0), pending


def _delivered(watch: Collector) -> list[int]:
    """The seqs of the spooled messages (events, telemetry) received, in arrival order, duplicates included."""
    wanted = (TOPICS.event, TOPICS.telemetry)
    return [int(json.loads(p)["seq"]) for t, p, _ in list(watch.messages) if t in wanted and p]


def spool_case(kit: Kit, spec: str, site: Path, broker: MosquittoBroker) -> Outcome:
    out = Outcome(spec)
    data = site / "data"
    shutil.copytree(kit.one, data)
    cfg = write_agent_config(site, kit.keys, broker=broker.url, telemetry={"interval_s": 0.1})
    key = load_private_key(kit.keys / "signing.key")
    watch = _watch(broker, TOPICS.event, TOPICS.telemetry)
    try:
        _first_run(out, start_agent(cfg, fault=spec), cfg)
        spooled, _ = _spool_seqs(data / "spool.sqlite")  # every message committed before the kill

        def all_in(_proc: subprocess.Popen[bytes]) -> None:
            deadline = time.monotonic() + WAIT_S
            while not set(range(1, spooled + 1)) <= set(_delivered(watch)) and time.monotonic() < deadline:
                time.sleep(0.05)

        restarted = _restart_until(out, watch, cfg, key, lambda d: True, then=all_in)
        final, pending = _spool_seqs(data / "spool.sqlite")
        expected = set(range(1, final + 1)) - pending  # the clean stop's last messages may still be on their way
        deadline = time.monotonic() + 10
        while not expected <= set(_delivered(watch)) and time.monotonic() < deadline:
            time.sleep(0.05)
        received = _delivered(watch)
    finally:
        watch.close()
    firsts = list(dict.fromkeys(received))
    out.lost = len(set(range(1, final + 1)) - set(received) - pending)
    out.duplicated = len(received) - len(firsts)
    out.reordered = sum(1 for a, b in itertools.pairwise(firsts) if b < a)
    out.expect(spooled > 0, "nothing was spooled before the kill")
    out.expect(out.lost == 0, f"{out.lost} spooled message(s) lost (1..{final}, pending {sorted(pending)})")
    out.expect(out.reordered == 0, f"first deliveries out of order: {firsts}")
    out.expect(out.duplicated <= 64, f"{out.duplicated} duplicates: more than one batch re-sent")
    served = check_slots(kit, data, out)
    out.converged = restarted and served == "1.0.0" and not out.problems
    return out


def trust_case(kit: Kit, spec: str, site: Path, broker: MosquittoBroker) -> Outcome:
    out = Outcome(spec)
    data = site / "data"
    shutil.copytree(kit.one, data)
    repo = init_repo(
        site / "trust-repo", fleet=FLEET, artifacts_key=kit.keys / "signing.pub", settings={"timestamp_expiry_s": 3600}
    )

    def key(name: str) -> Ed25519PrivateKey:
        return load_private_key(repo.keys_dir / f"{name}.key")

    targets = Ed25519PrivateKey.generate()  # the release key is rotated: root v2
    repo.rotate("targets", [targets.public_key()], [key("root-1"), key("root-2")], targets_key=targets)
    rel = build_release(kit.arts["1.1.0"], [kit.arts["1.0.0"]], fleet=FLEET, key=targets, store=site / "releases")
    repo.add_release(rel.meta.release_id, rel.signed, targets)
    repo.publish_timestamp(key("timestamp"))
    cfg = write_agent_config(site, kit.keys, broker=broker.url, trust_root=repo.root_path(1))
    server = ReleaseServer(parse_broker_url(broker.url), FLEET, [], client_id="release-server")
    server.start()
    server.set_retained(repo.retained_messages())
    server.add_release(rel)
    watch = _watch(broker, TOPICS.event)
    deployed = False

    def deploy(_proc: subprocess.Popen[bytes] | None = None) -> None:
        nonlocal deployed
        if not deployed:
            _command(watch, key("commands"), "ota-update", {"release_id": rel.meta.release_id})
            deployed = True

    try:
        out.expect(server.flush(10), "the release server did not publish the trust metadata")
        proc = start_agent(cfg, fault=spec)
        if _online(watch, proc) is not None:
            deploy()
        _first_run(out, proc, cfg)
        # killed before it was online (no command sent yet): the operator deploys to the restarted agent
        done = _restart_until(out, watch, cfg, key("commands"), _active("1.1.0"), then=deploy)
    finally:
        watch.close()
        server.stop()
    try:  # the agent's own start-up check: the stored root verifies; every role file kept is whole
        trust = TrustClient(data, FLEET, repo.root_path(1))
        out.expect(trust.root_version == 2, f"the trust store holds root v{trust.root_version}, not v2")
        for role in ("timestamp", "snapshot", "targets"):
            if (data / "trust" / f"{role}.json").exists():
                Metadata.from_bytes((data / "trust" / f"{role}.json").read_bytes())
    except (EdgeopsError, OSError, ValueError) as exc:
        out.problems.append(f"the trust store does not load: {exc}")
    served = check_slots(kit, data, out)
    out.converged = done and out.expect(served == "1.1.0", f"serves {served}, expected 1.1.0") and not out.problems
    return out


Scenario = Callable[..., Outcome]
# group -> (the fault specs it runs, the scenario, whether it needs a broker)
GROUPS: dict[str, tuple[tuple[str, ...], Scenario, bool]] = {
    "install": (specs(INSTALL_POINTS + SLOT_POINTS + SWAP_POINTS[:1]), install_case, False),
    "rollback": (specs(SWAP_POINTS[1:]), rollback_case, True),
    "ota": (specs(OTA_POINTS), ota_case, True),
    "spool": (specs(SPOOL_POINTS), spool_case, True),
    "trust": (TRUST_CASES, trust_case, True),
}


def run_case(kit: Kit, group: str, spec: str, site: Path, broker: MosquittoBroker | None = None) -> Outcome:
    """One kill-and-restart in ``site`` (a directory that does not exist yet); groups that need a broker use
    ``broker`` or start their own. A step that times out is a problem of the outcome, not an exception."""
    _, scenario, needs_broker = GROUPS[group]
    started = time.monotonic()
    own = MosquittoBroker(site.parent / f"{site.name}-mosquitto") if needs_broker and broker is None else None
    try:
        if own is not None:
            own.start()
            broker = own
        out = scenario(kit, spec, site, broker) if needs_broker else scenario(kit, spec, site)
    except AssertionError as exc:
        out = Outcome(spec, problems=[f"{type(exc).__name__}: {exc}"])
    finally:
        if own is not None:
            own.stop()
    out.seconds = round(time.monotonic() - started, 2)
    return out


# -- the tests -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path], keys_dir: Path, digits_dir: Path) -> Kit:
    built = {"1.0.0": artifacts["v1"], "1.1.0": artifacts["v1.1"], "1.2.0": artifacts["v1.2"]}
    return build_kit(tmp_path_factory.mktemp("crash-kit"), keys_dir, digits_dir, built)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "site"


def _assert_survived(out: Outcome) -> None:
    flags = f"killed={out.killed} converged={out.converged} corrupted={out.corrupted}"
    assert out.problems == [] and out.killed and out.converged and not out.corrupted, "\n".join([flags, *out.problems])


def test_every_point_is_in_the_matrix() -> None:
    covered = {s.partition("@")[0] for cases, _, _ in GROUPS.values() for s in cases}
    assert covered == set(POINTS) and len(POINTS) >= 20


@pytest.mark.parametrize("spec", GROUPS["install"][0])
def test_kill_during_install(kit: Kit, spec: str, site: Path) -> None:
    _assert_survived(run_case(kit, "install", spec, site))


@pytest.mark.parametrize("spec", GROUPS["rollback"][0])
def test_kill_during_rollback(kit: Kit, spec: str, site: Path, mosquitto: MosquittoBroker) -> None:
    _assert_survived(run_case(kit, "rollback", spec, site, mosquitto))


@pytest.mark.parametrize("spec", GROUPS["ota"][0])
def test_kill_during_ota_resumes_and_converges(kit: Kit, spec: str, site: Path, mosquitto: MosquittoBroker) -> None:
    _assert_survived(run_case(kit, "ota", spec, site, mosquitto))


@pytest.mark.parametrize("spec", GROUPS["spool"][0])
def test_kill_during_spool_flush_loses_nothing(kit: Kit, spec: str, site: Path, mosquitto: MosquittoBroker) -> None:
    _assert_survived(run_case(kit, "spool", spec, site, mosquitto))


@pytest.mark.parametrize("spec", GROUPS["trust"][0])
def test_kill_while_storing_trust_metadata(kit: Kit, spec: str, site: Path, mosquitto: MosquittoBroker) -> None:
    _assert_survived(run_case(kit, "trust", spec, site, mosquitto))
