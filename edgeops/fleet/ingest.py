"""Telemetry and event ingest, sans-I/O: MQTT topic and payload bytes → store rows, rate limit, batch assembly.

An agent publishes telemetry on ``edgeops/v1/{fleet}/device/{id}/telemetry`` and events on ``.../event``
(docs/protocol.md, "Telemetry, event and state payloads"). The ingest worker (``edgeops.fleet.ingest_worker``)
feeds every message here and writes what comes out with ``FleetStore.write_batch``.

Guarantees:

- :func:`classify_topic`, :func:`parse_telemetry` and :func:`parse_event` return a value or raise
  :class:`~edgeops.errors.TelemetryRejected` with a :class:`RejectReason` code, for *any* input bytes; nothing
  else escapes. A returned row is storable as it is: every count and ``seq`` is an integer within
  ``[0, 2**63 - 1]``, every number is finite, every text field is a ``str`` of bounded length.
- The device id of a row is the topic's. A payload that names another device is ``device-mismatch``; one that
  names none is taken as the topic's device (as the registry does for state messages).
- :class:`RateLimiter` keeps one token bucket per device and at most ``max_devices`` of them (least recently
  seen dropped first), so a flood of made-up device ids cannot grow it without bound.
- :class:`BatchAssembler` keeps, per ``(device, alert kind)``, only the *last* decision of the batch (open or
  close), so a batch never opens and closes the same alert in the wrong order; ``seen`` holds one entry per
  device (its latest ``received_at``).

It does not deduplicate by ``(device, seq)``: the store drops duplicates by key. It opens no socket and reads
no clock: times are passed in. :class:`RateLimiter` and :class:`BatchAssembler` are owned by one thread;
:class:`IngestCounters` may be shared between threads.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

from edgeops import bounded_json
from edgeops.errors import TelemetryRejected
from edgeops.fleet.model import Alert, AlertKind, EventRow, IngestBatch, TelemetryRow
from edgeops.protocol import TOPIC_ROOT, validate_segment

__all__ = [
    "DRIFT_LEVELS",
    "MAX_DEPTH",
    "MAX_INT",
    "MAX_MESSAGE_BYTES",
    "BatchAssembler",
    "IngestCounters",
    "RateLimiter",
    "RejectReason",
    "classify_topic",
    "parse_event",
    "parse_telemetry",
]

MAX_MESSAGE_BYTES = 64 * 1024  # a telemetry or event payload; larger ones are "oversized"
MAX_TEXT_CHARS = 128  # model_version, health, drift level, event type
MAX_INT = 2**63 - 1  # SQLite INTEGER / PostgreSQL BIGINT
DRIFT_LEVELS = frozenset({"ok", "warn", "alert", "insufficient"})
_DETAIL_CHARS = 200
_KINDS = ("telemetry", "event")


class RejectReason(str, Enum):
    """Why a message was not stored; the value is the key of ``IngestCounters.rejected``."""

    TOPIC = "topic"  # not a telemetry/event topic of this fleet, or a bad device id in it
    OVERSIZED = "oversized"  # more than MAX_MESSAGE_BYTES
    MALFORMED = "malformed"  # not a JSON object, wrong types, non-finite numbers, no seq or ts
    DEVICE_MISMATCH = "device-mismatch"  # the payload's device is not the topic's

    def __str__(self) -> str:
        return str(self.value)


def _reject(reason: RejectReason, detail: str) -> TelemetryRejected:
    return TelemetryRejected(reason.value, detail[:_DETAIL_CHARS])


def classify_topic(fleet: str, topic: str) -> tuple[str, str]:
    """``("telemetry" | "event", device_id)`` of a device topic of ``fleet``.

    Raises TelemetryRejected("topic") for any other topic (another fleet, another leaf, a bad device id)."""
    prefix = f"{TOPIC_ROOT}/{fleet}/device/"
    if not topic.startswith(prefix):
        raise _reject(RejectReason.TOPIC, f"not a device topic of fleet {fleet!r}: {topic!r}")
    device_id, _, leaf = topic[len(prefix) :].partition("/")
    if leaf not in _KINDS:
        raise _reject(RejectReason.TOPIC, f"not a telemetry or event topic: {topic!r}")
    try:
        validate_segment(device_id, "device id")
    except ValueError as exc:
        raise _reject(RejectReason.TOPIC, str(exc)) from None
    return leaf, device_id


# -- payload fields ------------------------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


MAX_DEPTH = 16  # nesting of a stored payload (the agent's is 4 deep); deeper ones could not be encoded again


def _load(device_id: str, payload: bytes | bytearray, what: str) -> dict[str, Any]:
    if not isinstance(payload, (bytes, bytearray)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise _reject(RejectReason.OVERSIZED, f"{device_id}: {what} of {len(payload)} bytes")
    if bounded_json.nesting_depth(payload) > MAX_DEPTH:  # before parsing: json.loads recurses in C
        raise _reject(RejectReason.MALFORMED, f"{device_id}: {what} nests deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(bytes(payload), parse_constant=_no_constants)  # depth checked above
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _reject(RejectReason.MALFORMED, f"{device_id}: {what} is not JSON") from None
    if not isinstance(doc, dict):
        raise _reject(RejectReason.MALFORMED, f"{device_id}: {what} is not a JSON object")
    named = doc.get("device", device_id)
    if named != device_id:
        raise _reject(RejectReason.DEVICE_MISMATCH, f"{what} on {device_id}'s topic names {str(named)[:64]!r}")
    return doc


def _malformed(device_id: str, key: str, want: str) -> TelemetryRejected:
    return _reject(RejectReason.MALFORMED, f"{device_id}: {key} must be {want}")


def _number(doc: Mapping[str, Any], key: str, device_id: str, *, minimum: float | None = None) -> float | None:
    """A finite number (``None`` when missing or null); bools and non-finite or out-of-range values refused."""
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _malformed(device_id, key, "a number")
    try:
        out = float(value)
    except OverflowError:
        raise _malformed(device_id, key, "a finite number") from None
    if not math.isfinite(out) or (minimum is not None and out < minimum):
        raise _malformed(device_id, key, "a finite number" + (f" >= {minimum:g}" if minimum is not None else ""))
    return out


def _count(doc: Mapping[str, Any], key: str, device_id: str) -> int:
    """A non-negative integer that fits a 64-bit column; 0 when missing or null."""
    value = doc.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise _malformed(device_id, key, "an integer within [0, 2**63)")
    return value


def _text(doc: Mapping[str, Any], key: str, device_id: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
        raise _malformed(device_id, key, f"a string of at most {MAX_TEXT_CHARS} characters")
    return value


def _section(doc: Mapping[str, Any], key: str, device_id: str) -> dict[str, Any]:
    """A nested object; ``{}`` when missing or null."""
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _malformed(device_id, key, "an object")
    return value


def _seq_ts(doc: Mapping[str, Any], device_id: str) -> tuple[int, float]:
    if "seq" not in doc or doc["seq"] is None:
        raise _malformed(device_id, "seq", "present")
    ts = _number(doc, "ts", device_id)
    if ts is None:
        raise _malformed(device_id, "ts", "present")
    return _count(doc, "seq", device_id), ts


def _drift(doc: Mapping[str, Any], device_id: str) -> tuple[str | None, float | None]:
    """(level, largest psi over every monitored input and output tensor) of the ``drift`` section."""
    drift = _section(doc, "drift", device_id)
    level = _text(drift, "level", device_id)
    if level is not None and level not in DRIFT_LEVELS:
        raise _malformed(device_id, "drift.level", f"one of {sorted(DRIFT_LEVELS)}")
    worst: float | None = None
    for kind in ("inputs", "outputs"):
        for entry in _section(drift, kind, device_id).values():
            if not isinstance(entry, dict):
                raise _malformed(device_id, f"drift.{kind} entries", "objects")
            psi = _number(entry, "psi", device_id, minimum=0.0)
            if psi is not None and (worst is None or psi > worst):
                worst = psi
    return level, worst


def parse_telemetry(device_id: str, payload: bytes | bytearray, *, received_at: float) -> TelemetryRow:
    """One telemetry message of ``device_id`` (the id from the topic) → a row.

    Raises TelemetryRejected: ``oversized`` (over MAX_MESSAGE_BYTES), ``malformed`` (not a JSON object, no
    ``seq``/``ts``, a field of the wrong type, a non-finite or negative number where one cannot be),
    ``device-mismatch`` (the payload names another device). TypeError when ``payload`` is not bytes."""
    doc = _load(device_id, payload, "telemetry")
    seq, ts = _seq_ts(doc, device_id)
    latency = _section(doc, "latency_ms", device_id)
    resources = _section(doc, "resources", device_id)
    drift_level, drift_psi_max = _drift(doc, device_id)
    return TelemetryRow(
        device_id=device_id,
        seq=seq,
        ts=ts,
        received_at=received_at,
        model_version=_text(doc, "model_version", device_id),
        interval_s=_number(doc, "interval_s", device_id, minimum=0.0),
        latency_count=_count(latency, "count", device_id),
        p50_ms=_number(latency, "p50", device_id, minimum=0.0),
        p95_ms=_number(latency, "p95", device_id, minimum=0.0),
        p99_ms=_number(latency, "p99", device_id, minimum=0.0),
        max_ms=_number(latency, "max", device_id, minimum=0.0),
        requests=_count(doc, "requests", device_id),
        errors=_count(doc, "errors", device_id),
        fallback_answers=_count(doc, "fallback_answers", device_id),
        cpu_percent=_number(resources, "cpu_percent", device_id, minimum=0.0),
        rss_mb=_number(resources, "rss_mb", device_id, minimum=0.0),
        temperature_c=_number(resources, "temperature_c", device_id),
        drift_level=drift_level,
        drift_psi_max=drift_psi_max,
        health=_text(doc, "health", device_id),
        raw=doc,
    )


def parse_event(device_id: str, payload: bytes | bytearray, *, received_at: float) -> EventRow:
    """One event message of ``device_id`` (the id from the topic) → a row; ``body`` is the whole payload.

    Raises TelemetryRejected: ``oversized``, ``malformed`` (not a JSON object, no ``seq``/``ts``, no ``type``
    string of 1-128 characters), ``device-mismatch``. TypeError when ``payload`` is not bytes."""
    doc = _load(device_id, payload, "event")
    seq, ts = _seq_ts(doc, device_id)
    kind = _text(doc, "type", device_id)
    if not kind:
        raise _malformed(device_id, "type", "a non-empty string")
    return EventRow(device_id=device_id, seq=seq, ts=ts, received_at=received_at, type=kind, body=doc)


# -- rate limit ------------------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per device: ``burst`` messages at once, then ``rate_per_s`` sustained.

    The bucket refills by the time that passed on the fleet's clock *or* on the device's own clock (the ``ts`` of
    its messages), whichever moved more, with the device's clock counted only while it rises and is not ahead of
    the fleet's by more than ``max_skew_s``. So an agent that flushes a day of spooled telemetry after an outage
    (messages minutes apart in its own time, arriving in a burst) is not cut, while one that sends too often
    now is. A device that lies about its clock escapes the limit within that bound; the broker's own limits
    (queue, message rate) are the backstop.

    At most ``max_devices`` buckets are kept; the least recently seen device is forgotten first (it starts again
    with a full bucket). Owned by one thread (not locked)."""

    def __init__(self, rate_per_s: float, burst: float, *, max_devices: int = 100_000,
                 max_skew_s: float = 60.0) -> None:
        """Raises ValueError for a rate <= 0, a burst < 1 or max_devices < 1 (or non-finite values)."""
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a finite number > 0, got {rate_per_s}")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"burst must be a finite number >= 1, got {burst}")
        if max_devices < 1:
            raise ValueError(f"max_devices must be >= 1, got {max_devices}")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.max_devices = max_devices
        self.max_skew_s = max_skew_s
        # device → [tokens, last refill time, last device clock seen (or -inf)]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def allow(self, device_id: str, now: float, *, device_ts: float | None = None, wall: float | None = None) -> bool:
        """Take one token from ``device_id``'s bucket at time ``now`` (seconds, any monotonic clock).

        ``device_ts`` is the message's own timestamp (device clock, Unix seconds) and ``wall`` the fleet's Unix
        time it was received at; without them only ``now`` refills the bucket."""
        trusted = device_ts is not None and wall is not None and device_ts <= wall + self.max_skew_s
        bucket = self._buckets.get(device_id)
        if bucket is None:
            if len(self._buckets) >= self.max_devices:
                self._buckets.popitem(last=False)
            bucket = [self.burst, now, -math.inf]
            self._buckets[device_id] = bucket
        else:
            self._buckets.move_to_end(device_id)
            elapsed = max(0.0, now - bucket[1])
            bucket[1] = max(bucket[1], now)
            if trusted and math.isfinite(bucket[2]) and device_ts is not None and device_ts > bucket[2]:
                elapsed = max(elapsed, device_ts - bucket[2])
            if elapsed > 0:
                bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate_per_s)
        if trusted and device_ts is not None:
            bucket[2] = max(bucket[2], device_ts)
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False

    def __len__(self) -> int:
        """The number of devices tracked."""
        return len(self._buckets)


