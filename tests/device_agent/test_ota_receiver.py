"""The OTA receiver's decisions: which payload a device fetches (or why it refuses a release), which chunks it
keeps, and when it asks the publisher for the missing ones."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.ota_receiver import Assembler, ChunkOutcome, select_payload
from edgeops.errors import ReleaseRejected
from edgeops.release import (
    Chunk,
    OtaReason,
    Payload,
    PayloadKind,
    ReleaseMetadata,
    chunk_hashes_of,
    encode_chunk,
    make_release_id,
    parse_chunk,
    parse_release,
    parse_repair,
    sign_release,
)

KEY = Ed25519PrivateKey.generate()
FLEET = "lab"
PROFILE = "x86-gateway"
CHUNK = 1024  # the smallest chunk size the format allows: many chunks from a few KiB
BASE = os.urandom(6 * CHUNK)  # the artifact the device runs (1.0.0)
BASE_SHA = hashlib.sha256(BASE).hexdigest()


def payload_of(data: bytes, chunk_size: int = CHUNK, base: tuple[str, str] | None = None) -> Payload:
    """The Payload describing ``data``: a full artifact, or a delta from ``base`` = (version, sha256)."""
    sha = hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + chunk_size] for i in range(0, max(len(data), 1), chunk_size)]
    kind = PayloadKind.DELTA if base else PayloadKind.FULL
    base_version, base_sha = base if base else (None, None)
    return Payload(sha[:16], kind, sha, len(data), chunk_hashes_of(pieces), base_version, base_sha,
                   "zstd-patch" if base else None)


def make_release(
    target: bytes,
    *,
    version: str = "1.1.0",
    fleet: str = FLEET,
    profile: str = PROFILE,
    full: bool = True,
    deltas: Sequence[tuple[str, str, bytes]] = (),  # (base version, base sha256, patch bytes)
    chunk_size: int = CHUNK,
    release_id: str | None = None,
    created_at: float = 1_700_000_000.0,
) -> tuple[bytes, ReleaseMetadata, dict[str, bytes]]:
    """Signed release metadata as a publisher makes it, parsed back as a device does; and each payload's bytes."""
    files = {}
    payloads = []
    for base_version, base_sha, patch in deltas:
        payloads.append(payload_of(patch, chunk_size, (base_version, base_sha)))
        files[payloads[-1].id] = patch
    if full:
        payloads.append(payload_of(target, chunk_size))
        files[payloads[-1].id] = target
    meta = ReleaseMetadata(
        release_id=release_id or make_release_id("digits", version, profile),
        fleet=fleet,
        name="digits",
        version=version,
        profile=profile,
        created_at=created_at,
        target_sha256=hashlib.sha256(target).hexdigest(),
        target_size=len(target),
        chunk_size=chunk_size,
        payloads=tuple(payloads),
    )
    raw = sign_release(KEY, meta)
    return raw, parse_release(raw, [KEY.public_key()]), files


def chunks_of(meta: ReleaseMetadata, payload: Payload, data: bytes) -> list[Chunk]:
    """Every chunk of ``payload`` as the device receives it (framed, then parsed)."""
    out = []
    for i in range(payload.chunk_count):
        start, length = payload.chunk_range(i, meta.chunk_size)
        out.append(parse_chunk(encode_chunk(meta.release_id, payload.id, i, data[start : start + length])))
    return out


TARGET = os.urandom(8 * CHUNK + 300)  # 9 chunks, the last one short
PATCH = os.urandom(2 * CHUNK + 10)  # 3 chunks
def full_and_delta(meta: ReleaseMetadata, base_sha256: str) -> tuple[Payload, Payload]:
    full, delta = meta.full(), meta.delta_from(base_sha256)
    if full is None or delta is None:
        raise RuntimeError("the test release lacks its full or its delta payload")
    return full, delta


