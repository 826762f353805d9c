"""The ingest worker against a real mosquitto and a real SQLite store: two workers sharing the subscription, bad
payloads, a flooding device, a store held locked, a worker SIGKILLed with messages unacknowledged, and real agents.

What a user would notice: a telemetry message lost or stored twice, a bad device stopping the ingest, a flood
crowding out the other devices, a locked database losing what was sent meanwhile, a crashed worker losing what it
held, an agent's telemetry or start event not reaching the store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeops.fleet.ingest_worker import IngestWorker
from edgeops.fleet.model import AlertKind, AlertLevel, DeviceRecord
from edgeops.fleet.store import FleetStore, open_store
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_for

FLEET = "ingest"
ROOT = Path(__file__).resolve().parents[3]
FAST = {"rate_per_s": 1e6, "burst": 1e6}  # tests that are not about the rate limit send faster than agents do


def telemetry(device: str, seq: int, **over: Any) -> bytes:
    """A telemetry payload shaped like the agent's (docs/protocol.md), compact and key-sorted as the agent sends."""
    doc: dict[str, Any] = {
        "device": device, "ts": 1795238960.0 + seq, "seq": seq, "model_version": "1.0.0", "interval_s": 1.0,
        "latency_ms": {"count": 40, "p50": 0.41, "p95": 0.63, "p99": 0.97, "max": 2.1},
        "requests": 40, "errors": 0, "fallback_answers": 0,
        "resources": {"cpu_percent": 7.5, "rss_mb": 61.2, "temperature_c": None, "load1": 0.4},
        "drift": {"level": "ok", "inputs": {"image": {"psi": 0.021, "level": "ok", "samples": 2560}},
                  "outputs": {"probs": {"psi": 0.004, "level": "ok", "samples": 400}}},
        "health": "ok", "spool": {"pending": 0, "dropped": 0},
    }
    doc.update(over)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def topic(device: str, leaf: str = "telemetry") -> str:
    return f"edgeops/v1/{FLEET}/device/{device}/{leaf}"


class Publisher:
    """A plain paho MQTT 5 client publishing QoS 1 (what the agents' outboxes do, without their spools)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-publisher", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish every message and wait until the broker acknowledged each (it holds them from then on)."""
        infos = [self.client.publish(t, p, qos=1) for t, p in messages]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mosquitto: MosquittoBroker) -> Iterator[Publisher]:
    pub = Publisher(mosquitto)
    try:
        yield pub
    finally:
        pub.close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[str, FleetStore]]:
    """The store's path, and a store of the test's own to look into it."""
    path = str(tmp_path / "fleet.db")
    store = open_store(path)
    try:
        yield path, store
    finally:
        store.close()


@contextmanager
def running(broker: MosquittoBroker, store_url: str, client_id: str, **kw: Any) -> Iterator[IngestWorker]:
    worker = IngestWorker(broker_url=broker.url, fleet=FLEET, store_url=store_url, client_id=client_id, **kw)
    worker.start()
    try:
        assert worker.wait_connected(30), "the worker did not subscribe"
        yield worker
    finally:
        worker.stop()


