"""A paho MQTT 5 subscriber for tests: collects messages and waits for the ones a test expects.

With ``persistent=True`` it keeps its session (clean_start=False, one-hour expiry), so that with a broker that
persists sessions, nothing published while it was reconnecting is missed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Collector:
    def __init__(self, host: str, port: int, topics: list[str], *, client_id: str = "collector",
                 persistent: bool = False, tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls``: (CA certificate, client certificate, client key) for a mutual-TLS broker."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._topics = topics
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls is not None:
            self.client.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a, **k: self._subscribed.set()
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect(host, port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("collector could not subscribe")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def json(self, suffix: str) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix) and p]

    def wait_for(self, suffix: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, p, _ in self.messages:
                    if t.endswith(suffix) and p:
                        doc = json.loads(p)
                        if pred(doc):
                            return doc
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix) and p][-5:]
                    raise AssertionError(f"no {suffix} message matched within {timeout}s; last: {seen}")
                self._cond.wait(left)

    def messages_on(self, topic: str, timeout: float = 15.0) -> list[bytes]:
        """The payloads received on exactly ``topic``, waiting up to ``timeout`` s for at least one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [p for t, p, _ in self.messages if t == topic]
                left = deadline - time.monotonic()
                if found or left <= 0:
                    if not found:
                        raise AssertionError(f"nothing on {topic} within {timeout}s")
                    return found
                self._cond.wait(left)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
