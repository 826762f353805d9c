"""The ingest core and the alert rules, without a socket: topics, telemetry and event payloads (every malformed
shape, and fuzzed bytes and JSON), the per-device rate limit, the counters, batch assembly and the alert rules."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeops.errors import TelemetryRejected
from edgeops.fleet.alerts import AlertRules, RecentCloses, latency_budgets_from_profiles
from edgeops.fleet.ingest import (
    MAX_INT,
    MAX_MESSAGE_BYTES,
    BatchAssembler,
    IngestCounters,
    RateLimiter,
    classify_topic,
    parse_event,
    parse_telemetry,
)
from edgeops.fleet.model import Alert, AlertKind, AlertLevel, TelemetryRow

NOW = 1_795_238_960.5


def telemetry(**over: Any) -> dict[str, Any]:
    """A telemetry payload as the agent sends it (docs/protocol.md), with ``over`` replacing top-level keys."""
    doc: dict[str, Any] = {
        "device": "pi-01", "ts": 1795238960.0, "seq": 41, "model_version": "1.1.0", "interval_s": 60.0,
        "latency_ms": {"count": 1520, "p50": 0.41, "p95": 0.63, "p99": 0.97, "max": 2.1},
        "requests": 1520, "errors": 0, "fallback_answers": 0,
        "resources": {"cpu_percent": 7.5, "rss_mb": 61.2, "temperature_c": 52.1, "load1": 0.4},
        "drift": {"level": "ok",
                  "inputs": {"image": {"psi": 0.021, "level": "ok", "samples": 97280}},
                  "outputs": {"probs": {"psi": 0.004, "level": "ok", "samples": 15200}}},
        "health": "ok", "spool": {"pending": 0, "dropped": 0},
    }
    doc.update(over)
    return doc


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def reason_of(device: str, payload: bytes, parse: Any = parse_telemetry) -> str:
    with pytest.raises(TelemetryRejected) as info:
        parse(device, payload, received_at=NOW)
    return info.value.reason


# -- topics --------------------------------------------------------------------------------------------------


def test_topics_of_the_fleet_name_the_kind_and_the_device() -> None:
    assert classify_topic("acme", "edgeops/v1/acme/device/pi-01/telemetry") == ("telemetry", "pi-01")
    assert classify_topic("acme", "edgeops/v1/acme/device/pi_2.b/event") == ("event", "pi_2.b")


@pytest.mark.parametrize("topic", [
    "edgeops/v1/other/device/pi-01/telemetry",  # another fleet
    "edgeops/v1/acme/device/pi-01/state",  # the registry's, not ingest's
    "edgeops/v1/acme/device/pi-01/cmd",
    "edgeops/v1/acme/device/pi-01/telemetry/extra",
    "edgeops/v1/acme/device//telemetry",
    "edgeops/v1/acme/device/.hidden/telemetry",
    "edgeops/v1/acme/device/" + "x" * 65 + "/telemetry",
    "edgeops/v1/acme/group/g/cmd",
    "",
])
def test_any_other_topic_is_rejected_as_topic(topic: str) -> None:
    with pytest.raises(TelemetryRejected) as info:
        classify_topic("acme", topic)
    assert info.value.reason == "topic"


# -- telemetry -------------------------------------------------------------------------------------------------


def test_an_agent_telemetry_message_is_flattened_into_a_row() -> None:
    doc = telemetry()
    row = parse_telemetry("pi-01", raw(doc), received_at=NOW)
    assert (row.device_id, row.seq, row.ts, row.received_at) == ("pi-01", 41, 1795238960.0, NOW)
    assert (row.model_version, row.interval_s, row.health) == ("1.1.0", 60.0, "ok")
    assert (row.latency_count, row.p50_ms, row.p95_ms, row.p99_ms, row.max_ms) == (1520, 0.41, 0.63, 0.97, 2.1)
    assert (row.requests, row.errors, row.fallback_answers) == (1520, 0, 0)
    assert (row.cpu_percent, row.rss_mb, row.temperature_c) == (7.5, 61.2, 52.1)
    assert (row.drift_level, row.drift_psi_max) == ("ok", 0.021)  # the worst tensor, inputs and outputs together
    assert row.raw == doc


def test_an_idle_interval_without_drift_or_model_is_stored_with_nulls() -> None:
    doc = telemetry(model_version=None, drift=None, health="no-model", requests=0,
                    latency_ms={"count": 0, "p50": None, "p95": None, "p99": None, "max": None},
                    resources={"cpu_percent": 0.1, "rss_mb": 40.0, "temperature_c": None, "load1": None})
    row = parse_telemetry("pi-01", raw(doc), received_at=NOW)
    assert row.model_version is None and row.drift_level is None and row.drift_psi_max is None
    assert row.p95_ms is None and row.latency_count == 0 and row.temperature_c is None


def test_insufficient_drift_has_no_psi() -> None:
    drift = {"level": "insufficient", "inputs": {"image": {"psi": None, "level": "insufficient", "samples": 3}},
             "outputs": {}}
    row = parse_telemetry("pi-01", raw(telemetry(drift=drift)), received_at=NOW)
    assert (row.drift_level, row.drift_psi_max) == ("insufficient", None)


def test_a_payload_without_device_is_the_topics_device() -> None:
    doc = telemetry()
    del doc["device"]
    assert parse_telemetry("pi-01", raw(doc), received_at=NOW).device_id == "pi-01"


def test_a_payload_naming_another_device_is_a_device_mismatch() -> None:
    assert reason_of("pi-01", raw(telemetry(device="pi-02"))) == "device-mismatch"
    assert reason_of("pi-01", raw(telemetry(device=["pi-01"]))) == "device-mismatch"


def test_oversized_is_over_64_kib_and_checked_before_parsing() -> None:
    doc = telemetry(pad="")
    room = MAX_MESSAGE_BYTES - len(raw(doc))
    at_limit = raw(telemetry(pad="x" * room))
    assert len(at_limit) == MAX_MESSAGE_BYTES
    assert parse_telemetry("pi-01", at_limit, received_at=NOW).seq == 41
    assert reason_of("pi-01", raw(telemetry(pad="x" * (room + 1)))) == "oversized"
    assert reason_of("pi-01", b"{" * (MAX_MESSAGE_BYTES + 1)) == "oversized"


MALFORMED: list[tuple[str, bytes]] = [
    ("not json", b"telemetry, honest"),
    ("empty", b""),
    ("invalid utf-8", b'{"seq": 1, "ts": 2, "health": "\xff"}'),
    ("array", b"[1, 2, 3]"),
    ("string", b'"hello"'),
    ("null", b"null"),
    ("NaN literal", b'{"seq": 1, "ts": NaN}'),
    ("Infinity literal", b'{"seq": 1, "ts": 1, "interval_s": Infinity}'),
    ("overflowing float", b'{"seq": 1, "ts": 1e400}'),
    ("overflowing int as float", b'{"seq": 1, "ts": 1, "latency_ms": {"p95": ' + b"9" * 400 + b"}}"),
    ("truncated", raw(telemetry())[:-7]),
    ("missing seq", raw({k: v for k, v in telemetry().items() if k != "seq"})),
    ("null seq", raw(telemetry(seq=None))),
    ("missing ts", raw({k: v for k, v in telemetry().items() if k != "ts"})),
    ("null ts", raw(telemetry(ts=None))),
    ("seq as string", raw(telemetry(seq="41"))),
    ("seq as bool", raw(telemetry(seq=True))),
    ("seq as float", raw(telemetry(seq=41.0))),
    ("negative seq", raw(telemetry(seq=-1))),
    ("seq past int64", raw(telemetry(seq=2**63))),
    ("ts as string", raw(telemetry(ts="now"))),
    ("requests as float", raw(telemetry(requests=1.5))),
    ("negative errors", raw(telemetry(errors=-3))),
    ("huge requests", raw(telemetry(requests=10**30))),
    ("latency as list", raw(telemetry(latency_ms=[1, 2]))),
    ("negative p95", raw(telemetry(latency_ms={"count": 3, "p95": -1.0}))),
    ("p50 as string", raw(telemetry(latency_ms={"count": 3, "p50": "fast"}))),
    ("resources as string", raw(telemetry(resources="plenty"))),
    ("cpu as bool", raw(telemetry(resources={"cpu_percent": True}))),
    ("unknown drift level", raw(telemetry(drift={"level": "meh"}))),
    ("drift as number", raw(telemetry(drift=0.3))),
    ("drift tensor as number", raw(telemetry(drift={"level": "ok", "inputs": {"image": 0.3}}))),
    ("drift inputs as list", raw(telemetry(drift={"level": "ok", "inputs": [0.3]}))),
    ("negative psi", raw(telemetry(drift={"level": "ok", "inputs": {"image": {"psi": -0.1}}}))),
    ("model version as number", raw(telemetry(model_version=1.1))),
    ("model version too long", raw(telemetry(model_version="1." * 100))),
    ("health as object", raw(telemetry(health={"ok": True}))),
]


@pytest.mark.parametrize(("what", "payload"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_every_malformed_telemetry_shape_is_rejected_as_malformed(what: str, payload: bytes) -> None:
    assert reason_of("pi-01", payload) == "malformed"


def test_deep_nesting_is_rejected_whatever_the_recursion_limit() -> None:
    """Deep nesting is refused by its depth, not by json's recursion guard (TensorFlow raises the interpreter's
    recursion limit, and a payload parsed that deep could not be encoded again for the store)."""
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(100_000)
        for payload in (b'{"seq": 1, "ts": 1, "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                        b'{"seq": 1, "ts": 1, "x": ' + b'{"a": ' * 20 + b"1" + b"}" * 20 + b"}"):
            with pytest.raises(TelemetryRejected, match="nests deeper than 16"):
                parse_telemetry("pi-01", payload, received_at=NOW)
    finally:
        sys.setrecursionlimit(limit)
    assert reason_of("pi-01", b'{"seq": 1, "ts": 1, "x": ' + b"[" * 30000 + b"]" * 30000 + b"}") == "malformed"


def test_the_rejection_says_which_field_is_wrong() -> None:
    with pytest.raises(TelemetryRejected, match="pi-01: seq must be present"):
        parse_telemetry("pi-01", raw({"ts": 1.0}), received_at=NOW)
    with pytest.raises(TelemetryRejected, match="p95 must be a finite number >= 0"):
        parse_telemetry("pi-01", raw(telemetry(latency_ms={"p95": -2})), received_at=NOW)


def test_a_payload_that_is_not_bytes_is_a_callers_bug() -> None:
    with pytest.raises(TypeError):
        parse_telemetry("pi-01", "{}", received_at=NOW)  # type: ignore[arg-type]


# -- events ------------------------------------------------------------------------------------------------


def test_an_agent_event_keeps_its_whole_payload() -> None:
    doc = {"type": "agent.started", "device": "pi-01", "ts": 1795238902.2, "seq": 7, "version": "0.1.0",
           "active": {"version": "1.0.0", "slot": "a"}}
    ev = parse_event("pi-01", raw(doc), received_at=NOW)
    assert (ev.device_id, ev.seq, ev.ts, ev.received_at, ev.type) == ("pi-01", 7, 1795238902.2, NOW, "agent.started")
    assert ev.body == doc


@pytest.mark.parametrize("doc", [
    {"device": "pi-01", "ts": 1.0, "seq": 1},  # no type
    {"type": "", "device": "pi-01", "ts": 1.0, "seq": 1},
    {"type": 3, "device": "pi-01", "ts": 1.0, "seq": 1},
    {"type": "x" * 129, "device": "pi-01", "ts": 1.0, "seq": 1},
    {"type": "drift", "device": "pi-01", "seq": 1},  # no ts
    {"type": "drift", "device": "pi-01", "ts": 1.0},  # no seq
    {"type": "drift", "device": "pi-01", "ts": 1.0, "seq": "one"},
], ids=["no type", "empty type", "numeric type", "long type", "no ts", "no seq", "string seq"])
def test_malformed_events_are_rejected(doc: dict[str, Any]) -> None:
    assert reason_of("pi-01", raw(doc), parse_event) == "malformed"


def test_event_oversize_and_mismatch() -> None:
    doc = {"type": "drift", "device": "pi-02", "ts": 1.0, "seq": 1}
    assert reason_of("pi-01", raw(doc), parse_event) == "device-mismatch"
    assert reason_of("pi-01", raw({**doc, "device": "pi-01", "pad": "x" * MAX_MESSAGE_BYTES}), parse_event) == (
        "oversized"
    )


# -- fuzz: nothing but a row or TelemetryRejected ------------------------------------------------------------

KEYS = ["device", "ts", "seq", "type", "model_version", "interval_s", "latency_ms", "count", "p50", "p95", "p99",
        "max", "requests", "errors", "fallback_answers", "resources", "cpu_percent", "rss_mb", "temperature_c",
        "drift", "level", "inputs", "outputs", "psi", "health", "image"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
    st.sampled_from(["pi-01", "ok", "warn", "alert", "insufficient", "agent.started"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=6)),
    max_leaves=25,
)


def _storable(row: TelemetryRow) -> None:
    for value in (row.seq, row.latency_count, row.requests, row.errors, row.fallback_answers):
        assert isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT
    for f in (row.ts, row.interval_s, row.p50_ms, row.p95_ms, row.p99_ms, row.max_ms, row.cpu_percent, row.rss_mb,
              row.temperature_c, row.drift_psi_max):
        assert f is None or (isinstance(f, float) and math.isfinite(f))
    for s in (row.model_version, row.health, row.drift_level):
        assert s is None or isinstance(s, str)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_bytes_never_raise_anything_but_telemetry_rejected(payload: bytes) -> None:
    for parse in (parse_telemetry, parse_event):
        with contextlib.suppress(TelemetryRejected):
            parse("pi-01", payload, received_at=NOW)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), JSON, max_size=12))
def test_fuzzed_json_objects_give_a_storable_row_or_telemetry_rejected(doc: dict[str, Any]) -> None:
    payload = json.dumps(doc).encode()
    try:
        row = parse_telemetry("pi-01", payload, received_at=NOW)
    except TelemetryRejected as exc:
        assert exc.reason in ("malformed", "device-mismatch")
    else:
        _storable(row)
        AlertRules(latency_budgets_ms={"rpi4": 50.0}).evaluate(row, profile="rpi4", now=NOW)
    try:
        ev = parse_event("pi-01", payload, received_at=NOW)
    except TelemetryRejected as exc:
        assert exc.reason in ("malformed", "device-mismatch")
    else:
        assert isinstance(ev.type, str) and 0 <= ev.seq <= MAX_INT and math.isfinite(ev.ts)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_fuzzed_topics_never_raise_anything_but_telemetry_rejected(topic: str) -> None:
    for t in (topic, f"edgeops/v1/acme/device/{topic}"):
        try:
            kind, device = classify_topic("acme", t)
        except TelemetryRejected as exc:
            assert exc.reason == "topic"
        else:
            assert kind in ("telemetry", "event") and device and "/" not in device


# -- rate limit --------------------------------------------------------------------------------------------------


def test_a_device_gets_its_burst_then_its_rate() -> None:
    limiter = RateLimiter(rate_per_s=5.0, burst=20.0)
    assert [limiter.allow("pi-01", 100.0) for _ in range(25)] == [True] * 20 + [False] * 5
    assert limiter.allow("pi-01", 100.1) is False  # half a token
    assert limiter.allow("pi-01", 100.2) is True  # one token after 0.2 s at 5/s
    assert limiter.allow("pi-01", 100.2) is False
    assert sum(limiter.allow("pi-01", 110.0) for _ in range(30)) == 20  # refilled to the burst, never beyond


def test_a_spool_flushed_after_an_outage_passes_but_a_flood_now_does_not() -> None:
    """An agent back after a day offline sends its spooled telemetry (60 s apart in its own clock) at once: all
    of it is taken. A device sending 500 messages stamped 'now' is cut to its burst."""
    wall = 1_800_000_000.0
    limiter = RateLimiter(rate_per_s=5.0, burst=20.0)
    backlog = [wall - 86_400 + 60 * i for i in range(1440)]
    assert all(limiter.allow("back", 10.0 + i * 1e-4, device_ts=ts, wall=wall) for i, ts in enumerate(backlog))
    flood = [limiter.allow("flood", 10.0 + i * 1e-4, device_ts=wall, wall=wall) for i in range(500)]
    assert sum(flood) == 20
    ahead = [limiter.allow("liar", 10.0 + i * 1e-4, device_ts=wall + 3600 * (i + 1), wall=wall) for i in range(50)]
    assert sum(ahead) == 20  # a clock far ahead of the fleet's earns nothing


def test_a_flooding_device_does_not_limit_the_others() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=2.0)
    assert sum(limiter.allow("flood", 5.0) for _ in range(1000)) == 2
    assert all(limiter.allow(f"dev-{i}", 5.0) for i in range(50))


def test_a_clock_going_back_gives_no_tokens() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1.0)
    assert limiter.allow("a", 10.0) is True
    assert limiter.allow("a", 5.0) is False
    assert limiter.allow("a", 10.5) is False  # the refill counts from 10.0, not from 5.0
    assert limiter.allow("a", 11.0) is True


def test_tracked_devices_are_bounded_and_the_least_recent_is_forgotten() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1.0, max_devices=3)
    for dev in ("a", "b", "c"):
        assert limiter.allow(dev, 0.0)
    assert limiter.allow("a", 0.0) is False  # a is now the most recent
    assert limiter.allow("d", 0.0) is True  # evicts b
    assert len(limiter) == 3
    assert limiter.allow("b", 0.0) is True  # b starts over with a full bucket
    assert limiter.allow("a", 0.0) is False  # a was kept (c was evicted for b)
    for i in range(10_000):
        limiter.allow(f"made-up-{i}", 1.0)
    assert len(limiter) == 3


@pytest.mark.parametrize(("rate", "burst", "max_devices"), [(0, 1, 1), (-1, 1, 1), (1, 0.5, 1), (1, 1, 0),
                                                             (math.inf, 1, 1), (1, math.nan, 1)])
def test_rate_limiter_arguments_are_checked(rate: float, burst: float, max_devices: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst, max_devices=max_devices)


# -- counters and batches --------------------------------------------------------------------------------------


def test_counters_add_up_across_threads() -> None:
    counters = IngestCounters()

    def work() -> None:
        for _ in range(5000):
            counters.add(received=1, stored=1)
            counters.reject("malformed")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = counters.as_dict()
    assert snap["received"] == snap["stored"] == 20_000 and snap["rejected"] == {"malformed": 20_000}
    assert set(snap) >= {"received", "stored", "duplicates", "rate_limited", "rejected", "batches", "store_errors"}
    snap["rejected"]["malformed"] = 0
    assert counters.as_dict()["rejected"] == {"malformed": 20_000}  # as_dict is a copy
    with pytest.raises(ValueError):
        counters.add(bogus=1)


def _row(device: str = "pi-01", seq: int = 1, at: float = NOW, **over: Any) -> TelemetryRow:
    return parse_telemetry(device, raw(telemetry(device=device, seq=seq, **over)), received_at=at)


def test_a_batch_keeps_the_last_alert_decision_per_device_and_kind() -> None:
    asm = BatchAssembler()
    alert = Alert("pi-01", AlertKind.DRIFT, AlertLevel.WARN, NOW, "drift warn: image psi 0.12")
    asm.add_telemetry(_row(seq=1), [alert], [("pi-01", AlertKind.ERROR_RATE, NOW)])
    asm.add_telemetry(_row(seq=2, at=NOW + 1), [], [("pi-01", AlertKind.DRIFT, NOW + 1)])  # drift healed
    asm.add_telemetry(_row("pi-02", seq=1, at=NOW + 2), [Alert("pi-02", AlertKind.DRIFT, AlertLevel.ALERT, NOW + 2,
                                                                "x")], [])
    asm.add_telemetry(_row("pi-02", seq=2, at=NOW + 1.5), [], [])
    batch = asm.build()
    assert len(asm) == 4 and len(batch.telemetry) == 4
    assert [(a.device_id, a.kind) for a in batch.open_alerts] == [("pi-02", AlertKind.DRIFT)]
    assert sorted(batch.close_alerts) == [("pi-01", AlertKind.DRIFT, NOW + 1), ("pi-01", AlertKind.ERROR_RATE, NOW)]
    assert dict(batch.seen) == {"pi-01": NOW + 1, "pi-02": NOW + 2}  # the latest, not the last added


def test_events_raise_last_seen_too() -> None:
    asm = BatchAssembler()
    asm.add_event(parse_event("pi-03", raw({"type": "agent.started", "ts": 1.0, "seq": 1}), received_at=NOW))
    batch = asm.build()
    assert len(batch.events) == 1 and batch.seen == (("pi-03", NOW),) and not batch.telemetry


# -- alert rules -------------------------------------------------------------------------------------------------

RULES = AlertRules(error_rate=0.05, min_requests=20, latency_budgets_ms={"rpi4": 50.0})


def test_drift_warn_and_alert_open_at_their_level_naming_the_worst_tensor() -> None:
    drift = {"level": "alert", "inputs": {"image": {"psi": 0.31, "level": "alert", "samples": 900}},
             "outputs": {"probs": {"psi": 0.12, "level": "warn", "samples": 90}}}
    opens, closes = RULES.evaluate(_row(drift=drift), profile="rpi4", now=NOW)
    assert [(a.kind, a.level, a.detail, a.version, a.opened_at) for a in opens] == [
        (AlertKind.DRIFT, AlertLevel.ALERT, "drift alert: image psi 0.31", "1.1.0", NOW)]
    drift = {"level": "warn", "inputs": {}, "outputs": {"probs": {"psi": 0.12, "level": "warn", "samples": 90}}}
    opens, _ = RULES.evaluate(_row(drift=drift), profile="rpi4", now=NOW)
    assert [(a.level, a.detail) for a in opens] == [(AlertLevel.WARN, "drift warn: probs psi 0.12")]
    assert ("pi-01", AlertKind.DRIFT, NOW) not in closes


def test_drift_ok_closes_and_insufficient_or_missing_says_nothing() -> None:
    _, closes = RULES.evaluate(_row(), profile="rpi4", now=NOW)
    assert ("pi-01", AlertKind.DRIFT, NOW) in closes
    for drift in ({"level": "insufficient", "inputs": {}, "outputs": {}}, None):
        opens, closes = RULES.evaluate(_row(drift=drift), profile="rpi4", now=NOW)
        assert AlertKind.DRIFT not in {a.kind for a in opens} | {k for _, k, _ in closes}


def test_error_rate_over_the_threshold_opens_an_alert_a_human_can_read() -> None:
    opens, _ = RULES.evaluate(_row(requests=50, errors=6), profile="rpi4", now=NOW)
    assert [(a.kind, a.level, a.detail) for a in opens] == [
        (AlertKind.ERROR_RATE, AlertLevel.ALERT, "error rate 12.0% over 50 requests")]


@pytest.mark.parametrize(("requests", "errors", "expect"), [
    (100, 5, "close"),  # exactly at the threshold is healthy
    (100, 6, "open"),
    (20, 2, "open"),  # the minimum is enough
    (19, 19, None),  # too few requests to judge, even all failing
    (0, 0, None),
])
def test_error_rate_judges_only_intervals_with_enough_requests(requests: int, errors: int, expect: str | None) -> None:
    opens, closes = RULES.evaluate(_row(requests=requests, errors=errors), profile=None, now=NOW)
    opened = any(a.kind is AlertKind.ERROR_RATE for a in opens)
    closed = ("pi-01", AlertKind.ERROR_RATE, NOW) in closes
    assert (opened, closed) == (expect == "open", expect == "close")


def test_p95_over_the_profile_budget_opens_a_latency_alert() -> None:
    slow = {"count": 300, "p50": 40.0, "p95": 81.23, "p99": 90.0, "max": 120.0}
    opens, _ = RULES.evaluate(_row(latency_ms=slow), profile="rpi4", now=NOW)
    assert [(a.kind, a.level, a.detail) for a in opens] == [
        (AlertKind.LATENCY, AlertLevel.WARN, "p95 81.2 ms > budget 50 ms")]
    at_budget = {**slow, "p95": 50.0}
    opens, closes = RULES.evaluate(_row(latency_ms=at_budget), profile="rpi4", now=NOW)
    assert not opens and ("pi-01", AlertKind.LATENCY, NOW) in closes


def test_latency_needs_a_known_budget_and_enough_samples() -> None:
    slow = {"count": 300, "p95": 500.0}
    for profile in (None, "unknown-profile"):
        opens, closes = RULES.evaluate(_row(latency_ms=slow), profile=profile, now=NOW)
        assert AlertKind.LATENCY not in {a.kind for a in opens} | {k for _, k, _ in closes}
    opens, closes = RULES.evaluate(_row(latency_ms={"count": 3, "p95": 500.0}), profile="rpi4", now=NOW)
    assert AlertKind.LATENCY not in {a.kind for a in opens} | {k for _, k, _ in closes}


def test_a_healthy_row_closes_every_kind_it_can_judge() -> None:
    opens, closes = RULES.evaluate(_row(), profile="rpi4", now=NOW)
    assert opens == []
    assert sorted(k.value for _, k, _ in closes) == ["drift", "error_rate", "latency"]


def test_a_healthy_device_asks_to_close_each_kind_once_a_minute_not_every_row() -> None:
    recent = RecentCloses(ttl_s=60.0)
    healthy = [("pi-01", k, NOW) for k in (AlertKind.DRIFT, AlertKind.ERROR_RATE, AlertKind.LATENCY)]
    assert recent.needed([], healthy, NOW) == healthy
    assert recent.needed([], healthy, NOW + 1) == []  # the next rows: nothing to close again
    assert recent.needed([], [("pi-02", AlertKind.DRIFT, NOW + 1)], NOW + 1) == [("pi-02", AlertKind.DRIFT, NOW + 1)]
    drift = Alert("pi-01", AlertKind.DRIFT, AlertLevel.WARN, NOW + 2, "drift warn: image psi 0.12")
    assert recent.needed([drift], healthy[1:], NOW + 2) == []  # opened here: forgotten ...
    assert recent.needed([], healthy, NOW + 3) == [healthy[0]]  # ... so the next healthy row closes it at once
    assert recent.needed([], healthy, NOW + 61) == healthy[1:]  # and any other close is repeated after the ttl


def test_recent_closes_are_bounded() -> None:
    recent = RecentCloses(ttl_s=60.0, max_entries=10)
    for i in range(100):
        assert len(recent.needed([], [(f"d{i}", AlertKind.DRIFT, NOW)], NOW)) == 1
    assert len(recent._until) <= 10
    with pytest.raises(ValueError):
        RecentCloses(ttl_s=-1)


@pytest.mark.parametrize("kwargs", [{"error_rate": 1.0}, {"error_rate": -0.1}, {"error_rate": math.nan},
                                    {"min_requests": 0}, {"latency_budgets_ms": {"rpi4": 0.0}},
                                    {"latency_budgets_ms": {"rpi4": math.inf}}])
def test_alert_rule_arguments_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AlertRules(**kwargs)


def test_latency_budgets_come_from_the_hardware_profiles(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    budgets = latency_budgets_from_profiles()
    assert budgets["rpi4"] == 50.0 and budgets["x86-gateway"] == 20.0  # hw_profiles/*.toml budgets.latency_p95_ms
    (tmp_path / "broken.toml").write_text("format = 'tflite'\nprecision = [\n")
    with caplog.at_level("WARNING"):
        with_extra = latency_budgets_from_profiles([tmp_path])
    assert "broken" not in with_extra and with_extra["rpi4"] == 50.0
    assert "broken" in caplog.text
