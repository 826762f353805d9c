"""Release metadata, chunk frames and repair requests: the OTA wire formats (light core, sans-I/O).

A *release* is one target artifact for one profile, offered as one or more *payloads*: the full artifact and a
delta (:mod:`edgeops.delta`) from each base artifact the publisher was given. Every payload is cut into chunks of
``chunk_size`` bytes (the last one shorter); the signed metadata lists the sha256 of every chunk, so a device can
check each chunk on arrival, before it has the whole payload::

    metadata   signed envelope (edgeops.protocol.seal_envelope) around the JSON payload
               {"type": "release", "schema": 1, "release_id", "fleet", "name", "version", "profile",
                "created_at", "target": {"sha256", "size"}, "chunk_size",
                "payloads": [{"id", "kind": "full"|"delta", "base_version", "base_sha256", "codec",
                              "sha256", "size", "chunk_hashes": base64(sha256 digests, concatenated)}]}
    chunk      b"EOC1" | u8 len(release_id) | release_id | 8-byte payload id | u32 index | 32-byte sha256 | data
    repair     {"type": "repair", "release_id", "payload_id", "chunk_count", "missing": base64(bitmap)}
               bit i (byte i // 8, bit i % 8, least significant first) set = chunk i is missing

Guarantees: :func:`parse_release` returns metadata only when the envelope is signed by a trusted key and every
field has its type and bounds (sizes, counts, hashes, segments); :func:`parse_chunk` returns a chunk only when
the header is well-formed and the data matches the header's hash; :func:`parse_repair` returns a request only
when the bitmap has exactly the announced length with no stray bits. For any other bytes they raise
:class:`ReleaseRejected` with an :class:`OtaReason` code, and nothing else. Whether a release *fits* a device
(fleet, profile, newer version, size limit) is the device's decision (``device_agent.ota_receiver``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeops import bounded_json
from edgeops.errors import CommandRejected, ReleaseRejected
from edgeops.manifest import parse_semver
from edgeops.protocol import open_envelope, seal_envelope, validate_segment

__all__ = [
    "CHUNK_MAGIC",
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_METADATA_BYTES",
    "Chunk",
    "OtaReason",
    "Payload",
    "PayloadKind",
    "ReleaseMetadata",
    "RepairRequest",
    "chunk_count",
    "chunk_hashes_of",
    "decode_bitmap",
    "encode_bitmap",
    "encode_chunk",
    "encode_repair",
    "make_release_id",
    "parse_chunk",
    "parse_release",
    "parse_repair",
    "sign_release",
]

SCHEMA = 1
DEFAULT_CHUNK_SIZE = 64 * 1024  # bytes
MIN_CHUNK_SIZE = 1024  # bytes
MAX_CHUNK_SIZE = 4 * 1024 * 1024  # bytes; well under mosquitto's and most brokers' message limits
MAX_CHUNKS = 1 << 20  # per payload
MAX_PAYLOADS = 64  # per release
MAX_PAYLOAD_BYTES = 16 * 1024**3  # 16 GiB, an upper bound on any one payload's announced size
MAX_METADATA_BYTES = 4 * 1024 * 1024  # of the signed metadata envelope
MAX_REPAIR_BYTES = 256 * 1024  # of one repair request (a bitmap of MAX_CHUNKS bits is 128 KiB + base64)
CHUNK_MAGIC = b"EOC1"
_CHUNK_FIXED = struct.Struct(">8sI32s")  # payload id, index, sha256
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_RELEASE_KEYS = frozenset(
    {"type", "schema", "release_id", "fleet", "name", "version", "profile", "created_at", "target", "chunk_size",
     "payloads"}
)
_PAYLOAD_KEYS = frozenset({"id", "kind", "base_version", "base_sha256", "codec", "sha256", "size", "chunk_hashes"})
_REPAIR_KEYS = frozenset({"type", "release_id", "payload_id", "chunk_count", "missing"})


class OtaReason(str, Enum):
    """Why OTA input was refused or an update failed; the value goes on the device's event topic."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"  # a message over its wire limit
    UNSIGNED = "unsigned"
    UNTRUSTED_KEY = "untrusted-key"
    BAD_SIGNATURE = "bad-signature"
    WRONG_FLEET = "wrong-fleet"
    WRONG_PROFILE = "wrong-profile"
    NOT_NEWER = "not-newer"  # a downgrade, or the version the device already runs
    TOO_LARGE = "too-large"  # the payload is over the device's download limit
    NO_PAYLOAD = "no-payload"  # no delta from the device's base and no full artifact
    BAD_CHUNK = "bad-chunk"  # a chunk whose bytes do not match the signed hash
    RESULT_MISMATCH = "result-mismatch"  # the applied delta / downloaded artifact is not the announced target
    STORAGE = "storage"  # the device could not store the download (I/O error, file size limit, read-only)
    DISK_FULL = "disk-full"  # no room for the download or the install: the device retries when space frees
    UNKNOWN_RELEASE = "unknown-release"  # a repair request for a release the publisher does not serve
    INSTALL_FAILED = "install-failed"  # the artifact was refused by the slot store or the health gate
    # update trust (edgeops.trust, TUF metadata)
    EXPIRED_METADATA = "expired-metadata"  # root/targets/snapshot/timestamp past its expiry: a freeze, or no refresh
    METADATA_ROLLBACK = "metadata-rollback"  # a metadata version lower than one trusted before
    UNTRUSTED_METADATA = "untrusted-metadata"  # not signed by a threshold of the role's keys in the trusted root
    METADATA_MISMATCH = "metadata-mismatch"  # length/hash is not what the parent role names (mix-and-match)
    NOT_IN_TARGETS = "not-in-targets"  # the trusted targets do not list this release
    MISSING_METADATA = "missing-metadata"  # a role's metadata has not arrived yet (transient: retried when it does)

    def __str__(self) -> str:
        return self.value


