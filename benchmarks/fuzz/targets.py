"""The fuzz targets: every parser that reads network or file bytes, as ``name → FuzzTarget``.

A target is a harness taking one input (``bytes``), the exceptions that count as the parser's typed refusal,
and seed inputs. :func:`run_one` is the contract both the coverage-guided fuzzer (``benchmarks/fuzz/run.py``,
atheris) and the property tests (``tests/edgeops/security/test_fuzz_parsers.py``, hypothesis) drive: the
harness either returns or raises one of ``expected``; anything else — another exception, or an
``AssertionError`` from a harness's own check of what the parser returned — propagates and is a finding.

Harnesses that need a signature sign the fuzzed payload themselves with :data:`seeds.KEY`, so the fuzzer gets
past the signature check and reaches the payload parser; a raw twin of each feeds the whole envelope.
Harnesses that need a file reuse one file per process (:class:`_Scratch`), so a run stays fast.

Adding a target (``edgeops.trust``, say) is one function and one entry::

    def _trust_root(data: bytes) -> None:
        parse_root(data, ...)

    TARGETS["trust-root"] = FuzzTarget(_trust_root, (TrustError,), lambda: (ROOT_SEED,), max_len=16384,
                                      covers="edgeops.trust.parse_root on raw bytes")

This module does not import atheris (the property tests run without it).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fuzz import seeds
from device_agent.command_guard import CommandGuard, MemoryNonceStore
from device_agent.http_api import JSON_TYPE, NPY_TYPE, NPZ_TYPE, decode_request
from edgeops.artifact import pack_artifact, read_unverified_manifest, sign_manifest, verify_artifact
from edgeops.delta import apply_delta
from edgeops.delta.op_table import iter_dict_ranges, iter_ops
from edgeops.delta.patch_format import HEADER_SIZE, PatchHeader, SectionSizes, parse_header
from edgeops.errors import (
    ArtifactFormatError,
    CommandRejected,
    DeltaFormatError,
    IntegrityError,
    ReleaseRejected,
    RequestError,
    SignatureError,
    TelemetryRejected,
)
from edgeops.fleet.ingest import MAX_INT, classify_topic, parse_event, parse_telemetry
from edgeops.fleet.registry import parse_state
from edgeops.manifest import TensorInfo
from edgeops.protocol import TOPIC_ROOT, RejectReason, parse_command, seal_envelope
from edgeops.release import MAX_CHUNKS, decode_bitmap, parse_chunk, parse_release, parse_repair
from edgeops.trust import TrustSession, check_release

__all__ = ["TARGETS", "FuzzTarget", "run_one"]

Harness = Callable[[bytes], object]


@dataclass(frozen=True)
class FuzzTarget:
    """One parser under fuzzing."""

    run: Harness  # calls the parser on one input; may assert on what it returns
    expected: tuple[type[BaseException], ...]  # the parser's typed refusals (UntrustedInput subclasses)
    seeds: Callable[[], Sequence[bytes]]  # valid (and some refused) inputs to start from
    max_len: int = 4096  # bytes: libFuzzer's -max_len for this target
    covers: str = ""  # one line: what the target exercises


def run_one(target: FuzzTarget, data: bytes) -> None:
    """Run ``target`` on ``data``; its expected refusals are normal, anything else propagates (a finding)."""
    with contextlib.suppress(*target.expected):
        target.run(data)


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


# --- release metadata, chunks, repair requests -------------------------------------------------------------

MAX_CHUNK_DATA = 2048  # the chunk harness's max_data: small, so oversized frames are within the fuzzer's reach


def _release_signed(data: bytes) -> None:
    meta = parse_release(seal_envelope(seeds.KEY, data), [seeds.PUBLIC])
    for p in meta.payloads:
        assert p.chunk_count == max(1, -(-p.size // meta.chunk_size)), "chunk hashes do not cover the payload"


def _release_raw(data: bytes) -> None:
    parse_release(data, [seeds.PUBLIC])


def _chunk(data: bytes) -> None:
    chunk = parse_chunk(data, max_data=MAX_CHUNK_DATA)
    assert hashlib.sha256(chunk.data).digest() == chunk.sha256 and len(chunk.data) <= MAX_CHUNK_DATA


def _repair(data: bytes) -> None:
    req = parse_repair(data)
    assert list(req.missing) == sorted(set(req.missing)) and all(0 <= i < req.chunk_count for i in req.missing)


def _bitmap(data: bytes) -> None:
    count = int.from_bytes(data[:3], "little") % (MAX_CHUNKS + 1)  # what parse_repair may pass: 0..MAX_CHUNKS
    missing = decode_bitmap(data[3:], count)
    assert all(0 <= i < count for i in missing)


# --- commands -----------------------------------------------------------------------------------------------


def _command_signed(data: bytes) -> None:
    parse_command(seal_envelope(seeds.KEY, data), [seeds.PUBLIC])


def _command_raw(data: bytes) -> None:
    parse_command(data, [seeds.PUBLIC])


def _command_guard(data: bytes) -> None:
    """A fresh guard per input; a command it accepts must then be refused as a replay."""
    guard = CommandGuard(
        fleet=seeds.FLEET, device_id=seeds.DEVICE, groups=[seeds.GROUP], keys=[seeds.PUBLIC],
        nonces=MemoryNonceStore(),
    )
    raw = seal_envelope(seeds.KEY, data)
    guard.check(raw, now=seeds.NOW)
    try:
        guard.check(raw, now=seeds.NOW)
    except CommandRejected as exc:
        assert exc.reason == RejectReason.REPLAYED.value, f"a replay was refused as {exc.reason}"
    else:
        raise AssertionError("the guard accepted the same command twice")


# --- files: one scratch directory per process ---------------------------------------------------------------


class _Scratch:
    """A temp directory holding the delta base, and one reused file for each harness that needs a path."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgeops-fuzz-"))
        atexit.register(shutil.rmtree, self.dir, True)  # (libFuzzer's own exit skips it: a few KiB in /tmp)
        self.base = self.dir / "base.npy"
        self.base.write_bytes(seeds.DELTA_OLD)
        self.out_dir = self.dir / "out"
        self.out_dir.mkdir()

    def file(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        with open(path, "wb") as f:
            f.write(data)
        return path


_scratch: _Scratch | None = None


def _files() -> _Scratch:
    global _scratch
    if _scratch is None:
        _scratch = _Scratch()
    return _scratch


# --- delta patches ------------------------------------------------------------------------------------------

MAX_DELTA_OUTPUT = 1 << 20  # bytes: the apply harness skips patches that announce a larger NEW
_TABLE_SIZES = struct.Struct("<HHH")  # the op-table harness's prefix: new_size, literal_raw, payload_size


def _delta_header(data: bytes) -> None:
    header, sizes = parse_header(data, len(data))
    assert sizes.total == len(data) and len(header.old_sha256) == len(header.new_sha256) == 64


def _delta_op_table(data: bytes) -> None:
    """A bare op table against the 4 KiB base; the prefix gives the totals the ops must add up to."""
    if len(data) < _TABLE_SIZES.size:
        return
    new_size, literal_raw, payload = _TABLE_SIZES.unpack_from(data)
    table = data[_TABLE_SIZES.size :]
    header = PatchHeader("tensor-planes-zstd", "0" * 64, len(seeds.DELTA_OLD), "0" * 64, new_size)
    sizes = SectionSizes(len(table), len(table), 1 if literal_raw else 0, literal_raw, payload)
    for offset, length in iter_dict_ranges(table, header.old_size):
        assert offset >= 0 and offset + length <= header.old_size
    made = sum(op.length for op in iter_ops(table, header, sizes))
    assert made == new_size


def _delta_apply(data: bytes) -> None:
    """apply_delta on the fuzzed patch against the fixed base; no temp file may survive, success or not."""
    scratch = _files()
    if len(data) >= HEADER_SIZE:
        try:
            header, _ = parse_header(data[:HEADER_SIZE], len(data))
        except DeltaFormatError:
            pass
        else:
            if header.new_size > MAX_DELTA_OUTPUT:
                return  # bounded output: the op totals must equal new_size, so this caps what apply writes
    patch = scratch.file("patch.bin", data)
    out = scratch.out_dir / "new.bin"
    try:
        digest = apply_delta(scratch.base, patch, out)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    finally:
        left = [n for n in os.listdir(scratch.out_dir) if n != "new.bin"]
        assert not left, f"apply_delta left {left} behind"


# --- artifacts ----------------------------------------------------------------------------------------------


def _artifact_unverified(data: bytes) -> None:
    read_unverified_manifest(_files().file("unverified.edgeops", data))


def _artifact_verify(data: bytes) -> None:
    verify_artifact(_files().file("verify.edgeops", data), [seeds.PUBLIC])


def _artifact_manifest(data: bytes) -> None:
    """The fuzzed bytes as manifest.json of an otherwise valid artifact, signed by the trusted key."""
    raw = pack_artifact(data, sign_manifest(data, seeds.KEY), seeds.artifact_files())
    verify_artifact(_files().file("manifest.edgeops", raw), [seeds.PUBLIC])


# --- fleet ingest, registry ---------------------------------------------------------------------------------


def _telemetry(data: bytes) -> None:
    row = parse_telemetry(seeds.DEVICE, data, received_at=seeds.NOW)
    counts = (row.seq, row.latency_count, row.requests, row.errors, row.fallback_answers)
    assert all(isinstance(c, int) and 0 <= c <= MAX_INT for c in counts), "a count does not fit a 64-bit column"
    assert _finite(row.ts, row.interval_s, row.p50_ms, row.p95_ms, row.p99_ms, row.max_ms, row.cpu_percent,
                   row.rss_mb, row.temperature_c, row.drift_psi_max), "a non-finite number was accepted"
    assert row.device_id == seeds.DEVICE


def _event(data: bytes) -> None:
    row = parse_event(seeds.DEVICE, data, received_at=seeds.NOW)
    assert 0 <= row.seq <= MAX_INT and math.isfinite(row.ts) and 0 < len(row.type) <= 128


def _topic(data: bytes) -> None:
    """MQTT topics arrive as UTF-8 text; the ingest must classify or refuse any of them."""
    topic = data.decode("utf-8", "replace")
    kind, device = classify_topic(seeds.FLEET, f"{TOPIC_ROOT}/{seeds.FLEET}/device/{topic}")
    assert kind in ("telemetry", "event") and "/" not in device


def _state(data: bytes) -> None:
    update = parse_state(seeds.DEVICE, data, received_at=seeds.NOW)
    assert update is None or update.device_id == seeds.DEVICE


# --- the device's local HTTP API ----------------------------------------------------------------------------

_CONTENT_TYPES = (JSON_TYPE, NPY_TYPE, NPZ_TYPE, "text/plain")
_SCHEMAS: tuple[list[TensorInfo] | None, ...] = (
    None,
    [TensorInfo("image", [1, 4], "float32", "int8")],
    [TensorInfo("image", [1, 4], "float32", "int8"), TensorInfo("ids", [3], "int8", "int8")],
)
MAX_REQUEST_BYTES = 64 * 1024  # the HTTP harness's max_request_bytes (an .npz may unpack to 8x this)


def _http_request(data: bytes) -> None:
    """First byte: content type (bits 0-1) and schema (bits 2-3); the rest is the request body."""
    selector, body = (data[0], data[1:]) if data else (0, b"")
    schema = _SCHEMAS[(selector >> 2) % len(_SCHEMAS)]
    arrays = decode_request(_CONTENT_TYPES[selector & 3], body, schema, max_bytes=MAX_REQUEST_BYTES)
    assert all(a.dtype.kind in "biuf" for a in arrays.values()), "a non-numeric array was accepted"


def _trust(data: bytes) -> None:
    """First byte: which genuine piece the rest replaces — root v2 (the rotation chain), timestamp, snapshot,
    targets (the TUF client workflow) or the release metadata (its listing in targets)."""
    t = seeds.trust_set()
    role = seeds.TRUST_ROLES[data[0] % len(seeds.TRUST_ROLES)] if data else "timestamp"
    body = data[1:]
    session = TrustSession(t["root"], now=seeds.TRUST_NOW)
    if role == "root":
        session.update_roots({2: body})
        return
    session.update_roots({2: t["root2"]})
    if role == "release":
        meta = check_release(session.refresh(**t["current"]), t["release_id"], body)
        assert meta.release_id == t["release_id"]
        return
    session.refresh(**{**t["current"], role: body})


# --- the registry -------------------------------------------------------------------------------------------

_ARTIFACT = (ArtifactFormatError, SignatureError, IntegrityError)

TARGETS: dict[str, FuzzTarget] = {
    "release-signed": FuzzTarget(
        _release_signed, (ReleaseRejected,), seeds.release_payloads, max_len=8192,
        covers="parse_release: fuzzed JSON payload, signed by the trusted key in the harness",
    ),
    "release-raw": FuzzTarget(
        _release_raw, (ReleaseRejected,), seeds.release_envelopes, max_len=8192,
        covers="parse_release: the raw envelope (size, JSON, base64, signatures)",
    ),
    "chunk": FuzzTarget(
        _chunk, (ReleaseRejected,), seeds.chunk_seeds, max_len=4096,
        covers="parse_chunk: EOC1 frame header, release id, index, size limit, data hash",
    ),
    "repair": FuzzTarget(
        _repair, (ReleaseRejected,), seeds.repair_seeds, max_len=4096,
        covers="parse_repair: repair request JSON and its base64 bitmap",
    ),
    "bitmap": FuzzTarget(
        _bitmap, (ReleaseRejected,), seeds.bitmap_seeds, max_len=4096,
        covers="decode_bitmap: any bytes against any chunk count 0..MAX_CHUNKS",
    ),
    "command-signed": FuzzTarget(
        _command_signed, (CommandRejected,), seeds.command_payloads, max_len=4096,
        covers="parse_command: fuzzed JSON payload, signed by the trusted key in the harness",
    ),
    "command-raw": FuzzTarget(
        _command_raw, (CommandRejected,), seeds.command_envelopes, max_len=4096,
        covers="parse_command: the raw envelope",
    ),
    "command-guard": FuzzTarget(
        _command_guard, (CommandRejected,), seeds.command_payloads, max_len=4096,
        covers="CommandGuard.check (MemoryNonceStore): signed fuzzed payload; an accepted one must not replay",
    ),
    "delta-header": FuzzTarget(
        _delta_header, (DeltaFormatError,), seeds.delta_patches, max_len=1024,
        covers="patch_format.parse_header: header fields and section sizes against the patch size",
    ),
    "delta-op-table": FuzzTarget(
        _delta_op_table, (DeltaFormatError,), lambda: (b"\x00" * 6 + b"\x00",), max_len=4096,
        covers="op_table.iter_dict_ranges / iter_ops on a bare table against a 4 KiB base",
    ),
    "delta-apply": FuzzTarget(
        _delta_apply, (DeltaFormatError, IntegrityError), seeds.delta_patches, max_len=8192,
        covers="apply_delta: whole patch (header, zstd table, literal frame, planes) on a 4 KiB base, NEW <= 1 MiB",
    ),
    "artifact-unverified": FuzzTarget(
        _artifact_unverified, _ARTIFACT, seeds.artifact_seeds, max_len=16384,
        covers="read_unverified_manifest: ustar structure and Manifest.from_bytes, no signature",
    ),
    "artifact-verify": FuzzTarget(
        _artifact_verify, _ARTIFACT, seeds.artifact_seeds, max_len=16384,
        covers="verify_artifact: structure, manifest.sig, signature, file hashes",
    ),
    "artifact-manifest": FuzzTarget(
        _artifact_manifest, _ARTIFACT, lambda: (seeds.artifact_manifest(),), max_len=8192,
        covers="verify_artifact: fuzzed manifest.json, signed by the trusted key in the harness",
    ),
    "telemetry": FuzzTarget(
        _telemetry, (TelemetryRejected,), seeds.telemetry_seeds, max_len=4096,
        covers="ingest.parse_telemetry, and that an accepted row is storable",
    ),
    "event": FuzzTarget(
        _event, (TelemetryRejected,), seeds.event_seeds, max_len=4096,
        covers="ingest.parse_event",
    ),
    "ingest-topic": FuzzTarget(
        _topic, (TelemetryRejected,), lambda: (b"pi-01/telemetry", b"pi-01/event", b"+/state"), max_len=256,
        covers="ingest.classify_topic on any topic under the fleet's device prefix",
    ),
    "device-state": FuzzTarget(
        _state, (TelemetryRejected,), seeds.state_seeds, max_len=4096,
        covers="fleet.registry.parse_state",
    ),
    "http-request": FuzzTarget(
        _http_request, (RequestError,), seeds.http_seeds, max_len=8192,
        covers="device_agent.http_api.decode_request: JSON, .npy and .npz bodies",
    ),
    "trust": FuzzTarget(
        _trust, (ReleaseRejected,), seeds.trust_seeds, max_len=16384,
        covers="edgeops.trust: root chain, timestamp/snapshot/targets refresh (python-tuf checks), release listing",
    ),
}
