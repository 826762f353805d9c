"""The agent's telemetry path through a real mosquitto: spool → outbox → MqttLink → broker → a paho subscriber.

What a fleet operator would notice: telemetry arriving out of order or missing after a broker restart, a crashed
device still shown online, a cleanly stopped one shown as crashed, a device that never re-announces itself after
a broker restart, or an agent that hangs at boot because the broker is down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.mqtt_link import BrokerSettings, MqttLink, Will
from device_agent.outbox import Outbox
from device_agent.spool import Spool
from tests.support.mosquitto import MosquittoBroker

BASE = "edgeops/v1/acme/device/pi-01"
TELEMETRY, STATE, CMD = f"{BASE}/telemetry", f"{BASE}/state", f"{BASE}/cmd"
ONLINE, OFFLINE, WILL = b'{"online":true}', b'{"online":false}', b'{"online":false,"lost":true}'


class Observer:
    """A plain paho subscriber, as the fleet side would be; records (topic, payload, retain) in arrival order."""

    def __init__(self, broker: MosquittoBroker, topics: list[str], *, session_id: str | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = topics
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=session_id or f"obs-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in self._topics])
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        props = None
        if session_id:  # a persistent session: the broker queues what arrives while we are away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
        self._client.connect_async(broker.host, broker.port, clean_start=session_id is None, properties=props)
        self._client.loop_start()
        assert self._subscribed.wait(10), "observer could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def payloads(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p, _ in self.messages if t == topic]

    def round_trip(self, topic: str) -> None:
        """Publish a marker and wait for it: everything the broker handled before has reached us."""
        marker = uuid.uuid4().bytes
        self._client.publish(topic, marker, qos=1)
        assert self.wait_for(lambda ms: any(p == marker for _, p, _ in ms)), "marker did not come back"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def make_link(broker: MosquittoBroker, **kw: object) -> MqttLink:
    args: dict[str, object] = {
        "client_id": f"dev-{uuid.uuid4().hex[:8]}",
        "will": None,
        "subscriptions": [],
        "on_message": lambda topic, payload: None,
        "min_backoff_s": 0.05,
        "max_backoff_s": 0.3,
    }
    args.update(kw)
    return MqttLink(BrokerSettings(host=broker.host, port=broker.port, keepalive_s=5), **args)  # type: ignore[arg-type]


@pytest.fixture
def observers() -> Iterator[list[Observer]]:
    made: list[Observer] = []
    yield made
    for o in made:
        o.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def seqs_of(payloads: list[bytes]) -> list[int]:
    return [int(json.loads(p)["seq"]) for p in payloads]


def first_occurrences(seqs: list[int]) -> list[int]:
    return list(dict.fromkeys(seqs))  # dict keeps the first insertion order


def test_messages_put_while_connected_arrive_in_order(
    mosquitto: MosquittoBroker, tmp_path: Path, observers: list[Observer]
) -> None:
    obs = Observer(mosquitto, [TELEMETRY])
    observers.append(obs)
    spool = Spool(tmp_path / "spool.sqlite", max_messages=1000)
    link = make_link(mosquitto)
    outbox = Outbox(spool, link, batch=8)
    link.start()
    outbox.start()
    try:
        assert link.wait_connected(10)
        sent = [spool.put_json(TELEMETRY, {"i": i}) for i in range(30)]
        outbox.wake()
        assert outbox.flush(10) and spool.pending() == 0
        assert obs.wait_for(lambda ms: len(ms) >= 30)
        assert seqs_of(obs.payloads(TELEMETRY)) == sent
        assert [json.loads(p)["i"] for p in obs.payloads(TELEMETRY)] == list(range(30))
    finally:
        outbox.stop()
        link.stop()
        spool.close()


def test_broker_restart_spools_and_then_delivers_everything_in_order(tmp_path: Path, observers: list[Observer]) -> None:
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)  # the observer's session survives the restart
    broker.start()
    spool = Spool(tmp_path / "spool.sqlite", max_messages=1000)
    link = make_link(broker)
    outbox = Outbox(spool, link, batch=16, ack_timeout_s=3.0)
    try:
        obs = Observer(broker, [TELEMETRY], session_id="fleet-ingest")
        observers.append(obs)
        link.start()
        outbox.start()
        assert link.wait_connected(10)
        before = [spool.put_json(TELEMETRY, {"phase": "before"}) for _ in range(5)]
        outbox.wake()
        assert outbox.flush(10)

        broker.stop()
        wait_until(lambda: not link.connected)
        during = [spool.put_json(TELEMETRY, {"phase": "down", "i": i}) for i in range(200)]
        outbox.wake()
        assert spool.pending() == 200  # spooled on disk, not lost, while the broker is away

        broker.start()  # same port
        assert link.wait_connected(10)
        assert outbox.flush(15), f"{spool.pending()} messages still spooled"
        want = set(before + during)
        assert obs.wait_for(lambda ms: want <= set(seqs_of([p for t, p, _ in ms if t == TELEMETRY])), 15)
        got = seqs_of(obs.payloads(TELEMETRY))
        assert first_occurrences(got) == sorted(want)  # nothing lost, first deliveries in spool order
    finally:
        outbox.stop()
        link.stop()
        spool.close()
        broker.stop()


def test_will_on_crash_and_final_state_on_clean_stop(
    mosquitto: MosquittoBroker, observers: list[Observer], tmp_path: Path
) -> None:
    obs = Observer(mosquitto, [STATE, f"{BASE}/marker"])
    observers.append(obs)
    code = (
        "import sys, time\n"
        "from device_agent.mqtt_link import BrokerSettings, MqttLink, Will\n"
        f"link = MqttLink(BrokerSettings('127.0.0.1', {mosquitto.port}), client_id='crashy',\n"
        f"    will=Will({STATE!r}, {WILL!r}), subscriptions=[{CMD!r}], on_message=lambda t, p: None)\n"
        "link.start()\n"
        "print(link.wait_connected(10), flush=True)\n"
        f"link.publish({STATE!r}, {ONLINE!r}, retain=True).wait(5)\n"
        "print('online', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "True"
        assert proc.stdout.readline().strip() == "online"
        assert obs.wait_for(lambda ms: (STATE, ONLINE, False) in ms)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert obs.wait_for(lambda ms: any(p == WILL for t, p, _ in ms if t == STATE)), "no will after a crash"

    link = make_link(mosquitto, will=Will(STATE, WILL), on_connect=None)
    link.start()
    assert link.wait_connected(10)
    link.publish(STATE, ONLINE, retain=True).wait(5)
    assert obs.wait_for(lambda ms: [p for t, p, _ in ms if t == STATE][-1:] == [ONLINE])
    link.stop(final=(STATE, OFFLINE))
    assert not link.connected
    assert obs.wait_for(lambda ms: [p for t, p, _ in ms if t == STATE][-1:] == [OFFLINE])
    obs.round_trip(f"{BASE}/marker")  # the broker has handled the disconnect by now
    assert obs.payloads(STATE)[-1] == OFFLINE and obs.payloads(STATE).count(WILL) == 1  # only the crash's


def test_birth_is_republished_after_a_broker_restart(mosquitto: MosquittoBroker, observers: list[Observer]) -> None:
    births: list[int] = []
    link: MqttLink

    def on_connect() -> None:
        births.append(len(births) + 1)
        link.publish(STATE, b'{"online":true,"birth":%d}' % len(births), retain=True)

    link = make_link(mosquitto, on_connect=on_connect, will=Will(STATE, WILL))
    link.start()
    try:
        assert link.wait_connected(10) and births == [1]
        mosquitto.restart()  # persistence is off: the broker forgets the retained state
        wait_until(lambda: len(births) >= 2)
        assert births == [1, 2] and link.wait_connected(10)
        late = Observer(mosquitto, [STATE])  # subscribes after the birth: must get it retained
        observers.append(late)
        assert late.wait_for(lambda ms: len(ms) >= 1)
        assert late.messages[0] == (STATE, b'{"online":true,"birth":2}', True)
    finally:
        link.stop()


def test_start_with_broker_down_returns_at_once_and_connects_later(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "broker")  # port chosen, nothing listening yet
    received: list[tuple[str, bytes]] = []
    link = make_link(broker, subscriptions=[CMD], on_message=lambda t, p: received.append((t, p)))
    t0 = time.monotonic()
    link.start()
    assert time.monotonic() - t0 < 0.5
    try:
        assert not link.wait_connected(0.3)
        broker.start()
        assert link.wait_connected(10)
        obs_client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        obs_client.connect(broker.host, broker.port)
        obs_client.loop_start()
        obs_client.publish(CMD, b"hello", qos=1).wait_for_publish(5)
        obs_client.disconnect()
        obs_client.loop_stop()
        wait_until(lambda: bool(received))
        assert received == [(CMD, b"hello")]  # subscribed once it connected
    finally:
        link.stop()
        broker.stop()


def test_incoming_messages_survive_a_failing_handler_and_subscriptions_change(
    mosquitto: MosquittoBroker, observers: list[Observer]
) -> None:
    got: list[bytes] = []
    other = f"{BASE}/ota"

    def handler(topic: str, payload: bytes) -> None:
        got.append(payload)
        if payload == b"boom":
            raise ValueError("a bad command")

    link = make_link(mosquitto, subscriptions=[CMD], on_message=handler)
    link.start()
    sender = Observer(mosquitto, [f"{BASE}/marker"])
    observers.append(sender)
    try:
        assert link.wait_connected(10)
        for payload in (b"boom", b"after"):
            sender._client.publish(CMD, payload, qos=1).wait_for_publish(5)
        wait_until(lambda: len(got) >= 2)
        assert got == [b"boom", b"after"] and link.connected
        link.update_subscriptions([other])
        # retained, so it reaches the link whether its SUBSCRIBE lands before or after this publish
        sender._client.publish(other, b"ota", qos=1, retain=True).wait_for_publish(5)
        wait_until(lambda: b"ota" in got)
        # the UNSUBSCRIBE went before that SUBSCRIBE: from now on CMD is not delivered; "ota2" closes the window
        sender._client.publish(CMD, b"ignored", qos=1).wait_for_publish(5)
        sender._client.publish(other, b"ota2", qos=1).wait_for_publish(5)
        wait_until(lambda: b"ota2" in got)
        assert got == [b"boom", b"after", b"ota", b"ota2"]
    finally:
        link.stop()


def test_broker_stopped_mid_stream_loses_nothing(tmp_path: Path, observers: list[Observer]) -> None:
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    broker.start()
    spool = Spool(tmp_path / "spool.sqlite", max_messages=10_000)
    link = make_link(broker)
    outbox = Outbox(spool, link, batch=16, ack_timeout_s=3.0)
    sent: list[int] = []
    try:
        obs = Observer(broker, [TELEMETRY], session_id="fleet-ingest")
        observers.append(obs)
        link.start()
        outbox.start()
        assert link.wait_connected(10)

        def writer() -> None:
            for i in range(400):
                sent.append(spool.put_json(TELEMETRY, {"i": i}))
                outbox.wake()
                time.sleep(0.001)

        t = threading.Thread(target=writer)
        t.start()
        wait_until(lambda: len(sent) >= 100)
        broker.stop()  # while the outbox has messages in flight
        broker.start()
        t.join()
        assert outbox.flush(15), f"{spool.pending()} messages still spooled"
        assert obs.wait_for(lambda ms: set(sent) <= set(seqs_of([p for t, p, _ in ms if t == TELEMETRY])), 15)
        assert first_occurrences(seqs_of(obs.payloads(TELEMETRY))) == sent
    finally:
        outbox.stop()
        link.stop()
        spool.close()
        broker.stop()