class PayloadKind(str, Enum):
    FULL = "full"
    DELTA = "delta"

    def __str__(self) -> str:
        return self.value


def _reject(reason: OtaReason, detail: str) -> ReleaseRejected:
    return ReleaseRejected(reason.value, detail[:200])


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a payload of ``size`` bytes has (at least one, even for an empty payload)."""
    return max(1, math.ceil(size / chunk_size))


@dataclass(frozen=True)
class Payload:
    """One downloadable file of a release: the full artifact, or a delta from one base artifact."""

    id: str  # 16 hex characters: the start of ``sha256``; names the payload in chunk headers and repairs
    kind: PayloadKind
    sha256: str  # of the payload file (the delta patch or the full artifact)
    size: int  # bytes
    chunk_hashes: tuple[bytes, ...]  # sha256 digest of each chunk
    base_version: str | None = None  # deltas only
    base_sha256: str | None = None  # deltas only: the artifact the delta applies to
    codec: str | None = None  # deltas only: edgeops.delta codec name

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_hashes)

    def chunk_range(self, index: int, chunk_size: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index`` in the payload file."""
        start = index * chunk_size
        return start, max(0, min(chunk_size, self.size - start))


@dataclass(frozen=True)
class ReleaseMetadata:
    release_id: str
    fleet: str
    name: str
    version: str
    profile: str
    created_at: float
    target_sha256: str  # of the target artifact (what the device installs)
    target_size: int
    chunk_size: int
    payloads: tuple[Payload, ...]

    def full(self) -> Payload | None:
        return next((p for p in self.payloads if p.kind is PayloadKind.FULL), None)

    def delta_from(self, base_sha256: str) -> Payload | None:
        return next((p for p in self.payloads if p.kind is PayloadKind.DELTA and p.base_sha256 == base_sha256), None)

    def payload(self, payload_id: str) -> Payload | None:
        return next((p for p in self.payloads if p.id == payload_id), None)


def make_release_id(name: str, version: str, profile: str) -> str:
    """``{name}-{version}-{profile}`` as a topic segment (``+`` of semver build metadata becomes ``_``).

    Raises ValueError when the result is not a valid segment (too long, odd characters).
    """
    return validate_segment(f"{name}-{version}-{profile}".replace("+", "_"), "release id")


def chunk_hashes_of(data_chunks: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(c).digest() for c in data_chunks)