def settled(value: Callable[[], Any], quiet_s: float = 0.5, timeout: float = 10.0) -> Any:
    """``value()`` once it has not changed for ``quiet_s`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError("the value did not settle")


def rows_of(store: FleetStore, device: str) -> int:
    return len(store.telemetry_series(device, since=0.0, max_points=100_000))


def test_two_workers_share_the_stream_and_store_every_message_once(
    mosquitto: MosquittoBroker, publisher: Publisher, db: tuple[str, FleetStore]
) -> None:
    path, store = db
    devices = [f"dev-{i:02d}" for i in range(40)]
    messages = [(topic(d), telemetry(d, seq)) for seq in range(1, 51) for d in devices]  # 2,000, interleaved
    with running(mosquitto, path, "ingest-a", **FAST) as a, running(mosquitto, path, "ingest-b", **FAST) as b:
        publisher.send(messages)
        wait_for("2,000 rows", lambda: store.telemetry_count() == 2000)
        assert a.wait_idle(30) and b.wait_idle(30)
        sa, sb = a.stats(), b.stats()
    assert store.telemetry_count() == 2000  # nothing lost, nothing twice (the key is (device, seq))
    assert sa["stored"] > 0 and sb["stored"] > 0  # the broker dealt the stream over both workers
    assert sa["stored"] + sb["stored"] == 2000 and sa["duplicates"] + sb["duplicates"] == 0
    assert sa["acked"] + sb["acked"] == 2000 and sa["pending"] == sb["pending"] == 0
    latest = store.latest_telemetry()
    assert sorted(latest) == devices and {r.seq for r in latest.values()} == {50}
    assert {(r.p95_ms, r.drift_psi_max, r.model_version) for r in latest.values()} == {(0.63, 0.021, "1.0.0")}


def test_bad_payloads_are_counted_by_reason_and_the_ingest_goes_on(
    mosquitto: MosquittoBroker, publisher: Publisher, db: tuple[str, FleetStore]
) -> None:
    path, store = db
    good = [(topic("good"), telemetry("good", seq)) for seq in range(1, 11)]
    bad = [
        (topic("bad"), b"{not json"),
        (topic("bad"), b"[1, 2, 3]"),
        (topic("bad"), telemetry("bad", 1, ts="yesterday")),
        (topic("bad"), telemetry("bad", 2, pad="x" * 70_000)),  # over 64 KiB
        (topic("bad", "event"), json.dumps({"type": "agent.started", "seq": 3, "ts": 1.0,
                                            "pad": "y" * 70_000}).encode()),
        (topic("bad"), telemetry("someone-else", 4)),  # device mismatch
        (topic("bad", "event"), json.dumps({"type": "x", "device": "other", "seq": 5, "ts": 1.0}).encode()),
        (topic(".hidden"), telemetry(".hidden", 1)),  # matches device/+ but is no valid device id
    ]
    more = [(topic("good"), telemetry("good", seq)) for seq in range(11, 21)]
    event = (topic("good", "event"), json.dumps({"type": "agent.started", "device": "good", "seq": 100,
                                                 "ts": 1.0, "version": "0.1.0"}).encode())
    with running(mosquitto, path, "ingest-bad", **FAST) as worker:
        publisher.send(good + bad + more + [event])
        wait_for("every good message", lambda: store.telemetry_count() == 20 and store.recent_events())
        assert worker.wait_idle(30)
        stats = worker.stats()
    assert stats["rejected"] == {"malformed": 3, "oversized": 2, "device-mismatch": 2, "topic": 1}
    assert stats["received"] == 29 and stats["stored"] == 21 and stats["acked"] == 29  # the bad ones dropped too
    assert rows_of(store, "good") == 20 and rows_of(store, "bad") == 0
    assert [e.type for e in store.recent_events("good")] == ["agent.started"]


def test_a_flooding_device_is_rate_limited_and_the_others_are_all_stored(
    mosquitto: MosquittoBroker, publisher: Publisher, db: tuple[str, FleetStore]
) -> None:
    path, store = db
    others = [f"calm-{i}" for i in range(10)]
    now = time.time()  # a device sending too often now: its own clock says 1 ms apart (a spool flush would not)
    flood = [(topic("flood"), telemetry("flood", seq, ts=now + seq * 0.001)) for seq in range(1, 501)]
    calm = [(topic(d), telemetry(d, seq)) for seq in range(1, 6) for d in others]
    with running(mosquitto, path, "ingest-flood", rate_per_s=5.0, burst=20.0) as worker:
        t0 = time.monotonic()
        publisher.send(flood[:250] + calm + flood[250:])
        wait_for("every message taken", lambda: worker.stats()["received"] == 550)
        elapsed = time.monotonic() - t0
        assert worker.wait_idle(30)
        stats = worker.stats()
    stored_flood = rows_of(store, "flood")
    assert all(rows_of(store, d) == 5 for d in others)  # nobody else paid for the flood
    # the burst, then 5 per second of the fleet's clock or of the device's own (0.5 s over the flood)
    assert 20 <= stored_flood <= 20 + 5 * max(elapsed, 0.5) + 1
    assert stats["rate_limited"] == 500 - stored_flood and stats["stored"] == 50 + stored_flood


def test_a_locked_database_is_waited_out_and_nothing_sent_meanwhile_is_lost(
    mosquitto: MosquittoBroker, publisher: Publisher, db: tuple[str, FleetStore], caplog: pytest.LogCaptureFixture
) -> None:
    path, store = db
    devices = [f"dev-{i}" for i in range(10)]
    kw: dict[str, Any] = {**FAST, "store_busy_timeout_s": 0.2, "receive_maximum": 100}
    with caplog.at_level(logging.WARNING, logger="edgeops.fleet.ingest_worker"), \
            running(mosquitto, path, "ingest-lock", **kw) as worker:
        publisher.send([(topic(d), telemetry(d, 1)) for d in devices])
        wait_for("the first rows", lambda: store.telemetry_count() == 10)
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process holding the database: every write times out
        try:
            publisher.send([(topic(d), telemetry(d, seq)) for seq in range(2, 31) for d in devices])  # 290
            wait_for("the worker to meet the lock", lambda: worker.stats()["store_errors"] >= 2)
            time.sleep(2.5)
            during = worker.stats()
            assert store.telemetry_count() == 10 and during["store_ok"] is False
            # the broker holds the rest: no more than receive_maximum unacknowledged (after a reconnect, plus the
            # batch in hand from the lost connection)
            limit = 100 if during["connects"] == 1 else 200
            assert during["pending"] <= limit, (during, mosquitto.log_path.read_text()[-2000:])
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        wait_for("everything sent during the outage", lambda: store.telemetry_count() == 300)
        assert worker.wait_idle(30)
        after = worker.stats()
    assert after["store_ok"] is True and after["stored"] == 300 and after["acked"] == 300
    assert 3 <= during["store_errors"] <= 12  # backoff (0.2 s doubling), not a hot loop
    unavailable = [r for r in caplog.records if "store is unavailable" in r.getMessage()]
    assert len(unavailable) == 1  # logged once per outage
    assert any("store is back" in r.getMessage() for r in caplog.records)


def test_stop_commits_and_acknowledges_what_it_holds_unless_told_not_to(
    mosquitto: MosquittoBroker, publisher: Publisher, db: tuple[str, FleetStore]
) -> None:
    path, store = db
    hold: dict[str, Any] = {**FAST, "batch_interval_s": 60.0, "batch_max": 100_000}  # nothing is written before stop()
    with running(mosquitto, path, "ingest-stop", **hold) as worker:
        publisher.send([(topic("dev"), telemetry("dev", seq)) for seq in range(1, 51)])
        wait_for("50 held", lambda: worker.stats()["received"] == 50)
        assert store.telemetry_count() == 0
    assert store.telemetry_count() == 50 and worker.stats()["acked"] == 50  # stop() flushed, then acknowledged
    with running(mosquitto, path, "ingest-stop", **FAST) as again:
        time.sleep(0.5)
        assert again.stats()["received"] == 0  # acknowledged: the broker has nothing to send again
        worker = IngestWorker(broker_url=mosquitto.url, fleet=FLEET, store_url=path, client_id="ingest-nf", **hold)
        worker.start()
        assert worker.wait_connected(30)
        publisher.send([(topic("dev"), telemetry("dev", seq)) for seq in range(51, 101)])
        wait_for("the second worker's share", lambda: worker.stats()["received"] > 0)
        held = settled(lambda: worker.stats()["received"])
        worker.stop(flush=False)  # a stop without flush: nothing written, nothing acknowledged
        assert worker.stats()["stored"] == 0 and worker.stats()["acked"] == 0
        wait_for("the first worker's share", lambda: store.telemetry_count() == 100 - held)
    with running(mosquitto, path, "ingest-nf", **FAST) as resumed:
        wait_for("the unflushed ones, sent again", lambda: store.telemetry_count() == 100)
        assert resumed.wait_idle(30) and resumed.stats()["stored"] == held


def test_telemetry_opens_and_closes_alerts_with_the_devices_profile_budget(
    mosquitto: MosquittoBroker, publisher: Publisher, db: tuple[str, FleetStore]
) -> None:
    path, store = db
    store.put_device(DeviceRecord("pi-01", online=True, last_seen=1.0, profile="rpi4"))  # budget p95 50 ms
    slow = {"count": 200, "p50": 30.0, "p95": 81.23, "p99": 95.0, "max": 120.0}
    drift = {"level": "alert", "inputs": {"image": {"psi": 0.31, "level": "alert", "samples": 2560}}, "outputs": {}}
    with running(mosquitto, path, "ingest-alerts", **FAST) as worker:
        publisher.send([(topic("pi-01"), telemetry("pi-01", 1, latency_ms=slow, requests=50, errors=6, drift=drift))])
        wait_for("three alerts", lambda: len(store.list_alerts(device_id="pi-01")) == 3)
        opened = {a.kind: (a.level, a.detail, a.version) for a in store.list_alerts(device_id="pi-01")}
        assert opened == {
            AlertKind.LATENCY: (AlertLevel.WARN, "p95 81.2 ms > budget 50 ms", "1.0.0"),
            AlertKind.ERROR_RATE: (AlertLevel.ALERT, "error rate 12.0% over 50 requests", "1.0.0"),
            AlertKind.DRIFT: (AlertLevel.ALERT, "drift alert: image psi 0.31", "1.0.0"),
        }
        assert store.get_device("pi-01").last_seen > 1.0  # type: ignore[union-attr]
        publisher.send([(topic("pi-01"), telemetry("pi-01", 2))])  # healthy again
        wait_for("every alert closed", lambda: store.list_alerts(device_id="pi-01") == [])
        assert worker.wait_idle(30)
    closed = store.list_alerts(open_only=False, device_id="pi-01")
    assert len(closed) == 3 and all(a.closed_at is not None for a in closed)


def test_a_stop_while_the_database_is_locked_gives_up_in_time_and_loses_nothing(
    mosquitto: MosquittoBroker, publisher: Publisher, db: tuple[str, FleetStore]
) -> None:
    path, store = db
    kw: dict[str, Any] = {**FAST, "store_busy_timeout_s": 0.2}
    worker = IngestWorker(broker_url=mosquitto.url, fleet=FLEET, store_url=path, client_id="ingest-giveup", **kw)
    worker.start()
    assert worker.wait_connected(30)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        publisher.send([(topic("dev"), telemetry("dev", seq)) for seq in range(1, 21)])
        wait_for("the worker to meet the lock", lambda: worker.stats()["store_errors"] >= 1)
        t0 = time.monotonic()
        worker.stop(timeout=1.0)  # flush, but not forever: the service's stop must not hang on a dead store
        assert time.monotonic() - t0 < 4.0
        assert worker.stats()["acked"] == 0 and worker.stats()["stored"] == 0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    with running(mosquitto, path, "ingest-giveup", **kw):
        wait_for("the 20 sent again", lambda: store.telemetry_count() == 20)


def test_a_broker_restart_is_ridden_out_and_what_was_pending_is_stored_once(
    tmp_path: Path, db: tuple[str, FleetStore]
) -> None:
    path, store = db
    broker = MosquittoBroker(tmp_path / "persistent-broker", persistence=True)  # sessions survive a restart
    broker.start()
    try:
        hold: dict[str, Any] = {**FAST, "batch_interval_s": 60.0, "batch_max": 100_000}
        with running(broker, path, "ingest-restart", **hold) as worker:
            pub = Publisher(broker)
            pub.send([(topic("dev"), telemetry("dev", seq)) for seq in range(1, 81)])
            pub.close()
            wait_for("80 held", lambda: worker.stats()["received"] == 80)
            broker.restart()  # the connection drops with 80 messages taken and not acknowledged
            wait_for("the worker back", lambda: worker.stats()["connects"] == 2 and worker.wait_connected(0))
            wait_for("the 80 sent again", lambda: worker.stats()["received"] == 160)
            stats = worker.stats()
            assert stats["redelivery_dropped"] == 80 and stats["pending"] == 80  # not held twice
        assert store.telemetry_count() == 80 and worker.stats()["acked"] == 80  # flushed at stop, once
        with running(broker, path, "ingest-restart", **FAST) as again:
            time.sleep(0.5)
            assert again.stats()["received"] == 0  # all acknowledged on the new connection
    finally:
        broker.stop()


_CHILD = """
import json, os, sys, time
from edgeops.fleet.ingest_worker import IngestWorker
from edgeops.fleet.model import AlertKind, AlertLevel, DeviceRecord
url, fleet, store, stats = sys.argv[1:5]
w = IngestWorker(broker_url=url, fleet=fleet, store_url=store, client_id="crash-a", batch_max=100000,
                 batch_interval_s=60.0, rate_per_s=1e6, burst=1e6)
