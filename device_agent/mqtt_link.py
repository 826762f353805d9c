"""The agent's MQTT 5 session: a thin adapter over paho-mqtt 2.x. Nothing above this module sees paho.

Guarantees:

- **Never blocks start-up.** :meth:`MqttLink.start` returns at once (``connect_async`` + paho's network thread);
  a broker that is down at start-up or goes away later is retried forever with exponential backoff between
  ``min_backoff_s`` and ``max_backoff_s`` (reset after a successful connection).
- **Last will.** The :class:`Will` (retained, e.g. ``{"online": false}`` on the device's state topic) is handed
  to the broker at every connect, so a device that dies or loses its network is reported offline.
  :meth:`MqttLink.stop` publishes its ``final`` message (retained) when connected, then sends a clean
  DISCONNECT, so the broker discards the will: a clean shutdown never looks like a crash.
- **Birth and subscriptions after every (re)connect.** On each CONNACK the link (re)subscribes to its topics
  (QoS 1) and, once the broker's SUBACK is in, calls ``on_connect`` (where the agent publishes its retained birth
  state) and only then reports ``connected``: a command sent after that is never missed.
- **Persistent session** when ``session_expiry_s > 0`` (the agent's default): the broker keeps the device's
  subscriptions and queues its QoS 1 messages (commands, OTA chunks) while it is away, up to the broker's queue
  limit, so an agent restarted mid-download gets what was broadcast meanwhile without asking again. With 0 the
  session starts clean and the broker keeps nothing between connections.
- **Callbacks never raise into paho.** Exceptions from ``on_message`` / ``on_connect`` are logged and dropped,
  so a bad payload cannot stop the network thread.
- **Publish outcome.** :meth:`MqttLink.publish` returns a :class:`PublishHandle`; ``wait`` is True once the
  broker PUBACKed a QoS 1 message (QoS 0: once written to the socket) and False on timeout or as soon as the
  connection it was sent on is lost. paho may re-send a message it holds after a reconnect, so a caller that
  retries can cause a duplicate, never a loss (see :mod:`device_agent.outbox`).

Raises: :class:`edgeops.errors.TransportError` when publishing while not connected or when paho refuses the
message; :class:`edgeops.errors.ConfigError` when the TLS files cannot be loaded or a client certificate is set
without an ``mqtts://`` broker; :class:`edgeops.errors.KeyFileError` when the TLS client key is readable or
writable by group or others (the agent refuses to start). An invalid topic or a payload
over MQTT's limit is a caller's bug and raises ``ValueError`` (from paho).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeops.errors import ConfigError, TransportError
from edgeops.signing import check_private_key_file

__all__ = ["BrokerSettings", "MqttLink", "PublishHandle", "Will"]

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a waiting PublishHandle looks for a lost connection


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line or an error message
    keepalive_s: int = 30  # seconds between PINGREQs; the broker drops us (and sends the will) after 1.5x
    ca_file: Path | None = None  # PEM CA bundle for mqtts; None = the system's CAs
    cert_file: Path | None = None  # client certificate (mutual TLS)
    key_file: Path | None = None
    session_expiry_s: int = 0  # > 0: a persistent session (subscriptions and QoS 1 messages kept while away)


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class PublishHandle:
    """The outcome of one :meth:`MqttLink.publish`."""

    def __init__(self, info: mqtt.MQTTMessageInfo, link: MqttLink, epoch: int) -> None:
        self._info = info
        self._link = link
        self._epoch = epoch  # the connection this message went out on

    def wait(self, timeout: float) -> bool:
        """True once PUBACKed (QoS 1) / sent (QoS 0); False on timeout or when that connection was lost."""
        deadline = time.monotonic() + timeout
        while True:
            if self._info.is_published():
                return True
            if self._link._epoch != self._epoch:  # disconnected since: paho may re-send, the caller retries
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._info.wait_for_publish(min(remaining, _POLL_S))


class MqttLink:
    """One MQTT 5 connection with will, birth callback, resubscription and reconnect with backoff."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        will: Will | None,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes], None],
        on_connect: Callable[[], None] | None = None,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        """Configure the client (nothing is sent before :meth:`start`). Raises ConfigError for bad TLS files."""
        self._settings = settings
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._lock = threading.Lock()
        self._topics: list[str] = list(dict.fromkeys(subscriptions))
        self._connected = threading.Event()  # set once subscribed and on_connect has run
        self._session_up = False  # CONNACK received: publish() works (on_connect publishes the birth here)
        self._epoch = 0  # incremented on every disconnect
        self._connect_sub_mid: int | None = None  # the subscribe sent on CONNACK, until its SUBACK
        self._started = False
        self._stopping = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if settings.username:
            client.username_pw_set(settings.username, settings.password or None)
        if settings.tls:
            _configure_tls(client, settings)
        elif settings.cert_file or settings.key_file:
            raise ConfigError("broker: cert_file/key_file need an mqtts:// URL (TLS); refusing to connect without it")
        # paho types the delays as int but waits on float arithmetic; sub-second delays work and help tests.
        client.reconnect_delay_set(min_backoff_s, max_backoff_s)  # type: ignore[arg-type]
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        self._client = client

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background and return at once. Calling it twice is a RuntimeError."""
        if self._started:
            raise RuntimeError("MqttLink.start() called twice")
        self._started = True
        s = self._settings
        props = None
        if s.session_expiry_s > 0:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry_s
        self._client.connect_async(
            s.host, s.port, keepalive=s.keepalive_s, clean_start=s.session_expiry_s == 0, properties=props
        )
        self._client.loop_start()

    def stop(self, *, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (retained, QoS 1) when connected, disconnect cleanly (no will), stop the thread."""
        if not self._started:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout
        if final is not None and self.connected:
            try:
                handle = self.publish(final[0], final[1], qos=1, retain=True)
                if not handle.wait(max(0.0, deadline - time.monotonic())):
                    log.warning("mqtt: final message on %s not acknowledged before disconnect", final[0])
            except TransportError as exc:
                log.warning("mqtt: could not publish final message on %s: %s", final[0], exc)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self._session_up = False
        self._started = False
        self._stopping = False

    @property
    def connected(self) -> bool:
        """True while connected, subscribed, and after ``on_connect`` ran for this connection."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected (CONNACK, subscriptions sent, ``on_connect`` ran); False after ``timeout`` s."""
        return self._connected.wait(timeout)

    # -- traffic ---------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Send one message. Raises TransportError when not connected or paho refuses it (queue full)."""
        if not self._session_up:
            raise TransportError(f"not connected to {self._settings.host}:{self._settings.port}")
        epoch = self._epoch
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return PublishHandle(info, self, epoch)

    def update_subscriptions(self, topics: Sequence[str]) -> None:
        """Replace the subscribed topic filters: now when connected, and on every later reconnect."""
        new = list(dict.fromkeys(topics))
        with self._lock:
            old, self._topics = self._topics, new
            up = self._session_up
        if not up:  # the next CONNACK subscribes to the new list
            return
        removed = [t for t in old if t not in new]
        added = [t for t in new if t not in old]
        if removed:
            self._client.unsubscribe(removed)
        if added:
            self._client.subscribe([(t, SubscribeOptions(qos=1)) for t in added])

    # -- paho callbacks (network thread; must never raise) ---------------------------------------------------

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("mqtt: %s:%s refused the connection: %s", self._settings.host, self._settings.port, reason)
            return
        with self._lock:
            self._session_up = True  # CONNACK received: publish() works (on_connect publishes the birth here)
            topics = list(self._topics)
        log.info("mqtt: connected to %s:%s", self._settings.host, self._settings.port)
        if not topics:
            self._session_ready()
            return
        try:
            _, mid = client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
        except (ValueError, OSError) as exc:
            log.error("mqtt: subscribing to %s failed: %s", topics, exc)
            self._session_ready()
            return
        self._connect_sub_mid = mid  # `connected` waits for this SUBACK: a command sent after it is not missed

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if mid == self._connect_sub_mid:
            self._connect_sub_mid = None
            self._session_ready()

    def _session_ready(self) -> None:
        if self._on_connect_cb is not None:  # before `connected`: the birth state goes out before any backlog
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("mqtt: on_connect callback failed")
        self._connected.set()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        was = self._session_up
        self._session_up = False
        self._connected.clear()
        self._epoch += 1
        if was and not self._stopping:
            log.warning("mqtt: disconnected from %s:%s (%s)", self._settings.host, self._settings.port, reason)

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._on_message_cb(message.topic, bytes(message.payload))
        except Exception:
            log.exception("mqtt: on_message failed for a message on %s", message.topic)

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            log.error("mqtt: the broker refused message %d: %s (dropped)", mid, reason)


def _configure_tls(client: mqtt.Client, settings: BrokerSettings) -> None:
    """Raises ConfigError for unloadable TLS files, KeyFileError for a client key that group or others may read."""
    if settings.key_file is not None and settings.cert_file is None:
        raise ConfigError("broker: key_file is set without cert_file")
    if settings.cert_file is not None:
        check_private_key_file(settings.key_file or settings.cert_file)
    try:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"broker TLS: cannot load CA/certificate/key files: {exc}") from exc