def _payload_doc(p: Payload) -> dict[str, Any]:
    return {
        "id": p.id,
        "kind": p.kind.value,
        "base_version": p.base_version,
        "base_sha256": p.base_sha256,
        "codec": p.codec,
        "sha256": p.sha256,
        "size": p.size,
        "chunk_hashes": base64.b64encode(b"".join(p.chunk_hashes)).decode(),
    }


def sign_release(private_key: Ed25519PrivateKey, meta: ReleaseMetadata) -> bytes:
    """The signed metadata envelope of ``meta``. Raises ValueError when ``meta`` would not parse back."""
    doc = {
        "type": "release",
        "schema": SCHEMA,
        "release_id": meta.release_id,
        "fleet": meta.fleet,
        "name": meta.name,
        "version": meta.version,
        "profile": meta.profile,
        "created_at": meta.created_at,
        "target": {"sha256": meta.target_sha256, "size": meta.target_size},
        "chunk_size": meta.chunk_size,
        "payloads": [_payload_doc(p) for p in meta.payloads],
    }
    raw = seal_envelope(private_key, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    try:
        parse_release(raw, [private_key.public_key()])
    except ReleaseRejected as exc:
        raise ValueError(f"release metadata would be rejected: {exc}") from None
    return raw


def _json(raw: bytes, what: str) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        return bounded_json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise _reject(OtaReason.MALFORMED, f"{what} is not valid JSON") from None


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _reject(OtaReason.MALFORMED, f"{what} must be an integer in {lo}..{hi}")
    return value


def _str(value: Any, what: str, pattern: re.Pattern[str] | None = None, max_len: int = 128) -> str:
    if not isinstance(value, str) or len(value) > max_len or (pattern is not None and not pattern.fullmatch(value)):
        raise _reject(OtaReason.MALFORMED, f"{what} is missing or malformed")
    return value


def _segment(value: Any, what: str) -> str:
    try:
        return validate_segment(value, what)
    except ValueError as exc:
        raise _reject(OtaReason.MALFORMED, str(exc)) from None


def _semver(value: Any, what: str) -> str:
    text = _str(value, what)
    try:
        parse_semver(text)
    except ValueError:
        raise _reject(OtaReason.MALFORMED, f"{what} {text[:40]!r} is not semver") from None
    return text


def _parse_payload(doc: Any, chunk_size: int) -> Payload:
    if not isinstance(doc, dict) or set(doc) != _PAYLOAD_KEYS:
        raise _reject(OtaReason.MALFORMED, f"a payload must have exactly {', '.join(sorted(_PAYLOAD_KEYS))}")
    try:
        kind = PayloadKind(doc["kind"])
    except ValueError:
        raise _reject(OtaReason.MALFORMED, "payload kind must be full or delta") from None
    sha = _str(doc["sha256"], "payload sha256", _HEX64)
    size = _int(doc["size"], "payload size", 0, MAX_PAYLOAD_BYTES)
    pid = _str(doc["id"], "payload id", _HEX16)
    if pid != sha[:16]:
        raise _reject(OtaReason.MALFORMED, "payload id is not the start of its sha256")
    try:
        digests = base64.b64decode(_str(doc["chunk_hashes"], "chunk_hashes", max_len=MAX_METADATA_BYTES), validate=True)
    except (ValueError, binascii.Error):
        raise _reject(OtaReason.MALFORMED, "chunk_hashes is not base64") from None
    count = chunk_count(size, chunk_size)
    if count > MAX_CHUNKS or len(digests) != 32 * count:
        raise _reject(OtaReason.MALFORMED, f"payload of {size} bytes needs {count} chunk hashes")
    base_version = base_sha = codec = None
    if kind is PayloadKind.DELTA:
        base_version = _semver(doc["base_version"], "base_version")
        base_sha = _str(doc["base_sha256"], "base_sha256", _HEX64)
        codec = _str(doc["codec"], "codec", re.compile(r"[a-z0-9][a-z0-9.-]{0,63}"))
    elif (doc["base_version"], doc["base_sha256"], doc["codec"]) != (None, None, None):
        raise _reject(OtaReason.MALFORMED, "a full payload has no base or codec")
    hashes = tuple(digests[i : i + 32] for i in range(0, len(digests), 32))
    return Payload(pid, kind, sha, size, hashes, base_version, base_sha, codec)


def _open(raw: bytes, trusted_keys: Sequence[Ed25519PublicKey], max_bytes: int, what: str) -> bytes:
    try:
        payload, _ = open_envelope(raw, trusted_keys, max_bytes=max_bytes)
    except CommandRejected as exc:  # same envelope, same reason codes
        raise ReleaseRejected(exc.reason, f"{what}: {exc.detail}") from None
    return payload


def parse_release(
    raw: bytes, trusted_keys: Sequence[Ed25519PublicKey], *, max_bytes: int = MAX_METADATA_BYTES
) -> ReleaseMetadata:
    """Check signed release metadata and return it.

    Raises ReleaseRejected (only) with reason oversized, malformed, unsigned, untrusted-key or bad-signature. The
    signature is checked before the payload is parsed.
    """
    doc = _json(_open(raw, trusted_keys, max_bytes, "release metadata"), "release metadata")
    if not isinstance(doc, dict) or set(doc) != _RELEASE_KEYS or doc["type"] != "release":
        raise _reject(OtaReason.MALFORMED, f"release metadata must have exactly {', '.join(sorted(_RELEASE_KEYS))}")
    if doc["schema"] != SCHEMA or isinstance(doc["schema"], bool):
        raise _reject(OtaReason.MALFORMED, f"unsupported release schema {doc['schema']!r}")
    chunk_size = _int(doc["chunk_size"], "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    target = doc["target"]
    if not isinstance(target, dict) or set(target) != {"sha256", "size"}:
        raise _reject(OtaReason.MALFORMED, "target must be {sha256, size}")
    created = doc["created_at"]
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise _reject(OtaReason.MALFORMED, "created_at must be a number")
    payloads = doc["payloads"]
    if not isinstance(payloads, list) or not 1 <= len(payloads) <= MAX_PAYLOADS:
        raise _reject(OtaReason.MALFORMED, f"payloads must be a list of 1..{MAX_PAYLOADS}")
    parsed = tuple(_parse_payload(p, chunk_size) for p in payloads)
    if len({p.id for p in parsed}) != len(parsed):
        raise _reject(OtaReason.MALFORMED, "two payloads with the same id")
    meta = ReleaseMetadata(
        release_id=_segment(doc["release_id"], "release id"),
        fleet=_segment(doc["fleet"], "fleet"),
        name=_segment(doc["name"], "name"),
        version=_semver(doc["version"], "version"),
        profile=_segment(doc["profile"], "profile"),
        created_at=float(created),
        target_sha256=_str(target["sha256"], "target sha256", _HEX64),
        target_size=_int(target["size"], "target size", 1, MAX_PAYLOAD_BYTES),
        chunk_size=chunk_size,
        payloads=parsed,
    )
    full = meta.full()
    if full is not None and (full.sha256, full.size) != (meta.target_sha256, meta.target_size):
        raise _reject(OtaReason.MALFORMED, "the full payload is not the target artifact")
    return meta


# --- chunks -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    release_id: str
    payload_id: str  # 16 hex characters
    index: int
    sha256: bytes  # digest from the header; parse_chunk has checked that data matches it
    data: bytes


def encode_chunk(release_id: str, payload_id: str, index: int, data: bytes) -> bytes:
    """One chunk frame. Raises ValueError for a bad release id, payload id or index."""
    rid = validate_segment(release_id, "release id").encode()
    if not _HEX16.fullmatch(payload_id) or not 0 <= index < MAX_CHUNKS:
        raise ValueError("payload id must be 16 hex characters and index within 0..MAX_CHUNKS-1")
    fixed = _CHUNK_FIXED.pack(bytes.fromhex(payload_id), index, hashlib.sha256(data).digest())
    return b"".join((CHUNK_MAGIC, bytes([len(rid)]), rid, fixed, data))


def parse_chunk(raw: bytes, *, max_data: int = MAX_CHUNK_SIZE) -> Chunk:
    """Parse one chunk frame and check its data against the header's hash.

    Raises ReleaseRejected: malformed (header), oversized (data over ``max_data``), bad-chunk (hash mismatch).
    """
    view = memoryview(raw)
    if len(view) < 5 or bytes(view[:4]) != CHUNK_MAGIC:
        raise _reject(OtaReason.MALFORMED, "not a chunk frame")
    n = view[4]
    head_end = 5 + n + _CHUNK_FIXED.size
    if len(view) < head_end:
        raise _reject(OtaReason.MALFORMED, "truncated chunk header")
    try:
        release_id = validate_segment(bytes(view[5 : 5 + n]).decode("ascii"), "release id")
    except (UnicodeDecodeError, ValueError):
        raise _reject(OtaReason.MALFORMED, "bad release id in chunk header") from None
    pid, index, digest = _CHUNK_FIXED.unpack_from(view, 5 + n)
    if index >= MAX_CHUNKS:
        raise _reject(OtaReason.MALFORMED, f"chunk index {index} out of range")
    data = bytes(view[head_end:])
    if len(data) > max_data:
        raise _reject(OtaReason.OVERSIZED, f"chunk of {len(data)} bytes, limit {max_data}")
    if hashlib.sha256(data).digest() != digest:
        raise _reject(OtaReason.BAD_CHUNK, f"chunk {index} does not match its header hash")
    return Chunk(release_id, pid.hex(), index, digest, data)


# --- repair requests ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepairRequest:
    release_id: str
    payload_id: str
    chunk_count: int
    missing: tuple[int, ...]  # ascending chunk indices


def encode_bitmap(indices: Iterable[int], count: int) -> bytes:
    """A bitmap of ``count`` bits with ``indices`` set (LSB first). Raises ValueError for an index out of range."""
    bits = bytearray((count + 7) // 8)
    for i in indices:
        if not 0 <= i < count:
            raise ValueError(f"index {i} out of range 0..{count - 1}")
        bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def decode_bitmap(bits: bytes, count: int) -> tuple[int, ...]:
    """The set indices of a bitmap of exactly ``count`` bits. Raises ReleaseRejected(malformed) otherwise."""
    if len(bits) != (count + 7) // 8:
        raise _reject(OtaReason.MALFORMED, f"bitmap of {len(bits)} bytes for {count} chunks")
    if count % 8 and bits[-1] >> (count % 8):
        raise _reject(OtaReason.MALFORMED, "bitmap has bits set past the chunk count")
    flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=count, bitorder="little")
    return tuple(int(i) for i in np.flatnonzero(flags))


def encode_repair(release_id: str, payload_id: str, count: int, missing: Iterable[int]) -> bytes:
    """A repair request for the ``missing`` chunks. Raises ValueError for bad ids or indices."""
    validate_segment(release_id, "release id")
    if not _HEX16.fullmatch(payload_id) or not 1 <= count <= MAX_CHUNKS:
        raise ValueError("payload id must be 16 hex characters and count within 1..MAX_CHUNKS")
    doc = {
        "type": "repair",
        "release_id": release_id,
        "payload_id": payload_id,
        "chunk_count": count,
        "missing": base64.b64encode(encode_bitmap(missing, count)).decode(),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_repair(raw: bytes) -> RepairRequest:
    """Parse a repair request. Raises ReleaseRejected (only): oversized or malformed."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_REPAIR_BYTES:
        raise _reject(OtaReason.OVERSIZED, f"repair request over {MAX_REPAIR_BYTES} bytes")
    doc = _json(bytes(raw), "repair request")
    if not isinstance(doc, dict) or set(doc) != _REPAIR_KEYS or doc["type"] != "repair":
        raise _reject(OtaReason.MALFORMED, f"repair request must have exactly {', '.join(sorted(_REPAIR_KEYS))}")
    count = _int(doc["chunk_count"], "chunk_count", 1, MAX_CHUNKS)
    try:
        bits = base64.b64decode(_str(doc["missing"], "missing", max_len=MAX_REPAIR_BYTES), validate=True)
    except (ValueError, binascii.Error):
        raise _reject(OtaReason.MALFORMED, "missing is not base64") from None
    return RepairRequest(
        _segment(doc["release_id"], "release id"),
        _str(doc["payload_id"], "payload id", _HEX16),
        count,
        decode_bitmap(bits, count),
    )