RAW, META, FILES = make_release(TARGET, deltas=[("1.0.0", BASE_SHA, PATCH)])
FULL, DELTA = full_and_delta(META, BASE_SHA)


def select(meta: ReleaseMetadata = META, **overrides: Any) -> Payload:
    args: dict[str, Any] = {
        "fleet": FLEET,
        "profile": PROFILE,
        "active_version": "1.0.0",
        "floor_version": "1.0.0",
        "active_sha256": BASE_SHA,
        "max_download_bytes": 1 << 20,
    }
    args.update(overrides)
    return select_payload(meta, **args)


# --- select_payload -----------------------------------------------------------------------------------------


def test_delta_is_chosen_when_the_device_runs_its_base() -> None:
    assert select() == DELTA


@pytest.mark.parametrize("active_sha256", [hashlib.sha256(b"another build").hexdigest(), None])
def test_full_artifact_when_the_base_is_unknown_or_absent(active_sha256: str | None) -> None:
    assert select(active_sha256=active_sha256) == FULL
    assert select(active_sha256=None, active_version=None, floor_version=None) == FULL  # a device with no model yet


@pytest.mark.parametrize(
    ("overrides", "reason", "detail"),
    [
        ({"fleet": "field"}, OtaReason.WRONG_FLEET, "release is for fleet lab, this device is in field"),
        ({"profile": "rpi4"}, OtaReason.WRONG_PROFILE, "release is for x86-gateway, this device is rpi4"),
        ({"active_version": "1.1.0"}, OtaReason.NOT_NEWER, "release 1.1.0 is not newer: this device runs 1.1.0"),
        ({"active_version": "2.0.0"}, OtaReason.NOT_NEWER, "this device runs 2.0.0"),
        ({"floor_version": "1.2.0"}, OtaReason.NOT_NEWER, "this device has a floor of 1.2.0"),
        ({"max_download_bytes": len(PATCH) - 1}, OtaReason.TOO_LARGE, f"delta payload is {len(PATCH)} bytes"),
        ({"max_download_bytes": len(TARGET) - 1}, OtaReason.TOO_LARGE, f"target artifact is {len(TARGET)} bytes"),
        ({"fleet": "field", "profile": "rpi4", "active_version": "9.0.0"}, OtaReason.WRONG_FLEET, "fleet"),
        ({"profile": "rpi4", "active_version": "9.0.0"}, OtaReason.WRONG_PROFILE, "rpi4"),
    ],
)
def test_releases_that_do_not_fit_are_refused_with_a_reason(
    overrides: dict[str, Any], reason: OtaReason, detail: str
) -> None:
    with pytest.raises(ReleaseRejected) as info:
        select(**overrides)
    assert info.value.reason == reason.value
    assert detail in info.value.detail


def test_a_prerelease_of_the_running_version_is_a_downgrade() -> None:
    _, meta, _ = make_release(TARGET, version="1.1.0-rc.1")
    with pytest.raises(ReleaseRejected, match="not-newer"):
        select(meta, active_version="1.1.0", active_sha256=None)


def test_no_payload_when_only_deltas_from_other_bases() -> None:
    _, meta, _ = make_release(TARGET, full=False, deltas=[("1.0.0", BASE_SHA, PATCH)])
    other = hashlib.sha256(b"a locally patched 1.0.0").hexdigest()
    with pytest.raises(ReleaseRejected) as info:
        select(meta, active_sha256=other)
    assert info.value.reason == "no-payload"
    assert "no delta from base " + other[:16] in info.value.detail and "only from 1.0.0" in info.value.detail
    assert select(meta) == meta.delta_from(BASE_SHA)  # the device that runs the base is served


def test_the_download_limit_is_inclusive() -> None:
    assert select(max_download_bytes=len(TARGET)) == DELTA


# --- Assembler: chunks --------------------------------------------------------------------------------------