# -- counters ------------------------------------------------------------------------------------------------------


class IngestCounters:
    """What one ingest worker did since it started; every method is thread-safe.

    Counts are of deliveries: a message the broker sends again after a reconnect is counted again. ``received`` =
    stored + duplicates + rate_limited + sum(rejected) + redelivery_dropped + still pending (or left at a stop
    without flush, for the broker to send again)."""

    _NAMES = ("received", "stored", "duplicates", "rate_limited", "batches", "store_errors", "acked", "connects",
              "redelivery_dropped")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0  # messages taken from the broker
        self.stored = 0  # telemetry rows and events inserted
        self.duplicates = 0  # rows the store already had (same device and seq)
        self.rate_limited = 0  # dropped by the per-device rate limit
        self.rejected: dict[str, int] = {}  # by RejectReason value
        self.batches = 0  # committed write_batch calls
        self.store_errors = 0  # failed write_batch attempts (each retried)
        self.acked = 0  # PUBACKs sent after a commit
        self.connects = 0  # connections to the broker (1 + reconnects)
        self.redelivery_dropped = 0  # taken on a lost connection, not yet written: the broker sends them again

    def add(self, **deltas: int) -> None:
        """Add to the named counters (``add(received=1)``); ValueError for an unknown name."""
        with self._lock:
            for name, delta in deltas.items():
                if name not in self._NAMES:
                    raise ValueError(f"unknown ingest counter {name!r}")
                setattr(self, name, getattr(self, name) + delta)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """A consistent copy: ``{"received", "stored", ..., "rejected": {reason: n}}``."""
        with self._lock:
            out: dict[str, Any] = {name: getattr(self, name) for name in self._NAMES}
            out["rejected"] = dict(self.rejected)
        return out


