"""Everything the agent says to the fleet: events and telemetry through the durable spool, state retained.

- :meth:`Reporter.event` and :meth:`Reporter.telemetry` write to the SQLite spool first (durable, bounded,
  ordered) and wake the outbox, which publishes them when the broker is reachable. They never block on the
  network and never raise for a storage problem (telemetry must not stop inference): a message the spool
  refuses (a full disk) is held in a bounded RAM buffer (:mod:`device_agent.spool_fallback`) and moved into the
  spool, in order, at the next put that succeeds; what that buffer had to drop is counted and reported as a
  ``spool.dropped`` event (``reason`` ``disk-full`` or ``storage``) once the spool takes writes again. The
  retained state carries ``spool`` (pending, dropped, held, lost, error) and is re-published when the spool
  starts and stops refusing writes, so a full disk shows at once even though no event can be spooled.
- :meth:`Reporter.publish_state` publishes the retained state directly when connected; it is not spooled
  (only the latest state matters) and is re-published on every (re)connect by the link's ``on_connect``.
- The last will marks the device offline when its connection drops; a clean stop publishes an offline state
  and disconnects cleanly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.config import AgentConfig
from device_agent.mqtt_link import BrokerSettings, MqttLink, Will
from device_agent.outbox import Outbox
from device_agent.spool import Spool
from device_agent.spool_fallback import SpoolFallback
from edgeops.errors import EdgeopsError, StorageError, TransportError
from edgeops.protocol import device_topics, group_cmd_topic, parse_broker_url

__all__ = ["Reporter", "broker_settings"]

log = logging.getLogger(__name__)


def broker_settings(cfg: AgentConfig) -> BrokerSettings:
    host, port, tls = parse_broker_url(cfg.broker.url)
    b = cfg.broker
    return BrokerSettings(
        host=host,
        port=port,
        tls=tls,
        username=b.username,
        password=b.password,
        keepalive_s=b.keepalive_s,
        ca_file=b.ca_file,
        cert_file=b.cert_file,
        key_file=b.key_file,
        session_expiry_s=b.session_expiry_s,
    )


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


class Reporter:
    """The agent's voice on MQTT (see the module docstring)."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        state: Callable[[], dict[str, Any]],
        on_command: Callable[[str, bytes], None],
        connect: bool = True,
    ) -> None:
        self.cfg = cfg
        self.topics = device_topics(cfg.fleet, cfg.device_id)
        self._state = state
        self.spool = Spool(Path(cfg.data_dir) / "spool.sqlite", max_messages=cfg.telemetry.spool_max_messages)
        self.fallback = SpoolFallback(self.spool.put_json)
        self.link: MqttLink | None = None
        self.outbox: Outbox | None = None
        if connect:
            offline = _json({"device": cfg.device_id, "online": False, "reason": "connection lost"})
            self.link = MqttLink(
                broker_settings(cfg),
                client_id=f"edgeops-{cfg.fleet}-{cfg.device_id}",
                will=Will(self.topics.state, offline),
                subscriptions=self.command_topics(),
                on_message=on_command,
                on_connect=self._on_connect,
                max_backoff_s=cfg.broker.max_backoff_s,
            )
            self.outbox = Outbox(self.spool, self.link)

    def command_topics(self) -> list[str]:
        return [self.topics.cmd, *(group_cmd_topic(self.cfg.fleet, g) for g in self.cfg.groups)]

    def set_extra_subscriptions(self, topics: list[str]) -> None:
        """Subscribe to ``topics`` (OTA release topics) besides the command topics; replaces the previous set."""
        if self.link is not None:
            self.link.update_subscriptions([*self.command_topics(), *topics])

    def publish_now(self, topic: str, payload: bytes) -> bool:
        """Publish ``payload`` now, not spooled (for messages that are worthless later, e.g. repair requests).

        Returns False when not connected or the client refused it.
        """
        if self.link is None:
            return False
        try:
            self.link.publish(topic, payload, qos=1)
        except TransportError as exc:
            log.info("not published on %s: %s", topic, exc)
            return False
        return True

    def start(self) -> None:
        if self.link is not None and self.outbox is not None:
            self.link.start()
            self.outbox.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self.outbox is not None and self.link is not None:
            if self.link.connected:
                self.outbox.flush(timeout)
            self.outbox.stop(timeout)
            final = _json({"device": self.cfg.device_id, "online": False, "reason": "shutdown", "ts": time.time()})
            self.link.stop(final=(self.topics.state, final), timeout=timeout)
        self.fallback.close()
        self.spool.close()

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected

    def _spool(self, topic: str, doc: dict[str, Any]) -> None:
        failing = self.fallback.error is not None
        stored = self.fallback.put(topic, doc)
        if stored and self.outbox is not None:
            self.outbox.wake()
        if stored == failing:  # the spool started or stopped refusing writes: the fleet sees it in the state
            self.publish_state()
        lost = self.fallback.take_lost() if stored else None
        if lost is not None:
            self.event(
                "spool.dropped",
                count=lost.count,
                reason=lost.reason,
                detail=lost.detail,
                first_ts=lost.first_ts,
                last_ts=lost.last_ts,
            )

    def spool_status(self) -> dict[str, Any]:
        """The spool as telemetry and the state report it: pending, dropped (by the bound), and the RAM fallback's
        held, held_bytes, lost (could not be stored) and error (the spool's, while it refuses writes)."""
        return {"pending": self.spool.pending(), "dropped": self.spool.dropped, **self.fallback.status()}

    def event(self, kind: str, **fields: Any) -> None:
        """Report an event (install, rollback, health, drift, command ...) through the spool."""
        doc = {"type": kind, "device": self.cfg.device_id, "ts": time.time(), **fields}
        log.info("event %s %s", kind, {k: v for k, v in fields.items() if k != "gate"})
        self._spool(self.topics.event, doc)

    def telemetry(self, doc: dict[str, Any]) -> None:
        self._spool(self.topics.telemetry, {"device": self.cfg.device_id, "ts": time.time(), **doc})

    def _on_connect(self) -> None:
        self.publish_state()
        self.report_spool_drops()
        if self.outbox is not None:  # what was spooled while offline goes now, not at the outbox's next idle check
            self.outbox.wake()

    def report_spool_drops(self) -> None:
        """A ``spool.dropped`` event for what the spool bound dropped since the last report. Called on connect and
        by the telemetry tick while connected (offline, each report would take a slot from the telemetry)."""
        if not self.spool.dropped:
            return
        try:
            dropped = self.spool.take_dropped_report()
        except StorageError as exc:
            log.warning("spool drops not reported: %s", exc)
            return
        if dropped:
            self.event("spool.dropped", count=dropped, total=self.spool.dropped, reason="bound")

    def publish_state(self) -> None:
        """Publish the retained state now when connected (called on every connect too)."""
        if self.link is None:
            return
        doc = {"device": self.cfg.device_id, "online": True, "ts": time.time(), **self._state()}
        doc["spool"] = self.spool_status()
        try:
            self.link.publish(self.topics.state, _json(doc), qos=1, retain=True)
        except (TransportError, EdgeopsError) as exc:
            log.info("state not published (%s); it goes out on the next connect", exc)