w.start()
while True:
    with open(stats + ".tmp", "w") as f:
        json.dump(w.stats(), f)
    os.replace(stats + ".tmp", stats)
    time.sleep(0.05)
"""


def test_a_worker_killed_with_messages_unacknowledged_gets_them_back_on_restart(
    mosquitto: MosquittoBroker, publisher: Publisher, db: tuple[str, FleetStore], tmp_path: Path
) -> None:
    path, store = db
    stats_file = tmp_path / "child-stats.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, mosquitto.url, FLEET, path, str(stats_file)], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def child_stats() -> dict[str, Any]:
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            try:
                return dict(json.loads(stats_file.read_text()))
            except (OSError, ValueError):
                return {}

        wait_for("the child worker to subscribe", lambda: child_stats().get("connected"), timeout=60)
        first = [(topic(f"dev-{i % 8}"), telemetry(f"dev-{i % 8}", i)) for i in range(200)]
        publisher.send(first)
        wait_for("the child to hold all 200", lambda: child_stats().get("received") == 200)
        assert store.telemetry_count() == 0  # held in its batch: nothing committed, nothing acknowledged
        child.send_signal(signal.SIGKILL)  # a crash: no flush, no DISCONNECT, the kernel closes the socket
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    with running(mosquitto, path, "crash-b", **FAST) as other:
        # mosquitto keeps the dead worker's persistent session in the share group: it queues its turn for it
        second = [(topic(f"dev-{i % 8}"), telemetry(f"dev-{i % 8}", i)) for i in range(200, 400)]
        publisher.send(second)
        wait_for("the live worker's share", lambda: other.stats()["received"] >= 50)
        settled(lambda: other.stats()["received"])
        assert other.wait_idle(30)
        while_dead = store.telemetry_count()
        assert 0 < while_dead < 200 and other.stats()["stored"] == while_dead
        with running(mosquitto, path, "crash-a", **FAST) as back:  # the same client id: the session resumes
            wait_for("all 400", lambda: store.telemetry_count() == 400)
            assert back.wait_idle(30) and other.wait_idle(30)
            resumed = back.stats()
    assert resumed["stored"] == 400 - while_dead  # the 200 it held, and its queued share of the second 200
    assert resumed["duplicates"] == 0
    assert {r.seq for r in store.latest_telemetry().values()} == set(range(392, 400))


def started(store: FleetStore) -> set[str]:
    """The devices whose ``agent.started`` event is stored."""
    return {e.device_id for e in store.events_since(since=0.0, types=["agent.started"])}


def test_real_agents_telemetry_and_start_events_land_in_the_store(
    mosquitto: MosquittoBroker, db: tuple[str, FleetStore], tmp_path: Path, digits_dir: Path, keys_dir: Path
) -> None:
    from device_agent.sim import FleetSim
    from tests.support.artifacts import build_digits

    path, store = db
    artifact = build_digits(digits_dir, tmp_path / "art", keys_dir / "signing.key", "1.0.0",
                            profiles=("x86-gateway",))["x86-gateway"]
    with running(mosquitto, path, "ingest-agents") as worker:  # the default rate limit and alert rules
        sim = FleetSim(tmp_path / "fleet", n=3, fleet=FLEET, profile="x86-gateway", broker_url=mosquitto.url,
                       trusted_keys=[keys_dir / "signing.pub"], initial_artifact=artifact, telemetry_interval_s=1.0)
        ids = [d.device_id for d in sim.devices]
        with sim:
            wait_for("two telemetry rows of every agent", lambda: all(rows_of(store, d) >= 2 for d in ids),
                       timeout=60)
            wait_for("every agent's start event", lambda: started(store) >= set(ids))
        assert worker.wait_idle(30)
        stats = worker.stats()
    latest = store.latest_telemetry(ids)
    assert sorted(latest) == ids
    assert all(r.model_version == "1.0.0" and r.health == "ok" and r.rss_mb for r in latest.values())
    assert stats["rejected"] == {} and stats["rate_limited"] == 0
    assert store.list_alerts(open_only=True) == []  # healthy agents open nothing
