"""The agent end to end in-process, against a real mosquitto on a free port: state, telemetry, signed
commands (accepted and every kind of rejected), install / failed gate / rollback over commands, the spool
across a broker outage, and a broker that is not there at start-up."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.api_client import ApiClient
from device_agent.config import load_config
from edgeops.protocol import device_topics, group_cmd_topic, sign_command
from edgeops.signing import generate_keypair, load_private_key
from tests.support.mosquitto import MosquittoBroker
from tests.support.subscriber import Collector

FLEET, DEVICE = "testfleet", "dev-1"
T = device_topics(FLEET, DEVICE)


@pytest.fixture
def eval_x(digits_dir: Path) -> np.ndarray:
    return np.load(digits_dir / "eval_nchw.npz")["x"][:32].astype(np.float32)


@pytest.fixture
def start_agent(write_config: Callable[..., Path]) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def start(broker_url: str, **over: object) -> Agent:
        agent = Agent(load_config(write_config(broker={"url": broker_url}, **over)))
        agent.start()
        agents.append(agent)
        return agent

    yield start
    for a in agents:
        a.stop()


@pytest.fixture
def collector(mosquitto: MosquittoBroker) -> Iterator[Collector]:
    c = Collector(mosquitto.host, mosquitto.port, [f"edgeops/v1/{FLEET}/device/{DEVICE}/#"])
    yield c
    c.close()


@pytest.fixture
def online_agent(
    start_agent: Callable[..., Agent], mosquitto: MosquittoBroker, collector: Collector, artifacts: dict[str, Path]
) -> Agent:
    """An agent serving digits 1.0.0, connected and subscribed (its online state has reached the collector)."""
    agent = start_agent(mosquitto.url, initial_artifact=str(artifacts["v1"]))
    collector.wait_for("/state", lambda d: d.get("online") is True)
    return agent


def _cmd(
    keys_dir: Path,
    name: str,
    args: dict | None = None,
    *,
    target: str = f"device/{DEVICE}",
    ttl: float = 60,
    now: float | None = None,
    key: Path | None = None,
) -> bytes:
    return sign_command(
        load_private_key(key or keys_dir / "signing.key"),
        name=name,
        args=args or {},
        fleet=FLEET,
        target=target,
        now=time.time() if now is None else now,
        ttl_s=ttl,
    )


def test_state_and_telemetry_arrive(
    start_agent: Callable[..., Agent],
    mosquitto: MosquittoBroker,
    collector: Collector,
    artifacts: dict[str, Path],
    eval_x: np.ndarray,
) -> None:
    agent = start_agent(mosquitto.url, initial_artifact=str(artifacts["v1"]), telemetry={"interval_s": 0.5})
    state = collector.wait_for("/state", lambda d: d.get("online") is True)
    assert state["models"]["active"]["version"] == "1.0.0" and state["profile"] == "x86-gateway"
    assert state["slots"]["active"] == "a" and state["health"] == "ok"
    client = ApiClient(agent.api.address)  # type: ignore[union-attr]
    for i in range(10):
        outputs, version = client.infer({"image": eval_x[i : i + 3]})
        assert version == "1.0.0" and outputs["probs"].shape == (3, 10)
    tele = collector.wait_for("/telemetry", lambda d: d.get("requests", 0) >= 10)
    assert tele["model_version"] == "1.0.0" and tele["errors"] == 0
    assert tele["latency_ms"]["p50"] > 0 and tele["latency_ms"]["p99"] >= tele["latency_ms"]["p50"]
    assert tele["resources"]["rss_mb"] > 0 and "image" in tele["drift"]["inputs"]
    installed = collector.wait_for("/event", lambda d: d["type"] == "install.succeeded")
    assert installed["version"] == "1.0.0" and installed["gate"]["passed"]


def test_signed_commands_and_every_rejection(
    online_agent: Agent,
    collector: Collector,
    artifacts: dict[str, Path],
    keys_dir: Path,
    tmp_path: Path,
    eval_x: np.ndarray,
) -> None:
    agent = online_agent
    good = _cmd(keys_dir, "set-telemetry-interval", {"interval_s": 5})
    collector.publish(T.cmd, good)
    done = collector.wait_for("/event", lambda d: d["type"] == "command.done")
    assert done["result"] == {"interval_s": 5.0} and agent.telemetry.interval_s == 5.0
    other = tmp_path / "other"
    generate_keypair(other)
    attacks = {
        "malformed": b"{not json",
        "untrusted-key": _cmd(keys_dir, "status", key=other / "signing.key"),
        "expired": _cmd(keys_dir, "status", now=time.time() - 120, ttl=60),
        "wrong-target": _cmd(keys_dir, "status", target="device/dev-2"),
        "replayed": good,
    }
    for reason, raw in attacks.items():
        collector.publish(T.cmd, raw)
        ev = collector.wait_for("/event", lambda d, r=reason: d["type"] == "command.rejected" and d["reason"] == r)
        assert ev["detail"] or reason == "replayed"
    assert agent.telemetry.interval_s == 5.0
    # a group command reaches the device through its group's topic
    collector.publish(group_cmd_topic(FLEET, "canary"), _cmd(keys_dir, "status", target="group/canary"))
    status = collector.wait_for("/event", lambda d: d["type"] == "command.done" and d["cmd"] == "status")
    assert status["result"]["device"] == DEVICE


def test_install_gate_failure_and_rollback_over_commands(
    online_agent: Agent,
    collector: Collector,
    artifacts: dict[str, Path],
    keys_dir: Path,
    eval_x: np.ndarray,
) -> None:
    agent = online_agent
    client = ApiClient(agent.api.address)  # type: ignore[union-attr]

    def install(name: str) -> dict:
        raw = _cmd(keys_dir, "install-from-file", {"path": str(artifacts[name])})
        nonce = json.loads(__import__("base64").b64decode(json.loads(raw)["payload"]))["nonce"]
        collector.publish(T.cmd, raw)
        return collector.wait_for(
            "/event", lambda d: d.get("nonce") == nonce and d["type"] in ("command.done", "command.failed")
        )

    assert install("v1.1")["type"] == "command.done"
    assert client.infer(eval_x[:1])[1] == "1.1.0"
    for bad, check in (("bad_golden", "golden"), ("corrupt_model", "load"), ("slow", "latency")):
        assert install(bad)["type"] == "command.failed"
        ev = collector.wait_for("/event", lambda d, c=check: d["type"] == "install.rejected" and d["check"] == c)
        assert ev["reason"]
        assert client.infer(eval_x[:1])[1] == "1.1.0"  # the old model kept serving
    assert install("v1")["type"] == "command.failed"  # downgrade
    collector.wait_for("/event", lambda d: d["type"] == "install.rejected" and "not newer" in d["reason"])
    collector.publish(T.cmd, _cmd(keys_dir, "rollback"))
    ev = collector.wait_for("/event", lambda d: d["type"] == "rollback")
    assert ev["version"] == "1.0.0" and ev["automatic"] is False
    assert client.infer(eval_x[:1])[1] == "1.0.0"
    state = collector.wait_for("/state", lambda d: d["slots"]["active"] == "a" and d["slots"]["floor"] == "1.1.0")
    assert state["models"]["active"]["version"] == "1.0.0"


def test_runtime_errors_roll_back_automatically(
    start_agent: Callable[..., Agent],
    mosquitto: MosquittoBroker,
    collector: Collector,
    artifacts: dict[str, Path],
    eval_x: np.ndarray,
) -> None:
    agent = start_agent(mosquitto.url, initial_artifact=str(artifacts["v1"]), health={"min_errors": 3})
    assert agent.install(artifacts["trap"]).passed  # passes its gate, fails on live inputs
    client = ApiClient(agent.api.address)  # type: ignore[union-attr]
    versions = {client.infer(eval_x[:1] * 10)[1] for _ in range(5)}
    assert versions == {"1.0.0"}  # answered by the previous model meanwhile: no failed request
    ev = collector.wait_for("/event", lambda d: d["type"] == "rollback")
    assert ev["automatic"] is True and ev["previous"] == "1.1.4" and "runtime errors" in ev["reason"]
    assert agent.store.state.active == "a" and agent.store.state.previous is None


def test_shadow_then_promote(
    online_agent: Agent,
    collector: Collector,
    artifacts: dict[str, Path],
    keys_dir: Path,
    eval_x: np.ndarray,
) -> None:
    agent = online_agent
    collector.publish(T.cmd, _cmd(keys_dir, "install-from-file", {"path": str(artifacts["v1.1"]), "shadow": True}))
    collector.wait_for("/event", lambda d: d["type"] == "shadow.started")
    client = ApiClient(agent.api.address)  # type: ignore[union-attr]
    for i in range(0, 32, 4):
        assert client.infer(eval_x[i : i + 4])[1] == "1.0.0"  # the shadow never serves
    agent.host.shadow.drain()  # type: ignore[union-attr]
    collector.publish(T.cmd, _cmd(keys_dir, "promote-shadow"))
    ev = collector.wait_for("/event", lambda d: d["type"] == "shadow.promoted")
    assert ev["version"] == "1.1.0" and ev["shadow"]["compared"] == 32 and ev["shadow"]["agreement"] == 1.0
    assert client.infer(eval_x[:1])[1] == "1.1.0"


def test_spool_holds_everything_while_the_broker_is_away(
    start_agent: Callable[..., Agent], tmp_path: Path, artifacts: dict[str, Path], eval_x: np.ndarray
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    broker.start()
    collector = Collector(
        broker.host,
        broker.port,
        [f"edgeops/v1/{FLEET}/device/{DEVICE}/telemetry"],
        client_id="spool-check",
        persistent=True,
    )
    try:
        agent = start_agent(broker.url, initial_artifact=str(artifacts["v1"]), telemetry={"interval_s": 3600})
        agent.telemetry.tick()
        first = collector.wait_for("/telemetry", lambda d: True)
        broker.stop()
        client = ApiClient(agent.api.address)  # type: ignore[union-attr]
        for _ in range(40):  # inference keeps answering; telemetry goes to the spool
            assert client.infer(eval_x[:1])[1] == "1.0.0"
            agent.telemetry.tick()
        assert agent.reporter.spool.pending() >= 40
        broker.start()
        last = first["seq"] + 40
        collector.wait_for("/telemetry", lambda d: d["seq"] >= last, timeout=30)
        seqs = [d["seq"] for d in collector.json("/telemetry")]
        unique = list(dict.fromkeys(seqs))
        assert unique == sorted(unique) and set(range(first["seq"], last + 1)) <= set(unique)
        assert agent.reporter.spool.pending() == 0 or agent.reporter.outbox.flush(10)  # type: ignore[union-attr]
    finally:
        collector.close()
        broker.stop()


def test_broker_gone_at_startup(
    start_agent: Callable[..., Agent], tmp_path: Path, artifacts: dict[str, Path], eval_x: np.ndarray
) -> None:
    broker = MosquittoBroker(tmp_path / "late")  # not started yet
    t0 = time.monotonic()
    agent = start_agent(broker.url, initial_artifact=str(artifacts["v1"]))
    assert time.monotonic() - t0 < 10 and not agent.reporter.connected
    assert ApiClient(agent.api.address).infer(eval_x[:1])[1] == "1.0.0"  # type: ignore[union-attr]
    assert agent.reporter.spool.pending() >= 2  # agent.started + install.succeeded, kept
    broker.start()
    try:
        collector = Collector(broker.host, broker.port, [f"edgeops/v1/{FLEET}/device/{DEVICE}/#"], client_id="late")
        state = collector.wait_for("/state", lambda d: d.get("online") is True, timeout=90)
        assert state["models"]["active"]["version"] == "1.0.0"
        collector.close()
        assert agent.reporter.outbox.flush(30)  # type: ignore[union-attr]
    finally:
        broker.stop()


def test_install_under_load_fails_no_request(
    start_agent: Callable[..., Agent], artifacts: dict[str, Path], eval_x: np.ndarray
) -> None:
    """Clients hammer the API while two installs swap the model: every request is answered."""
    agent = start_agent("mqtt://127.0.0.1:1", initial_artifact=str(artifacts["v1"]))
    stop, failures, versions = threading.Event(), [], []

    def client() -> None:
        api = ApiClient(agent.api.address)  # type: ignore[union-attr]
        while not stop.is_set():
            try:
                versions.append(api.infer(eval_x[:2])[1])
            except Exception as exc:  # any failure is what this test counts
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert agent.install(artifacts["v1.1"]).passed
        assert agent.install(artifacts["v1.2"]).passed
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert versions[0] == "1.0.0" and versions[-1] == "1.2.0" and set(versions) == {"1.0.0", "1.1.0", "1.2.0"}


def test_tampered_active_slot_is_never_run(
    write_config: Callable[..., Path], artifacts: dict[str, Path], eval_x: np.ndarray
) -> None:
    cfg = load_config(write_config(broker={"url": "mqtt://127.0.0.1:1"}))
    agent = Agent(cfg)
    agent.load_slots()
    agent.install(artifacts["v1"])
    agent.install(artifacts["v1.1"])
    agent.stop()
    active = Path(cfg.data_dir) / "slots" / "b.edgeops"
    data = bytearray(active.read_bytes())
    data[-3000] ^= 0xFF
    active.write_bytes(bytes(data))
    agent = Agent(cfg)
    try:
        agent.start()
        assert agent.active_version() == "1.0.0"  # the previous slot, re-verified, serves
        assert ApiClient(agent.api.address).infer(eval_x[:1])[1] == "1.0.0"  # type: ignore[union-attr]
        events = [json.loads(m.payload) for m in agent.reporter.spool.peek(100)]
        corrupt = [e for e in events if e["type"] == "slot.corrupt"]
        assert corrupt and corrupt[0]["slot"] == "b" and "sha256" in corrupt[0]["reason"]
        assert agent.store.state.active == "a"
    finally:
        agent.stop()


def test_spool_bound_drops_oldest_and_reports_it(
    start_agent: Callable[..., Agent], tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    broker = MosquittoBroker(tmp_path / "b")
    agent = start_agent(broker.url, initial_artifact=str(artifacts["v1"]), telemetry={"spool_max_messages": 10})
    for _ in range(30):
        agent.telemetry.tick()
    spool = agent.reporter.spool
    assert spool.pending() <= 11 and spool.dropped >= 20
    broker.start()
    try:
        collector = Collector(broker.host, broker.port, [f"edgeops/v1/{FLEET}/device/{DEVICE}/#"], client_id="b")
        # the newest messages survive and say how many older ones were dropped
        ev = collector.wait_for("/event", lambda d: d["type"] == "spool.dropped" and d["total"] >= 20, timeout=60)
        assert ev["count"] >= 1
        tele = collector.wait_for("/telemetry", lambda d: d["spool"]["dropped"] >= 19)
        assert tele["seq"] > 20  # the oldest went, not the newest
        collector.close()
    finally:
        broker.stop()