# -- batch assembly --------------------------------------------------------------------------------------------


class BatchAssembler:
    """Collects rows and alert decisions into one :class:`IngestBatch` (see the module docstring)."""

    def __init__(self) -> None:
        self._telemetry: list[TelemetryRow] = []
        self._events: list[EventRow] = []
        self._alerts: dict[tuple[str, AlertKind], Alert | float] = {}  # last decision: Alert to open / close time
        self._seen: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._telemetry) + len(self._events)

    def _see(self, device_id: str, at: float) -> None:
        if at > self._seen.get(device_id, -math.inf):
            self._seen[device_id] = at

    def add_telemetry(
        self, row: TelemetryRow, opens: Iterable[Alert] = (), closes: Iterable[tuple[str, AlertKind, float]] = ()
    ) -> None:
        """Add a row and the alert decisions taken on it (``AlertRules.evaluate``), later decisions winning."""
        self._telemetry.append(row)
        self._see(row.device_id, row.received_at)
        for device_id, kind, at in closes:
            self._alerts[(device_id, kind)] = at
        for alert in opens:
            self._alerts[(alert.device_id, alert.kind)] = alert

    def add_event(self, row: EventRow) -> None:
        self._events.append(row)
        self._see(row.device_id, row.received_at)

    def build(self) -> IngestBatch:
        opens = tuple(d for d in self._alerts.values() if isinstance(d, Alert))
        closes = tuple((dev, kind, d) for (dev, kind), d in self._alerts.items() if not isinstance(d, Alert))
        return IngestBatch(
            telemetry=tuple(self._telemetry),
            events=tuple(self._events),
            open_alerts=opens,
            close_alerts=closes,
            seen=tuple(self._seen.items()),
        )
