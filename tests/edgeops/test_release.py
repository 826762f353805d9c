"""The OTA wire formats (edgeops.release): signed release metadata, chunk frames, repair bitmaps — round trips,
every refusal with its reason code, and fuzzing that shows any bytes give either a value or ReleaseRejected."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeops.errors import ReleaseRejected
from edgeops.protocol import seal_envelope
from edgeops.release import (
    Payload,
    PayloadKind,
    ReleaseMetadata,
    chunk_hashes_of,
    decode_bitmap,
    encode_bitmap,
    encode_chunk,
    encode_repair,
    make_release_id,
    parse_chunk,
    parse_release,
    parse_repair,
    sign_release,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
CS = 1024


def _payload(data: bytes, kind: PayloadKind = PayloadKind.FULL, base: bytes | None = None) -> Payload:
    sha = hashlib.sha256(data).hexdigest()
    chunks = [data[i : i + CS] for i in range(0, max(len(data), 1), CS)]
    extra: dict[str, Any] = {}
    if kind is PayloadKind.DELTA:
        extra = {"base_version": "1.0.0", "base_sha256": hashlib.sha256(base or b"").hexdigest(), "codec": "zstd"}
    return Payload(sha[:16], kind, sha, len(data), chunk_hashes_of(chunks), **extra)


TARGET = bytes(range(256)) * 20  # 5 KiB: 5 chunks
DELTA = b"delta!" * 300
META = ReleaseMetadata(
    release_id="digits-2.0.0-rpi4",
    fleet="acme",
    name="digits",
    version="2.0.0",
    profile="rpi4",
    created_at=1795240000.0,
    target_sha256=hashlib.sha256(TARGET).hexdigest(),
    target_size=len(TARGET),
    chunk_size=CS,
    payloads=(_payload(TARGET), _payload(DELTA, PayloadKind.DELTA, base=b"v1")),
)


def _doc(raw: bytes) -> dict[str, Any]:
    return json.loads(base64.b64decode(json.loads(raw)["payload"]))


def _resign(doc: dict[str, Any], key: Ed25519PrivateKey = KEY) -> bytes:
    return seal_envelope(key, json.dumps(doc).encode())


def _reason(raw: bytes) -> str:
    with pytest.raises(ReleaseRejected) as info:
        parse_release(raw, [KEY.public_key()])
    return info.value.reason


def test_metadata_round_trip_and_lookups() -> None:
    meta = parse_release(sign_release(KEY, META), [OTHER.public_key(), KEY.public_key()])
    assert meta == META
    assert meta.full() == META.payloads[0]
    assert meta.delta_from(hashlib.sha256(b"v1").hexdigest()) == META.payloads[1]
    assert meta.delta_from("0" * 64) is None
    assert meta.payload(META.payloads[1].id) == META.payloads[1]
    assert META.payloads[0].chunk_count == 5 and META.payloads[0].chunk_range(4, CS) == (4096, 1024)


def test_signing_is_deterministic() -> None:
    assert sign_release(KEY, META) == sign_release(KEY, META)


def test_forged_unsigned_and_foreign_metadata_are_refused() -> None:
    raw = sign_release(KEY, META)
    assert _reason(sign_release(OTHER, META)) == "untrusted-key"
    env = json.loads(raw)
    env["signatures"] = []
    assert _reason(json.dumps(env).encode()) == "unsigned"
    doc = _doc(raw)
    doc["version"] = "9.0.0"  # the payload changed under the old signature
    env["payload"] = base64.b64encode(json.dumps(doc).encode()).decode()
    env["signatures"] = json.loads(raw)["signatures"]
    assert _reason(json.dumps(env).encode()) == "bad-signature"
    assert _reason(b"x" * (5 * 1024 * 1024)) == "oversized"
    assert _reason(b"not json") == "malformed"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.pop("profile"), "missing key"),
        (lambda d: d.update(extra=1), "extra key"),
        (lambda d: d.update(version="2.0"), "not semver"),
        (lambda d: d.update(release_id="a/b"), "bad segment"),
        (lambda d: d.update(chunk_size=10), "chunk size too small"),
        (lambda d: d.update(payloads=[]), "no payload"),
        (lambda d: d["payloads"][0].update(size=10**6), "hash count does not match the size"),
        (lambda d: d["payloads"][0].update(id="0" * 16), "id is not the sha's start"),
        (lambda d: d["payloads"][0].update(base_version="1.0.0"), "full payload with a base"),
        (lambda d: d["payloads"][1].update(base_sha256="xyz"), "bad base hash"),
        (lambda d: d["target"].update(size=1), "full payload is not the target"),
        (lambda d: d.update(payloads=[d["payloads"][0], d["payloads"][0]]), "duplicate payload"),
        (lambda d: d.update(created_at=True), "bool is not a number"),
    ],
)
def test_malformed_metadata_even_when_signed(change: Any, why: str) -> None:
    doc = _doc(sign_release(KEY, META))
    change(doc)
    assert _reason(_resign(doc)) == "malformed", why


def test_chunk_round_trip_and_checks() -> None:
    data = TARGET[:CS]
    frame = encode_chunk(META.release_id, META.payloads[0].id, 7, data)
    chunk = parse_chunk(frame)
    assert (chunk.release_id, chunk.payload_id, chunk.index, chunk.data) == (
        META.release_id,
        META.payloads[0].id,
        7,
        data,
    )
    assert len(frame) - len(data) == 49 + len(META.release_id)
    flipped = bytearray(frame)
    flipped[-1] ^= 1
    with pytest.raises(ReleaseRejected) as info:
        parse_chunk(bytes(flipped))
    assert info.value.reason == "bad-chunk"
    with pytest.raises(ReleaseRejected) as info:
        parse_chunk(frame, max_data=100)
    assert info.value.reason == "oversized"
    for bad in (b"", b"EOC1", frame[:40], b"XXXX" + frame[4:]):
        with pytest.raises(ReleaseRejected) as info:
            parse_chunk(bad)
        assert info.value.reason == "malformed"


def test_repair_round_trip_and_malformed_bitmaps() -> None:
    raw = encode_repair(META.release_id, META.payloads[0].id, 13, [0, 5, 12])
    req = parse_repair(raw)
    assert (req.release_id, req.payload_id, req.chunk_count, req.missing) == (
        META.release_id,
        META.payloads[0].id,
        13,
        (0, 5, 12),
    )
    doc = json.loads(raw)
    for change in (
        {"missing": base64.b64encode(b"\x01").decode()},  # one byte for 13 chunks
        {"missing": base64.b64encode(b"\x00\xff").decode()},  # bits set past the count
        {"missing": "%%%"},
        {"chunk_count": 0},
        {"chunk_count": "13"},
        {"release_id": "../x"},
        {"payload_id": "nothex"},
        {"type": "other"},
    ):
        with pytest.raises(ReleaseRejected) as info:
            parse_repair(json.dumps({**doc, **change}).encode())
        assert info.value.reason == "malformed", change
    with pytest.raises(ReleaseRejected) as info:
        parse_repair(b"{" * 300_000)
    assert info.value.reason == "oversized"


@given(st.sets(st.integers(0, 999)), st.integers(1000, 1100))
def test_bitmap_round_trip(indices: set[int], count: int) -> None:
    assert decode_bitmap(encode_bitmap(indices, count), count) == tuple(sorted(indices))


def test_release_id_is_a_topic_segment() -> None:
    assert make_release_id("digits", "2.0.0+build.7", "rpi4") == "digits-2.0.0_build.7-rpi4"
    with pytest.raises(ValueError):
        make_release_id("di/gits", "1.0.0", "rpi4")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_chunk_and_repair_parsers_raise_only_typed_errors(raw: bytes) -> None:
    for parse, data in ((parse_chunk, raw), (parse_repair, raw), (parse_chunk, b"EOC1" + raw)):
        with contextlib.suppress(ReleaseRejected):
            parse(data)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=10), c),
        max_leaves=20,
    )
)
def test_fuzz_signed_metadata_payloads_raise_only_typed_errors(value: Any) -> None:
    """Even a trusted signer's garbage must not crash the parser."""
    doc = _doc(sign_release(KEY, META))
    for key in ("payloads", "target", "version", "chunk_size"):
        mutated = {**doc, key: value}
        with contextlib.suppress(ReleaseRejected):  # anything else (TypeError, KeyError...) fails the test
            parse_release(_resign(mutated), [KEY.public_key()])