def test_classify_sorts_every_kind_of_chunk_and_changes_nothing() -> None:
    asm = Assembler(META, FULL)
    good = chunks_of(META, FULL, TARGET)
    _, other_meta, _ = make_release(TARGET, version="1.2.0")
    flipped = bytearray(good[3].data)
    flipped[10] ^= 0x01
    cases = {
        ChunkOutcome.FOREIGN: [
            chunks_of(other_meta, other_meta.payloads[0], TARGET)[0],  # another release
            chunks_of(META, DELTA, PATCH)[0],  # the same release's other payload
            parse_chunk(encode_chunk(META.release_id, FULL.id, FULL.chunk_count, b"x")),  # past the end
        ],
        ChunkOutcome.CORRUPT: [
            parse_chunk(encode_chunk(META.release_id, FULL.id, 3, bytes(flipped))),  # header hash matches, not signed
            parse_chunk(encode_chunk(META.release_id, FULL.id, 8, good[8].data + b"\0")),  # wrong length
            parse_chunk(encode_chunk(META.release_id, FULL.id, 8, good[8].data[:-1])),
            dataclasses.replace(good[2], data=good[1].data),  # a Chunk not made by parse_chunk
        ],
        ChunkOutcome.STORE: [good[0], good[8]],
    }
    for outcome, chunks in cases.items():
        for chunk in chunks:
            assert asm.classify(chunk) is outcome, (outcome, chunk.index)
    assert (asm.received, asm.corrupt_count, asm.missing) == (0, 0, list(range(9)))
    asm.mark_stored(0, now=1.0)
    assert asm.classify(good[0]) is ChunkOutcome.DUPLICATE


def test_out_of_order_and_duplicate_chunks_complete_the_download() -> None:
    asm = Assembler(META, FULL)
    good = chunks_of(META, FULL, TARGET)
    order = [8, 3, 3, 0, 7, 1, 8, 2, 6, 5, 0, 4]
    outcomes = []
    for t, i in enumerate(order):
        outcomes.append(asm.classify(good[i]))
        if outcomes[-1] is ChunkOutcome.STORE:
            asm.mark_stored(i, now=float(t))
    assert outcomes.count(ChunkOutcome.DUPLICATE) == 3
    assert asm.complete and asm.missing == [] and asm.held == frozenset(range(9))
    assert asm.progress() == {
        "release_id": META.release_id,
        "payload_id": FULL.id,
        "kind": "full",
        "received": 9,
        "total": 9,
        "bytes": len(TARGET),
        "corrupt": 0,
    }
    assert not asm.repair_due(100.0)
    with pytest.raises(RuntimeError, match="complete"):
        asm.repair_request(100.0)


def test_a_corrupt_chunk_is_counted_and_requested_again() -> None:
    asm = Assembler(META, DELTA)
    good = chunks_of(META, DELTA, PATCH)
    asm.mark_stored(0, 0.0)
    asm.note_corrupt(1, 0.5)
    asm.mark_stored(2, 1.0)
    assert (asm.missing, asm.corrupt_count, asm.progress()["corrupt"]) == ([1], 1, 1)
    assert parse_repair(asm.repair_request(10.0)).missing == (1,)
    assert asm.classify(good[1]) is ChunkOutcome.STORE


def test_resumed_download_starts_from_what_is_held() -> None:
    asm = Assembler(META, FULL, have=[0, 4, 8])
    assert asm.received == 3 and asm.missing == [1, 2, 3, 5, 6, 7]
    assert asm.progress()["bytes"] == 2 * CHUNK + 300
    with pytest.raises(ValueError, match="out of range"):
        Assembler(META, FULL, have=[9])
    with pytest.raises(ValueError, match="not one of"):
        Assembler(META, payload_of(b"stranger"))


# --- Assembler: repairs -------------------------------------------------------------------------------------


