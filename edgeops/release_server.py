"""Serve releases over MQTT: retained signed metadata, and broadcast chunks driven by devices' repair requests.

The server is a thin adapter around :class:`edgeops.repair_planner.RepairPlanner` (one per payload) and paho-mqtt
2 (MQTT 5, QoS 1). It publishes each release's signed metadata retained on ``release_topics(...).manifest``
(again after every reconnect), subscribes to every device's repair topic (``ota_request_filter(fleet)``), feeds
each valid request to its payload's planner and, on a sender thread, publishes the chunks the planners choose on
the release's chunk topic, round-robin across payloads.

Guarantees:

* a chunk many devices want goes out once per pass (see the planner), so the cost does not grow with the fleet;
* memory is bounded: payload bytes are read from their files by offset, one chunk at a time, and at most
  ``max_inflight`` publishes (fewer when the broker's MQTT 5 Receive Maximum is lower) are unacknowledged (held
  by paho) at any moment;
* a chunk is published only when the bytes read from the file match the signed chunk hash; a store that
  changed under the server is logged and counted (``store_errors``), never sent;
* a bad repair request (oversized, malformed, a bitmap whose chunk count does not match the payload, an unknown
  release or payload) is counted per reason in ``stats()["rejected"]``, logged once per device and reason, and
  never stops the server.

It does not decide who may fetch what (the broker's ACLs do) and does not retry on its own: a device that misses
a chunk asks again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edgeops.errors import ReleaseRejected, TransportError
from edgeops.mqtt_client import new_mqtt_client
from edgeops.protocol import BrokerAddress, ota_request_filter, release_topics, validate_segment
from edgeops.release import OtaReason, Payload, RepairRequest, encode_chunk, parse_repair
from edgeops.release_builder import PublishedRelease
from edgeops.repair_planner import RepairPlanner

__all__ = ["ReleaseServer"]

log = logging.getLogger(__name__)

MAX_LOGGED_REJECTIONS = 10_000  # (device, reason) pairs remembered for log-once; counting goes on past it
DEFAULT_GATHER_S = 0.1  # a pass starts after this long without a new request, so devices told together share it
MAX_GATHER_S = 2.0  # ... but never later than this after the first request
_RECONNECT_DELAY_S = (1, 10)  # paho's reconnect back-off, min and max seconds


@dataclass
class _Stream:
    """One payload being served: its file, planner and counters (guarded by the server's lock)."""

    release_id: str
    topic: str  # the release's chunk topic
    payload: Payload
    chunk_size: int
    file: BinaryIO
    planner: RepairPlanner
    ready_at: float = 0.0  # time.monotonic() before which the pass just started must not publish (gathering)
    gather_started: float = 0.0  # when the request that started the gathering arrived
    bytes_published: int = 0
    store_errors: int = 0


@dataclass(frozen=True)
class _Job:
    """One publish the sender owes: a release's retained metadata, or chunk ``index`` of ``stream``."""

    topic: str
    retain: bool
    metadata: bytes = b""
    stream: _Stream | None = None
    index: int = 0


class ReleaseServer:
    """Serves ``releases`` of ``fleet`` through the broker at ``broker``; ``start()``, then ``stop()``."""

    def __init__(
        self,
        broker: BrokerAddress,
        fleet: str,
        releases: Sequence[PublishedRelease],
        *,
        client_id: str,
        max_inflight: int = 64,
        gather_s: float = DEFAULT_GATHER_S,
        username: str | None = None,
        password: str | None = None,
        ca_certs: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        """``gather_s``: a request that finds its payload idle starts a pass once ``gather_s`` seconds pass
        without another request (at most MAX_GATHER_S after the first), so that devices told to update at the
        same moment (a group command) share the first pass instead of joining it half-way. Raises ValueError for
        a bad fleet, a release of another fleet, max_inflight < 1 or a negative gather_s."""
        if max_inflight < 1 or gather_s < 0:
            raise ValueError("max_inflight must be at least 1 and gather_s not negative")
        self.broker, self.fleet = broker, validate_segment(fleet, "fleet")
        self.client_id, self.max_inflight, self.gather_s = client_id, max_inflight, gather_s
        self._auth = (username, password, ca_certs)
        self._client_cert = (cert_file, key_file)  # mutual TLS
        self._cond = threading.Condition()
        self._releases: dict[str, PublishedRelease] = {}
        self._streams: dict[tuple[str, str], _Stream] = {}  # (release id, payload id) -> stream
        self._retired: list[_Stream] = []  # streams of replaced releases; their files close at stop()
        self._metadata_due: list[str] = []  # release ids whose retained metadata is to be (re)published
        self._retained: dict[str, bytes] = {}  # topic -> other retained messages (trust metadata), in order
        self._retained_due: list[str] = []  # their topics still to (re)publish: before any release metadata
        self._rr = 0  # round-robin position over the streams
        self._unacked = 0  # publishes handed to paho and not yet acknowledged
        self._window = max_inflight  # at most this many unacknowledged: max_inflight, or less if the broker says so
        self._connected = self._stopping = False
        self._connect_error = ""
        self._connack, self._suback = threading.Event(), threading.Event()
        self._requests = self._chunks = self._bytes = self._publish_failures = self._connects = 0
        self._rejected: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()
        self._client: mqtt.Client | None = None
        self._sender: threading.Thread | None = None
        for rel in releases:
            self.add_release(rel)

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and start serving. Raises TransportError when the broker cannot be reached, refuses
        the connection or the subscription, or does not answer within ``timeout`` seconds."""
        if self._client is not None:
            raise RuntimeError("the release server was already started")
        self._client = client = self._new_client()
        try:
            client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:
            raise TransportError(f"cannot reach the broker {self.broker.host}:{self.broker.port}: {exc}") from exc
        client.loop_start()
        for answered in (self._connack, self._suback):
            if not answered.wait(timeout) or self._connect_error:
                client.disconnect()
                client.loop_stop()
                raise TransportError(self._connect_error or f"no answer from the broker within {timeout:g} s")
        self._sender = threading.Thread(target=self._send_loop, name="release-sender", daemon=True)
        self._sender.start()

    def stop(self) -> None:
        """Stop sending, disconnect, close the payload files. Publishes still unacknowledged are dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._sender is not None:
            self._sender.join()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        with self._cond:
            for stream in [*self._streams.values(), *self._retired]:
                stream.file.close()
            self._retired.clear()

    def flush(self, timeout: float) -> bool:
        """Wait until every planned chunk and metadata is published and acknowledged; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not (self._retained_due or self._metadata_due or self._unacked or self._pending_chunks()),
                timeout,
            )

    def add_release(self, rel: PublishedRelease) -> None:
        """Serve ``rel`` too (replacing a release of the same id), publishing its metadata retained.

        Raises ValueError for a release of another fleet; OSError when a payload file cannot be opened.
        """
        meta = rel.meta
        if meta.fleet != self.fleet:
            raise ValueError(f"release {meta.release_id} is for fleet {meta.fleet}, this server serves {self.fleet}")
        topic = release_topics(self.fleet, meta.release_id).chunk
        streams: dict[tuple[str, str], _Stream] = {}
        try:
            for p in meta.payloads:
                file = rel.payload_file(p.id).open("rb")
                planner = RepairPlanner(p.chunk_count)
                streams[(meta.release_id, p.id)] = _Stream(meta.release_id, topic, p, meta.chunk_size, file, planner)
        except OSError:
            for stream in streams.values():
                stream.file.close()
            raise
        with self._cond:
            for key in [k for k in self._streams if k[0] == meta.release_id]:
                self._retired.append(self._streams.pop(key))
            self._releases[meta.release_id] = rel
            self._streams.update(streams)
            if meta.release_id not in self._metadata_due:
                self._metadata_due.append(meta.release_id)
            self._cond.notify_all()

    def set_retained(self, messages: Mapping[str, bytes]) -> None:
        """Keep these retained messages published (the fleet's trust metadata, :mod:`edgeops.trust`), in the
        order given and before any release metadata; changed ones now, all of them again after a reconnect."""
        with self._cond:
            changed = [t for t, raw in messages.items() if self._retained.get(t) != raw]
            self._retained = dict(messages)
            self._retained_due = [t for t in self._retained if t in changed or t in self._retained_due]
            self._cond.notify_all()

    # --- paho callbacks (network thread) -----------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        username, password, ca_certs = self._auth
        client = new_mqtt_client(self.client_id, tls=self.broker.tls, ca_certs=ca_certs, username=username,
                                 password=password, cert_file=self._client_cert[0], key_file=self._client_cert[1])
        client.max_inflight_messages_set(self.max_inflight)
        client.reconnect_delay_set(*_RECONNECT_DELAY_S)
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_subscribe, client.on_message = self._on_subscribe, self._on_message
        client.on_publish = self._on_publish
        return client

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self._connect_error = f"the broker refused the connection: {reason_code}"
            self._connack.set()
            return
        # MQTT 5: never more unacknowledged QoS 1 publishes than the broker's Receive Maximum (paho ignores it, and
        # its own limit cannot change on a live connection: our window is the one that counts)
        window = min(self.max_inflight, getattr(properties, "ReceiveMaximum", self.max_inflight))
        client.subscribe(ota_request_filter(self.fleet), qos=1)
        with self._cond:
            self._window = window
            self._connected = True
            self._connects += 1
            self._metadata_due = list(self._releases)  # retained metadata again, in case the broker lost it
            self._retained_due = list(self._retained)
            self._cond.notify_all()
        self._connack.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            self._connected = False
        if not self._stopping:
            log.warning("release server lost the broker (%s); reconnecting", reason_code)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self._connect_error = f"the broker refused the subscription to repair requests: {reason_codes[0]}"
        self._suback.set()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            self._unacked -= 1
            if reason_code.is_failure:
                self._publish_failures += 1
            self._cond.notify_all()
        if reason_code.is_failure:
            log.warning("the broker refused a publish: %s", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        device = message.topic.split("/")[-2]
        try:
            request = parse_repair(bytes(message.payload))
            with self._cond:
                stream = self._stream_for(request)
                now = time.monotonic()
                if not stream.planner.pending:
                    stream.gather_started, stream.ready_at = now, now + self.gather_s
                elif stream.ready_at > now:  # still gathering: wait for a quiet gather_s, at most MAX_GATHER_S
                    stream.ready_at = min(stream.gather_started + MAX_GATHER_S, now + self.gather_s)
                stream.planner.request(request.missing)
                self._requests += 1
                self._cond.notify_all()
        except ReleaseRejected as exc:
            self._reject(device, exc)

    def _stream_for(self, request: RepairRequest) -> _Stream:
        """The stream a request is for (lock held). Raises ReleaseRejected: unknown-release, malformed."""
        stream = self._streams.get((request.release_id, request.payload_id))
        if stream is None:
            raise ReleaseRejected(
                OtaReason.UNKNOWN_RELEASE.value, f"no payload {request.payload_id} of release {request.release_id}"
            )
        if request.chunk_count != stream.payload.chunk_count:
            raise ReleaseRejected(
                OtaReason.MALFORMED.value,
                f"bitmap of {request.chunk_count} chunks for a payload of {stream.payload.chunk_count}",
            )
        return stream

    def _reject(self, device: str, exc: ReleaseRejected) -> None:
        with self._cond:
            self._rejected[exc.reason] += 1
            first = (device, exc.reason) not in self._logged and len(self._logged) < MAX_LOGGED_REJECTIONS
            if first:
                self._logged.add((device, exc.reason))
        if first:
            log.warning("repair request from device %s rejected: %s", device[:64], exc)

    # --- sender thread -----------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._stopping:
                    job, wake_at = self._take_job()
                    if job is not None:
                        break
                    self._cond.wait(None if wake_at is None else max(0.0, wake_at - time.monotonic()))
                if job is None:
                    return
                self._unacked += 1
            self._publish(job)

    def _take_job(self) -> tuple[_Job | None, float | None]:
        """(the next thing to publish, None) with the lock held, or (None, when to look again: None = when told)
        when there is nothing to publish, the window is full or the passes are still gathering."""
        if not self._connected or self._unacked >= self._window:
            return None, None
        while self._retained_due:
            topic = self._retained_due.pop(0)
            if topic in self._retained:
                return _Job(topic, True, metadata=self._retained[topic]), None
        while self._metadata_due:
            rel = self._releases.get(self._metadata_due.pop(0))
            if rel is not None:
                return _Job(release_topics(self.fleet, rel.meta.release_id).manifest, True, metadata=rel.signed), None
        now, wake_at = time.monotonic(), None
        streams = list(self._streams.values())
        for k in range(len(streams)):
            stream = streams[(self._rr + k) % len(streams)]
            if stream.planner.pending and stream.ready_at > now:
                wake_at = stream.ready_at if wake_at is None else min(wake_at, stream.ready_at)
                continue
            index = stream.planner.next_chunk()
            if index is not None:
                self._rr = (self._rr + k + 1) % len(streams)
                return _Job(stream.topic, False, stream=stream, index=index), None
        return None, wake_at

    def _frame(self, stream: _Stream, index: int) -> bytes | None:
        """The chunk frame of ``index``, or None (logged, counted) when the file no longer holds the signed bytes.
        (The file stays open until stop(), even when its release is replaced meanwhile.)"""
        offset, length = stream.payload.chunk_range(index, stream.chunk_size)
        try:
            data = os.pread(stream.file.fileno(), length, offset)
        except OSError as exc:
            log.error("cannot read chunk %d of payload %s: %s", index, stream.payload.id, exc)
            data = b""
        if len(data) == length and hashlib.sha256(data).digest() == stream.payload.chunk_hashes[index]:
            return encode_chunk(stream.release_id, stream.payload.id, index, data)
        with self._cond:
            stream.store_errors += 1
            first = stream.store_errors == 1
        if first:
            log.error("payload %s changed on disk: chunk %d does not match the signed hash", stream.payload.id, index)
        return None

    def _publish(self, job: _Job) -> None:
        """Read and hand one job to paho. Runs without the lock: paho calls on_publish holding its own lock, and
        reading a chunk should not hold up the network thread."""
        if self._client is None:
            raise RuntimeError("the sender runs only after start()")
        frame = job.metadata if job.stream is None else self._frame(job.stream, job.index)
        queued = False
        if frame is not None:
            try:
                info = self._client.publish(job.topic, frame, qos=1, retain=job.retain)
                # NO_CONN: paho keeps a QoS 1 message and sends it after the reconnect
                queued = info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
            except ValueError as exc:
                log.error("cannot publish on %s: %s", job.topic, exc)
        with self._cond:
            if not queued:
                self._unacked -= 1
                self._publish_failures += frame is not None
            elif job.stream is not None:
                self._chunks += 1
                self._bytes += len(frame or b"")
                job.stream.bytes_published += len(frame or b"")
            self._cond.notify_all()

    # --- figures -----------------------------------------------------------------------------------------

    def _pending_chunks(self) -> int:
        return sum(s.planner.pending for s in self._streams.values())

    def stats(self) -> dict[str, Any]:
        """Counters since start: connections to the broker, chunks and bytes (chunk frames) published, first sends
        and resends, valid requests, rejected requests per reason, and the same per payload."""
        with self._cond:
            per_payload = {}
            for (rid, pid), s in sorted(self._streams.items()):
                c = s.planner.counters()
                per_payload[pid] = {
                    "release_id": rid,
                    "kind": s.payload.kind.value,
                    "base_version": s.payload.base_version,
                    "chunk_count": s.payload.chunk_count,
                    "size": s.payload.size,
                    "published": c.published,
                    "first_sends": c.first_sends,
                    "resends": c.resends,
                    "requests": c.requests,
                    "pending": c.pending,
                    "bytes_published": s.bytes_published,
                    "store_errors": s.store_errors,
                }
            return {
                "connected": self._connected,
                "window": self._window,
                "connects": self._connects,
                "releases": len(self._releases),
                "chunks_published": self._chunks,
                "first_sends": sum(p["first_sends"] for p in per_payload.values()),
                "resends": sum(p["resends"] for p in per_payload.values()),
                "bytes_published": self._bytes,
                "requests": self._requests,
                "rejected": dict(sorted(self._rejected.items())),
                "publish_failures": self._publish_failures,
                "store_errors": sum(p["store_errors"] for p in per_payload.values()),
                "per_payload": per_payload,
            }
