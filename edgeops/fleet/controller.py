"""The rollout controller: keeps the device registry from the retained state topics and drives every active
rollout by ticking the planner and sending its commands, signed with the fleet key.

One paho client (MQTT 5) subscribes to ``edgeops/v1/{fleet}/device/+/state`` (not shared: every controller must
see every retained state and last will). Its network thread only queues the raw messages; the tick thread parses
them (:mod:`edgeops.fleet.registry`), writes the store, then for each active rollout reads what the store holds
(executions, the group's members, outcome events since the rollout began, alerts), asks
:func:`~edgeops.fleet.rollout_planner.plan_rollout`, publishes the commands and saves the decision.

Guarantees:

- **Restartable at any point.** Decisions are saved only after their commands were acknowledged by the broker
  (PUBACK); killed in between, the next controller sends them again, which is harmless (an agent resumes a release
  it is already fetching, and a device already on the version counts as succeeded). Outcomes come from events the
  ingest stored, so nothing the controller had not acted on is lost with it.
- **No broker, no decisions.** While disconnected a tick still records states already received but saves no
  decision that sends; everything resumes on reconnection.
- **One bad message never stops it.** A malformed state is counted by reason and dropped; a store outage is
  logged, and the tick is tried again at the next interval.

Alerts (opened by the ingest workers, offline ones by this controller) are announced on
``edgeops/v1/{fleet}/alerts`` as ``alert.opened`` / ``alert.closed`` (at least once).

It does not ingest telemetry or events (the ingest workers do) and does not serve releases (the release server
does); :class:`edgeops.fleet.service.FleetService` puts the three together.
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.reasoncodes import ReasonCode

from edgeops.errors import StorageError, TelemetryRejected, TransportError
from edgeops.fleet.model import Alert, AlertKind, AlertLevel, Execution, Rollout, RolloutKind
from edgeops.fleet.registry import parse_state
from edgeops.fleet.rollout_planner import Decision, plan_rollout
from edgeops.fleet.store import FleetStore, open_store
from edgeops.fleet.views import alert_view
from edgeops.mqtt_client import new_mqtt_client
from edgeops.protocol import (
    TOPIC_ROOT,
    BrokerAddress,
    CommandName,
    alert_topic,
    device_target,
    device_topics,
    sign_command,
)

__all__ = ["OUTCOME_EVENTS", "FleetController"]

log = logging.getLogger(__name__)

OUTCOME_EVENTS = (
    "install.succeeded", "install.rejected", "ota.rejected", "ota.failed", "ota.completed",
    "command.rejected", "command.failed", "rollback",
)
_RECONNECT_DELAY_S = (1, 10)  # seconds, paho takes whole seconds
_PUBACK_TIMEOUT_S = 10.0
_LATE_GRACE_S = 60.0  # seconds past a finished rollout's timeout during which it is still ticked
_MAX_QUEUED_STATES = 100_000  # state messages waiting for the tick thread; past it the oldest are dropped


class FleetController:
    """Registry + rollouts of one fleet; ``start()``, then ``stop()`` (or use ``tick()`` directly in tests)."""

    def __init__(
        self,
        *,
        broker: BrokerAddress,
        fleet: str,
        store_url: str,
        command_key: Ed25519PrivateKey,
        client_id: str = "",
        tick_s: float = 0.5,
        offline_after_s: float = 0.0,
        command_ttl_s: float = 300.0,
        username: str | None = None,
        password: str | None = None,
        ca_certs: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        """``offline_after_s`` > 0 marks a device offline (with an alert) when nothing was heard from it for that
        long, beyond its last will. Raises ValueError for a bad fleet name."""
        device_topics(fleet, "x")  # validates the fleet name
        self.broker, self.fleet, self.store_url = broker, fleet, store_url
        self.client_id = client_id or f"edgeops-controller-{secrets.token_hex(4)}"
        self.tick_s, self.offline_after_s, self.command_ttl_s = tick_s, offline_after_s, command_ttl_s
        self._key = command_key
        self._auth = (username, password, ca_certs)
        self._client_cert = (cert_file, key_file)  # mutual TLS
        self._states: collections.deque[tuple[str, bytes, float]] = collections.deque(maxlen=_MAX_QUEUED_STATES)
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._connect_error = ""
        self._client: mqtt.Client | None = None
        self._store: FleetStore | None = None
        self._thread: threading.Thread | None = None
        self._open_alerts: dict[int, Alert] | None = None  # alerts known open, by id (None: not read yet)
        self.counters: Counter[str] = Counter()

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Open the store, connect, subscribe, start ticking. Raises StorageError (store), TransportError (broker
        unreachable or refusing within ``timeout``)."""
        if self._client is not None:
            raise RuntimeError("the controller was already started")
        self._store = open_store(self.store_url)
        client = self._new_client()
        self._client = client
        try:
            client.connect_async(self.broker.host, self.broker.port, keepalive=30)
            client.loop_start()
            if not self._connected.wait(timeout):
                raise TransportError(self._connect_error or f"no CONNACK from {self.broker.host}:{self.broker.port}")
        except (OSError, TransportError):
            self.stop()
            raise
        self._thread = threading.Thread(target=self._run, name="fleet-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def stats(self) -> dict[str, Any]:
        return {"connected": self._connected.is_set(), **dict(self.counters)}

    # --- paho (network thread): queue only ------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        username, password, ca_certs = self._auth
        client = new_mqtt_client(self.client_id, tls=self.broker.tls, ca_certs=ca_certs, username=username,
                                 password=password, cert_file=self._client_cert[0], key_file=self._client_cert[1])
        client.max_inflight_messages_set(1000)
        client.reconnect_delay_set(*_RECONNECT_DELAY_S)
        client.on_connect, client.on_disconnect, client.on_message = self._on_connect, self._on_disconnect, self._on_msg
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            self._connect_error = f"the broker refused the connection: {rc}"
            return
        client.subscribe(f"{TOPIC_ROOT}/{self.fleet}/device/+/state", qos=1)
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("controller lost the broker (%s); reconnecting", rc)

    def _on_msg(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) == 6 and parts[5] == "state":
            self._states.append((parts[4], bytes(message.payload), time.time()))

    # --- the tick thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick(time.time())
            except StorageError as exc:
                self.counters["store_errors"] += 1
                log.warning("controller: store unavailable, retrying next tick: %s", exc)

    def tick(self, now: float) -> list[str]:
        """One pass: record queued states, mark silent devices offline, advance every active rollout. Returns the
        planner's notes. Raises StorageError when the store is down."""
        store = self._require_store()
        self._record_states(store)
        if self.offline_after_s > 0:
            for device_id in store.mark_silent_offline(before=now - self.offline_after_s, at=now):
                store.open_alert(Alert(device_id, AlertKind.OFFLINE, AlertLevel.WARN, now, "silent"))
        self._publish_alerts(store, now)
        notes: list[str] = []
        for rollout in store.list_rollouts():
            # finished rollouts still record late outcomes and timeouts (and send back a failed phase's late
            # successes) until their last command can no longer be answered
            if rollout.status.active or now - rollout.updated_at <= rollout.spec.timeout_s + _LATE_GRACE_S:
                notes += self._advance(store, rollout, now)
        return notes

    def _publish_alerts(self, store: FleetStore, now: float) -> None:
        """Publish ``alert.opened`` for every alert that opened since the last tick and ``alert.closed`` for every
        one that closed, on the fleet's alert topic. At least once: a restarted controller announces the alerts
        open at that moment again. Nothing is published (nor forgotten) while the broker is away."""
        client = self._client
        if client is None or not self._connected.is_set():
            return
        now_open = {a.alert_id: a for a in store.list_alerts(open_only=True) if a.alert_id is not None}
        known = self._open_alerts or {}
        changes = [("alert.opened", a) for i, a in now_open.items() if i not in known]
        changes += [("alert.closed", replace(a, closed_at=now)) for i, a in known.items() if i not in now_open]
        topic = alert_topic(self.fleet)
        for kind, alert in changes:
            client.publish(topic, json.dumps({"type": kind, "ts": now, **alert_view(alert)}), qos=1)
        self.counters["alerts_published"] += len(changes)
        self._open_alerts = now_open

    def _require_store(self) -> FleetStore:
        if self._store is None:
            raise RuntimeError("the controller is not started")
        return self._store

    def _record_states(self, store: FleetStore) -> None:
        while self._states:
            device_id, payload, received_at = self._states.popleft()
            try:
                update = parse_state(device_id, payload, received_at=received_at)
            except TelemetryRejected as exc:
                self.counters[f"state_rejected_{exc.reason}"] += 1
                continue
            if update is None:
                continue
            self.counters["states"] += 1
            if update.record is not None:
                store.put_device(update.record)
                store.close_alert(device_id, AlertKind.OFFLINE, at=received_at)
            else:
                store.set_offline(device_id, at=received_at, reason=update.offline_reason)
                store.open_alert(Alert(device_id, AlertKind.OFFLINE, AlertLevel.WARN, received_at,
                                       f"offline: {update.offline_reason}"))

    def _advance(self, store: FleetStore, rollout: Rollout, now: float) -> list[str]:
        devices = store.list_devices(group=rollout.group)
        ids = [d.device_id for d in devices]
        executions = store.list_executions(rollout.rollout_id)
        ids = sorted(set(ids) | {e.device_id for e in executions})
        events = store.events_since(since=rollout.created_at, device_ids=ids, types=OUTCOME_EVENTS)
        member = set(ids)
        alerts = [a for a in store.list_alerts(open_only=False, since=rollout.created_at) if a.device_id in member]
        decision = plan_rollout(rollout, devices=devices, executions=executions, events=events, alerts=alerts,
                                now=now)
        if not decision.changed:
            return []
        try:
            nonces = self._send(decision, now)
        except TransportError as exc:
            self.counters["send_failures"] += 1
            log.warning("rollout %s: commands not sent (%s); trying again next tick", rollout.rollout_id, exc)
            return []
        saved = store.save_rollout(decision.rollout, [self._with_nonce(e, nonces) for e in decision.executions],
                                   expect_updated_at=rollout.updated_at)
        if not saved:  # the operator paused/aborted it meanwhile: decide again next tick from what is stored
            self.counters["decisions_superseded"] += 1
            return []
        for note in decision.notes:
            log.info("rollout %s: %s", rollout.rollout_id, note)
        return list(decision.notes)

    @staticmethod
    def _with_nonce(execution: Execution, nonces: dict[str, str]) -> Execution:
        nonce = nonces.get(execution.device_id)
        return replace(execution, nonce=nonce) if nonce else execution

    def _send(self, decision: Decision, now: float) -> dict[str, str]:
        """Publish the decision's commands and wait for every PUBACK; returns device id → nonce. Raises
        TransportError when not connected or the broker does not acknowledge them all."""
        rollout = decision.rollout
        jobs: list[tuple[str, CommandName, dict[str, Any]]] = []
        main = CommandName.OTA_UPDATE if rollout.kind is RolloutKind.UPDATE else CommandName.ROLLBACK
        args: dict[str, Any] = {"release_id": rollout.release_id} if main is CommandName.OTA_UPDATE else {}
        jobs += [(d, main, args) for d in decision.send]
        jobs += [(d, CommandName.ROLLBACK, {}) for d in decision.send_back]
        if not jobs:
            return {}
        client = self._client
        if client is None or not self._connected.is_set():
            raise TransportError("not connected to the broker")
        nonces: dict[str, str] = {}
        infos = []
        for device_id, name, cmd_args in jobs:
            nonce = secrets.token_hex(16)
            raw = sign_command(self._key, name=name, args=cmd_args, fleet=self.fleet, target=device_target(device_id),
                               now=now, ttl_s=self.command_ttl_s, nonce=nonce)
            infos.append(client.publish(device_topics(self.fleet, device_id).cmd, raw, qos=1))
            nonces[device_id] = nonce
        self._await(infos)
        self.counters["commands_sent"] += len(jobs)
        return nonces

    @staticmethod
    def _await(infos: Sequence[mqtt.MQTTMessageInfo]) -> None:
        deadline = time.monotonic() + _PUBACK_TIMEOUT_S
        for info in infos:
            try:
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"a command could not be published: {exc}") from exc
            if not info.is_published():
                raise TransportError("the broker did not acknowledge every command in time")