def test_a_fresh_download_asks_for_everything_at_once() -> None:
    asm = Assembler(META, FULL)
    assert asm.repair_due(0.0)
    request = parse_repair(asm.repair_request(0.0))
    assert (request.release_id, request.payload_id, request.chunk_count) == (META.release_id, FULL.id, 9)
    assert request.missing == tuple(range(9))
    assert not asm.repair_due(1.9)  # neither idle long enough nor past the minimum interval
    assert asm.repair_due(2.0)  # nothing came: ask again


def test_no_repair_while_chunks_keep_arriving() -> None:
    asm = Assembler(META, FULL, repair_idle_s=2.0, repair_min_interval_s=2.0)
    asm.repair_request(0.0)
    for t in (1.0, 2.5, 4.0):
        asm.mark_stored(int(t), t)
        assert not asm.repair_due(t + 1.9)
    assert asm.repair_due(6.0)  # 2 s after the last chunk
    asm.note_corrupt(5, 7.0)  # a corrupt chunk also shows the stream is alive
    assert not asm.repair_due(8.9) and asm.repair_due(9.0)


def test_repairs_are_no_more_frequent_than_the_minimum_interval() -> None:
    asm = Assembler(META, FULL, repair_idle_s=0.5, repair_min_interval_s=5.0)
    asm.mark_stored(0, 0.0)
    assert not asm.repair_due(0.4) and asm.repair_due(0.5)
    asm.repair_request(0.5)
    assert not asm.repair_due(1.0) and not asm.repair_due(5.4)
    assert asm.repair_due(5.5)


def test_a_resumed_download_first_waits_for_queued_chunks() -> None:
    asm = Assembler(META, FULL, have=[0], started_at=100.0)
    assert not asm.repair_due(100.0) and not asm.repair_due(101.9)
    assert asm.repair_due(102.0)
    # without started_at, the first tick starts the clock
    asm = Assembler(META, FULL, have=[0])
    assert not asm.repair_due(50.0) and not asm.repair_due(51.9)
    assert asm.repair_due(52.0)


def test_repair_request_names_exactly_the_missing_chunks() -> None:
    asm = Assembler(META, FULL, have=[1, 2, 5])
    asm.mark_stored(8, 0.0)
    request = parse_repair(asm.repair_request(3.0))
    assert request.missing == (0, 3, 4, 6, 7) == tuple(asm.missing)
    assert not asm.repair_due(4.0)  # the request restarted both clocks


# --- Assembler: any delivery order --------------------------------------------------------------------------

DELIVERY = st.tuples(st.integers(0, FULL.chunk_count + 1), st.sampled_from(["good", "flipped", "short", "foreign"]))


@settings(max_examples=150, deadline=None)
@given(st.lists(DELIVERY, max_size=40))
def test_any_delivery_sequence_holds_exactly_the_good_chunks(deliveries: list[tuple[int, str]]) -> None:
    asm = Assembler(META, FULL)
    good_delivered: set[int] = set()
    corrupt_noted = 0
    for t, (index, kind) in enumerate(deliveries):
        start, length = FULL.chunk_range(index, CHUNK)
        data = TARGET[start : start + length]
        if kind == "flipped" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        elif kind == "short":
            data = data[:-1]
        release_id = "digits-9.9.9-x86-gateway" if kind == "foreign" else META.release_id
        chunk = parse_chunk(encode_chunk(release_id, FULL.id, index, data))
        outcome = asm.classify(chunk)
        if outcome is ChunkOutcome.STORE:
            asm.mark_stored(index, float(t))
        elif outcome is ChunkOutcome.CORRUPT:
            asm.note_corrupt(index, float(t))
            corrupt_noted += 1
        if kind == "good" and index < FULL.chunk_count:
            good_delivered.add(index)
    assert asm.held == good_delivered
    assert asm.missing == sorted(set(range(FULL.chunk_count)) - good_delivered)
    assert asm.complete == (len(good_delivered) == FULL.chunk_count)
    assert asm.corrupt_count == corrupt_noted
    if not asm.complete:
        assert parse_repair(asm.repair_request(1000.0)).missing == tuple(asm.missing)
