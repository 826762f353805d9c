"""The ingest worker: one paho MQTT 5 client on the shared subscription, telemetry and events → the store.

Several workers (processes or threads, each with its own ``client_id``) subscribe QoS 1 to
``$share/{share_group}/edgeops/v1/{fleet}/device/+/telemetry`` and ``.../event``; the broker hands each message
to one of them. Each message goes through the sans-I/O core (``edgeops.fleet.ingest``: topic, rate limit,
parse) on paho's network thread, then into the pending list; a writer thread turns the pending list into one
``IngestBatch`` (rows, alert decisions of ``edgeops.fleet.alerts``, last-seen) every ``batch_interval_s`` or at
``batch_max`` messages and commits it with ``FleetStore.write_batch``.

Guarantees:

- **Nothing acknowledged is lost.** Messages are acknowledged by hand (paho ``manual_ack``): a PUBACK goes to the
  broker only after the batch holding the message is committed, in the order the messages came. A message
  rejected (malformed, oversized, wrong device) or rate-limited is dropped on purpose: counted, and
  acknowledged with its batch. A message taken on a connection that has since been lost is never acknowledged
  (its packet id may already name another message); the broker sends it again and the store drops the
  duplicate by ``(device, seq)``.
- **Store outages.** A ``StorageError`` keeps the batch; it is retried with exponential backoff from 0.2 s to
  10 s, logged once per outage (and once when the store is back). Meanwhile nothing is acknowledged, so the
  broker stops sending after ``receive_maximum`` unacknowledged messages (the ReceiveMaximum sent on CONNECT,
  which also bounds this worker's memory) and queues the rest in the worker's session.
- **Persistent session.** CONNECT has ``clean_start=False`` and a ``SessionExpiryInterval`` of
  ``session_expiry_s``: a worker that crashes or restarts with the same ``client_id`` within that time gets the
  messages it had not acknowledged again, and those queued for it meanwhile. paho reconnects on its own
  (1 s → 30 s backoff) and subscribes again on every connect. When the broker says the session resumed, the
  messages still pending from the lost connection are dropped (the broker sends them again), so the pending list
  stays within ``receive_maximum`` (plus the batch being written) however often the connection drops.
- **Alerts.** Each telemetry row is judged by the ``AlertRules`` with the device's profile (``get_device``,
  cached for 60 s); the batch carries the opens and closes (a close per (device, kind) at most once a minute,
  see ``alerts.RecentCloses``) and the devices' ``last_seen``.
- ``stop(flush=True)`` stops taking messages, commits and acknowledges what is pending (until ``timeout``),
  then disconnects; ``stop(flush=False)`` disconnects without writing: what was pending comes back with the
  session.

mosquitto 2 and shared subscriptions (measured with mosquitto 2.0.11, tests/edgeops/fleet/
test_fleet_ingest_worker.py): the broker deals the messages of a share group round-robin over *every* session
subscribed in it, connected or not. A worker that is offline with a persistent session stays in the rotation:
its share of new messages is queued in its session (up to the broker's ``max_queued_messages``, 1000 by default;
past it mosquitto drops them) and the messages it held unacknowledged stay in flight to it; neither goes to the
other workers. They are delivered when the worker comes back with the same ``client_id``; if it does not come
back within ``session_expiry_s``, the broker discards them. So run a fixed set of worker ids (as
``edgeops fleet serve`` does), restart a dead one rather than replace it, and size ``max_queued_messages`` for
the longest outage to ride out (queued per worker: rate × outage ÷ workers). The same bound applies to a live
worker whose store is down, past its ``receive_maximum``.

What it does not do: deduplicate (the store does, by key), register devices or read their state (the
controller does), or share a rate limit between workers (with N workers a device may send N × the rate).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeops.errors import StorageError, TelemetryRejected
from edgeops.fleet.alerts import AlertRules, RecentCloses, latency_budgets_from_profiles
from edgeops.fleet.ingest import (
    BatchAssembler,
    IngestCounters,
    RateLimiter,
    classify_topic,
    parse_event,
    parse_telemetry,
)
from edgeops.fleet.model import EventRow, IngestBatch, TelemetryRow
from edgeops.fleet.store import FleetStore, open_store
from edgeops.mqtt_client import new_mqtt_client
from edgeops.protocol import TOPIC_ROOT, parse_broker_url, validate_segment

__all__ = ["IngestWorker"]

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 10.0  # between write attempts while the store is down
PROFILE_TTL_S = 60.0  # a device's profile (for latency budgets) is read again after this
PROFILE_RETRY_S = 5.0  # ... or after this when the device was unknown or the store did not answer
MAX_PROFILES = 100_000  # cached profiles; the cache starts over past it
CLOSE_TTL_S = 60.0  # an alert close sent for a (device, kind) is not sent again within this (RecentCloses)


@dataclass(frozen=True)
class _Taken:
    """One message taken from the broker: its row (None: dropped on purpose) and how to acknowledge it."""

    row: TelemetryRow | EventRow | None
    epoch: int  # the connection it came on
    mid: int
    qos: int


class IngestWorker:
    """Telemetry and events from the shared subscription into the store (see the module docstring)."""

    def __init__(
        self,
        *,
        broker_url: str,
        fleet: str,
        store_url: str,
        client_id: str,
        share_group: str = "edgeops-ingest",
        batch_max: int = 500,
        batch_interval_s: float = 0.2,
        rate_per_s: float = 5.0,
        burst: float = 20.0,
        rules: AlertRules | None = None,
        username: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        session_expiry_s: int = 3600,
        receive_maximum: int = 2000,
        store_busy_timeout_s: float = 5.0,
    ) -> None:
        """Configure (nothing connects before :meth:`start`). ``rules`` None: the default rules with every
        profile's latency budget. Raises ValueError for a bad URL, fleet, share group or limit; TransportError
        when the CA, certificate or key file cannot be loaded; KeyFileError for a client key that group or
        others may read."""
        self._broker = parse_broker_url(broker_url)
        self.fleet = validate_segment(fleet, "fleet")
        validate_segment(share_group, "share group")
        if batch_max < 1 or not (math.isfinite(batch_interval_s) and batch_interval_s > 0):
            raise ValueError("batch_max must be >= 1 and batch_interval_s > 0")
        if not 1 <= receive_maximum <= 65535 or session_expiry_s < 0:
            raise ValueError("receive_maximum must be within 1..65535 and session_expiry_s >= 0")
        self.client_id = client_id
        self.store_url = store_url
        self.filters = [f"$share/{share_group}/{TOPIC_ROOT}/{fleet}/device/+/{leaf}" for leaf in ("telemetry", "event")]
        self._batch_max = batch_max
        self._interval_s = float(batch_interval_s)
        self._limiter = RateLimiter(rate_per_s, burst)
        self._rules = rules
        self._recent_closes = RecentCloses(CLOSE_TTL_S)
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._busy_timeout_s = store_busy_timeout_s
        self.counters = IngestCounters()
        self._store: FleetStore | None = None  # once started
        self._profiles: dict[str, tuple[str | None, float]] = {}  # device → (profile, valid until, monotonic)
        self._cond = threading.Condition()  # guards _pending, _in_flight, _stopping
        self._pending: list[_Taken] = []
        self._in_flight = 0  # messages of the batch the writer holds (written / retried)
        self._stopping = False
        self._flush_on_stop = True
        self._stop_deadline = math.inf
        self._closing = False  # on_message takes no more messages
        self._conn_lock = threading.Lock()  # guards _epoch / _session_up against acks from the writer
        self._epoch = 0
        self._session_up = False
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._store_ok = True
        self._writer: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self._writer_failed = False
        self._client = self._make_client(username, password, ca, cert_file, key_file)

    def _make_client(self, username: str | None, password: str | None, ca: Path | None, cert_file: Path | None,
                     key_file: Path | None) -> mqtt.Client:
        client = new_mqtt_client(self.client_id, tls=self._broker.tls, ca_certs=ca, username=username,
                                 password=password, cert_file=cert_file, key_file=key_file)
        client.manual_ack_set(True)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, start the writer and connect in the background (returns at once).

        Raises StorageError when the store cannot be opened, RuntimeError when started a second time (a stopped
        worker does not start again: make a new one with the same ``client_id`` to resume its session)."""
        if self._started:
            raise RuntimeError("IngestWorker.start() called twice")
        self._started = True
        if self._rules is None:
            self._rules = AlertRules(latency_budgets_ms=latency_budgets_from_profiles())
        self._store = store = open_store(self.store_url, busy_timeout_s=self._busy_timeout_s)
        self._writer = threading.Thread(
            target=self._write_loop, args=(store,), name=f"ingest-writer-{self.client_id}", daemon=True
        )
        self._writer.start()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        props.ReceiveMaximum = self._receive_maximum
        try:
            self._client.connect_async(
                self._broker.host, self._broker.port, keepalive=30, clean_start=False, properties=props
            )
            self._client.loop_start()
        except BaseException:
            self.stop(flush=False)
            raise

    def stop(self, flush: bool = True, *, timeout: float = 10.0) -> None:
        """Stop taking messages; with ``flush``, commit and acknowledge what is pending (for at most ``timeout``
        seconds, then give up: the rest comes back with the session); disconnect; close the store."""
        if self._writer is None or self._stopped:
            return
        self._stopped = True
        self._closing = True
        with self._cond:
            self._stopping = True
            self._flush_on_stop = flush
            self._stop_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._writer.join(timeout + 2 * BACKOFF_MAX_S)
        if self._writer.is_alive():
            log.error("ingest %s: the writer did not stop; pending messages are left unacknowledged", self.client_id)
        self._client.disconnect()
        self._client.loop_stop()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> IngestWorker:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- observation -------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The counters (``IngestCounters.as_dict``) plus ``pending`` (taken, not yet committed), ``connected``
        and ``store_ok`` (False during a store outage)."""
        out = self.counters.as_dict()
        with self._cond:
            out["pending"] = len(self._pending) + self._in_flight
        out["connected"] = self._subscribed.is_set()
        out["store_ok"] = self._store_ok
        out["writer_failed"] = self._writer_failed
        return out

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed (the broker deals messages to this worker); False after timeout."""
        return self._subscribed.wait(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is pending (every message taken is committed and acknowledged, or dropped)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # -- paho callbacks (network thread) -----------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            log.error("ingest %s: the broker refused the connection: %s", self.client_id, reason)
            return
        with self._conn_lock:
            self._epoch += 1
            self._session_up = True
        self.counters.add(connects=1)
        if flags.session_present:
            self._drop_redelivered()
        log.info("ingest %s: connected (session present: %s)", self.client_id, flags.session_present)
        _, self._sub_mid = client.subscribe([(f, SubscribeOptions(qos=1)) for f in self.filters])

    def _drop_redelivered(self) -> None:
        """The session resumed: the broker sends every message it had not had a PUBACK for again, so the ones
        still pending from a lost connection are dropped (the writer's batch in hand is still written). This keeps
        the pending list within ``receive_maximum`` however often the connection drops."""
        with self._cond:
            kept = [t for t in self._pending if t.qos == 0]
            dropped = len(self._pending) - len(kept)
            self._pending = kept
        if dropped:
            self.counters.add(redelivery_dropped=dropped)
            log.info("ingest %s: %d pending messages will come again with the session", self.client_id, dropped)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if mid != self._sub_mid:
            return
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("ingest %s: the broker refused the subscription %s: %s", self.client_id, self.filters, failed)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        with self._conn_lock:
            was, self._session_up = self._session_up, False
        self._subscribed.clear()
        if was and not self._closing:
            log.warning("ingest %s: disconnected (%s); reconnecting", self.client_id, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._closing:
            return  # not acknowledged: the broker sends it again to this session
        self.counters.add(received=1)
        row: TelemetryRow | EventRow | None = None
        try:
            kind, device_id = classify_topic(self.fleet, message.topic)
            wall = time.time()
            parse = parse_telemetry if kind == "telemetry" else parse_event
            row = parse(device_id, message.payload, received_at=wall)
            # after parsing: the limiter reads the device's own clock, so a spool flushed after an outage passes
            if not self._limiter.allow(device_id, time.monotonic(), device_ts=row.ts, wall=wall):
                self.counters.add(rate_limited=1)
                row = None
        except TelemetryRejected as exc:
            self.counters.reject(exc.reason)
            log.debug("ingest %s: %s", self.client_id, exc)
        taken = _Taken(row, self._epoch, message.mid, message.qos)
        with self._cond:
            self._pending.append(taken)
            if len(self._pending) >= self._batch_max:
                self._cond.notify_all()

    # -- writer thread ---------------------------------------------------------------------------------------

    def _write_loop(self, store: FleetStore) -> None:
        try:
            self._write_until_stopped(store)
        except Exception:  # a bug: say so loudly; the messages stay unacknowledged and come back to the session
            self._writer_failed = True
            log.exception("ingest %s: the writer failed; nothing more is stored by this worker", self.client_id)

    def _next_batch(self) -> list[_Taken] | None:
        """Wait for a batch: ``batch_max`` messages, or what came within ``batch_interval_s``; None: stop."""
        with self._cond:
            deadline = time.monotonic() + self._interval_s
            while len(self._pending) < self._batch_max and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping and (not self._flush_on_stop or not self._pending):
                return None
            taken, self._pending = self._pending[: self._batch_max], self._pending[self._batch_max :]
            self._in_flight = len(taken)
            return taken

    def _write_until_stopped(self, store: FleetStore) -> None:
        while True:
            taken = self._next_batch()
            if taken is None:
                return
            if taken:
                batch = self._assemble(taken, store)
                if not self._commit(batch, store):
                    return  # stopping with the store down: left unacknowledged
                self._ack(taken)
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()

    def _assemble(self, taken: Sequence[_Taken], store: FleetStore) -> IngestBatch:
        assembler = BatchAssembler()
        rules = self._rules
        now = time.time()
        for item in taken:
            row = item.row
            if isinstance(row, TelemetryRow):
                if rules is None:
                    assembler.add_telemetry(row)
                else:
                    opens, closes = rules.evaluate(row, profile=self._profile(row.device_id, store), now=now)
                    assembler.add_telemetry(row, opens, self._recent_closes.needed(opens, closes, now))
            elif isinstance(row, EventRow):
                assembler.add_event(row)
        return assembler.build()

    def _profile(self, device_id: str, store: FleetStore) -> str | None:
        now = time.monotonic()
        cached = self._profiles.get(device_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            record = store.get_device(device_id)
        except StorageError:
            profile, ttl = (cached[0] if cached else None), PROFILE_RETRY_S
        else:
            profile = record.profile if record is not None else None
            ttl = PROFILE_TTL_S if record is not None else PROFILE_RETRY_S
        if len(self._profiles) >= MAX_PROFILES:
            self._profiles.clear()
        self._profiles[device_id] = (profile, now + ttl)
        return profile

    def _commit(self, batch: IngestBatch, store: FleetStore) -> bool:
        """Write ``batch``, retrying with backoff while the store is down; False when stopping gave up on it."""
        rows = len(batch.telemetry) + len(batch.events)
        if not rows:
            return True  # only messages dropped on purpose: nothing to write, they are acknowledged
        backoff = BACKOFF_MIN_S
        down_since: float | None = None
        while True:
            try:
                inserted = store.write_batch(batch)
            except StorageError as exc:
                self.counters.add(store_errors=1)
                if down_since is None:
                    down_since = time.monotonic()
                    self._store_ok = False
                    log.error("ingest %s: the store is unavailable, retrying with backoff: %s", self.client_id, exc)
                if not self._wait_to_retry(backoff):
                    log.warning("ingest %s: stopping with %d messages unstored", self.client_id, rows)
                    return False
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if down_since is not None:
                self._store_ok = True
                log.warning("ingest %s: the store is back after %.1f s", self.client_id, time.monotonic() - down_since)
            stored = sum(inserted)
            self.counters.add(batches=1, stored=stored, duplicates=rows - stored)
            return True

    def _wait_to_retry(self, delay: float) -> bool:
        """Sleep ``delay`` seconds (new messages do not cut it short); False: stopping, give the batch up."""
        until = time.monotonic() + delay
        with self._cond:
            while True:
                now = time.monotonic()
                if self._stopping and (not self._flush_on_stop or now >= self._stop_deadline):
                    return False
                end = min(until, self._stop_deadline)
                if now >= end:
                    return True
                self._cond.wait(end - now)

    def _ack(self, taken: Sequence[_Taken]) -> None:
        """PUBACK every committed message taken on the current connection, in order."""
        acked = 0
        with self._conn_lock:
            if not self._session_up:
                return
            for item in taken:
                if item.qos > 0 and item.epoch == self._epoch:
                    self._client.ack(item.mid, item.qos)
                    acked += 1
        self.counters.add(acked=acked)
