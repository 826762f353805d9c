"""Seed inputs for the fuzz targets: small, valid wire documents made with the project's own encoders.

Everything is deterministic (fixed Ed25519 keys, fixed data), so a seed corpus and the harnesses that re-sign
fuzzed payloads always agree on the keys. Nothing here needs TensorFlow or a network; a seed builder runs in
milliseconds (the delta seeds run the real encoder on two 4 KiB ``.npy`` files).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import hashlib
import io
import json
import zipfile
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeops.artifact import pack_artifact, sign_manifest
from edgeops.delta.encode import encode_patch_from, encode_tensor_planes
from edgeops.delta.patch_format import Codec, PatchHeader
from edgeops.manifest import FileEntry, Golden, Manifest, TensorInfo
from edgeops.protocol import CommandName, sign_command
from edgeops.release import (
    Payload,
    PayloadKind,
    ReleaseMetadata,
    chunk_hashes_of,
    encode_bitmap,
    encode_chunk,
    encode_repair,
    make_release_id,
    sign_release,
)

__all__ = [
    "DELTA_NEW",
    "DELTA_OLD",
    "DEVICE",
    "FLEET",
    "GROUP",
    "KEY",
    "NOW",
    "OTHER_KEY",
    "PUBLIC",
    "RELEASE_CHUNK",
    "RELEASE_ID",
    "artifact_files",
    "artifact_manifest",
    "artifact_seeds",
    "bitmap_seeds",
    "chunk_seeds",
    "command_envelopes",
    "command_payloads",
    "delta_patches",
    "envelope_payload",
    "event_seeds",
    "http_seeds",
    "release_envelopes",
    "release_payloads",
    "repair_seeds",
    "state_seeds",
    "telemetry_seeds",
]

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # the trusted fleet/build key of every harness
PUBLIC = KEY.public_key()
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))  # a key no harness trusts
FLEET, DEVICE, GROUP = "lab", "pi-01", "canary"
NOW = 1_795_238_960.0  # the clock the command guard harness runs at (Unix seconds)
RELEASE_ID = make_release_id("digits", "1.1.0", "rpi4")
RELEASE_CHUNK = 1024  # bytes: the smallest chunk size release metadata allows, so seeds have several chunks


def envelope_payload(raw: bytes) -> bytes:
    """The payload bytes inside a signed envelope (commands and release metadata share the envelope)."""
    return base64.b64decode(json.loads(raw)["payload"])


# --- release metadata, chunks, repair requests -------------------------------------------------------------


def _payload(kind: PayloadKind, data: bytes, **delta: str) -> Payload:
    sha = hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + RELEASE_CHUNK] for i in range(0, len(data), RELEASE_CHUNK)] or [b""]
    return Payload(sha[:16], kind, sha, len(data), chunk_hashes_of(pieces), **delta)


@functools.cache
def _release_metas() -> tuple[ReleaseMetadata, ...]:
    target = bytes(range(256)) * 12  # 3 chunks
    full = _payload(PayloadKind.FULL, target)
    delta = _payload(
        PayloadKind.DELTA, b"EODELTA\0" + bytes(600), base_version="1.0.0",
        base_sha256=hashlib.sha256(b"old").hexdigest(), codec=Codec.TENSOR_PLANES.value,
    )
    common: dict[str, Any] = {
        "release_id": RELEASE_ID, "fleet": FLEET, "name": "digits", "version": "1.1.0", "profile": "rpi4",
        "created_at": NOW, "target_sha256": full.sha256, "target_size": full.size, "chunk_size": RELEASE_CHUNK,
    }
    return (
        ReleaseMetadata(payloads=(full, delta), **common),
        ReleaseMetadata(payloads=(full,), **common),
        ReleaseMetadata(payloads=(delta,), **{**common, "version": "2.0.0-rc.1+build.7", "release_id": "r-2"}),
    )


@functools.cache
def release_envelopes() -> tuple[bytes, ...]:
    """Signed release metadata: by the trusted key (each seed release) and by a key nobody trusts."""
    signed = tuple(sign_release(KEY, m) for m in _release_metas())
    return (*signed, sign_release(OTHER_KEY, _release_metas()[0]))


def release_payloads() -> tuple[bytes, ...]:
    """The JSON payloads of the trusted release envelopes (the signed-path harness signs what it is given)."""
    return tuple(envelope_payload(raw) for raw in release_envelopes()[:-1])


def chunk_seeds() -> tuple[bytes, ...]:
    pid = _release_metas()[0].payloads[0].id
    return (
        encode_chunk(RELEASE_ID, pid, 0, bytes(range(256)) * 4),
        encode_chunk(RELEASE_ID, pid, 2, b"last chunk"),
        encode_chunk("r", "00" * 8, 1_048_575, b""),
    )


def repair_seeds() -> tuple[bytes, ...]:
    pid = _release_metas()[0].payloads[0].id
    return (
        encode_repair(RELEASE_ID, pid, 3, [1]),
        encode_repair(RELEASE_ID, pid, 8, range(8)),
        encode_repair("r-2", pid, 100, [0, 7, 8, 63, 99]),
    )


def bitmap_seeds() -> tuple[bytes, ...]:
    """The bitmap harness's input: a little-endian u24 chunk count, then the bitmap bytes."""
    return tuple(
        count.to_bytes(3, "little") + encode_bitmap(missing, count)
        for count, missing in ((1, [0]), (8, [1, 7]), (13, [0, 12]), (100, range(0, 100, 3)))
    )


# --- commands -----------------------------------------------------------------------------------------------

_COMMAND_ARGS: dict[CommandName, dict[str, Any]] = {
    CommandName.STATUS: {},
    CommandName.PROMOTE_SHADOW: {},
    CommandName.DROP_SHADOW: {},
    CommandName.ROLLBACK: {},
    CommandName.SET_TELEMETRY_INTERVAL: {"interval_s": 15},
    CommandName.INSTALL_FROM_FILE: {"path": "/opt/models/digits.edgeops", "shadow": True},
    CommandName.OTA_UPDATE: {"release_id": RELEASE_ID},
}


@functools.cache
def command_envelopes() -> tuple[bytes, ...]:
    """One signed command of each kind (to the device or its group), plus one signed by an untrusted key."""
    out = []
    for i, (name, args) in enumerate(_COMMAND_ARGS.items()):
        target = f"device/{DEVICE}" if i % 2 else f"group/{GROUP}"
        out.append(
            sign_command(KEY, name=name, args=args, fleet=FLEET, target=target, now=NOW, ttl_s=300,
                         nonce=f"nonce-{i:04d}-{name.value}")
        )
    out.append(sign_command(OTHER_KEY, name="status", args={}, fleet=FLEET, target=f"device/{DEVICE}", now=NOW))
    return tuple(out)


def command_payloads() -> tuple[bytes, ...]:
    return tuple(envelope_payload(raw) for raw in command_envelopes()[:-1])


# --- delta patches ------------------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_RNG = np.random.default_rng(7)
_WEIGHTS = _RNG.normal(size=1024).astype(np.float32)
DELTA_OLD = _npy(_WEIGHTS)  # the base every delta harness applies patches to (4 KiB of tensor + .npy header)
_TUNED = _WEIGHTS.copy()
_TUNED[::7] += np.float32(0.01)
DELTA_NEW = _npy(_TUNED)


@functools.cache
def delta_patches() -> tuple[bytes, ...]:
    """Real patches from DELTA_OLD: tensor-planes (a fine-tune) and zstd-patch-from (to unrelated bytes)."""
    old = memoryview(DELTA_OLD)
    out = []
    for new in (DELTA_NEW, DELTA_OLD[:128] + bytes(range(256)) * 2):
        header = PatchHeader(
            Codec.TENSOR_PLANES.value, hashlib.sha256(DELTA_OLD).hexdigest(), len(DELTA_OLD),
            hashlib.sha256(new).hexdigest(), len(new),
        )
        made = encode_tensor_planes(old, memoryview(new), header, 19)
        if made is not None:
            out.append(made[0])
        generic = PatchHeader(Codec.PATCH_FROM.value, header.old_sha256, header.old_size, header.new_sha256,
                              header.new_size)
        out.append(encode_patch_from(old, memoryview(new), generic, 19))
    return tuple(out)


# --- artifacts ----------------------------------------------------------------------------------------------


def artifact_files() -> dict[str, bytes]:
    """The member files of the seed artifact: a stand-in model and golden data (no runtime reads them here)."""
    return {
        "golden/input.npy": _npy(np.zeros((1, 4), dtype=np.float32)),
        "golden/output.npy": _npy(np.ones((1, 2), dtype=np.float32)),
        "model.onnx": b"\x08\x07" + bytes(range(200)),
    }


@functools.cache
def artifact_manifest() -> bytes:
    files = artifact_files()
    tensor_in = TensorInfo("x", [1, 4], "float32", "int8", None, 0.05, -3, None)
    tensor_out = TensorInfo("y", [1, 2], "float32", "float32")
    manifest = Manifest(
        name="digits", version="1.1.0", profile="x86-gateway", format="onnx", precision="int8",
        runtime="onnxruntime", model_file="model.onnx", inputs=[tensor_in], outputs=[tensor_out],
        files=[FileEntry(n, hashlib.sha256(b).hexdigest(), len(b)) for n, b in sorted(files.items())],
        source={"file": "digits.onnx", "format": "onnx", "sha256": "0" * 64},
        data={"calib_sha256": "1" * 64, "eval_sha256": None, "train_sha256": None},
        toolchain={"edgeops": "0.1.0"}, runtime_config={"threads": 1}, recipe={"passes": []},
        gate={"passed": True}, golden=Golden({"x": "golden/input.npy"}, {"y": "golden/output.npy"}, 1, 1e-3, 1e-3),
        drift={"inputs": {}, "outputs": {}},
    )
    return manifest.to_bytes()


@functools.cache
def artifact_seeds() -> tuple[bytes, ...]:
    """The seed artifact signed by the trusted key, and the same one signed by a key nobody trusts."""
    manifest = artifact_manifest()
    return tuple(
        pack_artifact(manifest, sign_manifest(manifest, key), artifact_files()) for key in (KEY, OTHER_KEY)
    )


# --- fleet ingest, registry, local HTTP API ----------------------------------------------------------------


def telemetry_seeds() -> tuple[bytes, ...]:
    doc = {
        "device": DEVICE, "ts": NOW, "seq": 41, "model_version": "1.1.0", "interval_s": 60.0,
        "latency_ms": {"count": 1520, "p50": 0.41, "p95": 0.63, "p99": 0.97, "max": 2.1},
        "requests": 1520, "errors": 0, "fallback_answers": 0,
        "resources": {"cpu_percent": 7.5, "rss_mb": 61.2, "temperature_c": None, "load1": 0.4},
        "drift": {"level": "ok", "inputs": {"image": {"psi": 0.021, "level": "ok", "samples": 97280}},
                  "outputs": {"probs": {"psi": None, "level": "insufficient", "samples": 15}}},
        "health": "ok", "spool": {"pending": 0, "dropped": 0},
    }
    return (json.dumps(doc).encode(), json.dumps({"ts": 1, "seq": 0}).encode())


def event_seeds() -> tuple[bytes, ...]:
    docs = [
        {"device": DEVICE, "ts": NOW, "seq": 42, "type": "install.succeeded", "version": "1.1.0",
         "previous": "1.0.0", "source": "ota", "gate": {"passed": True, "check": None}},
        {"ts": NOW, "seq": 0, "type": "command.rejected", "cmd": "status", "reason": "expired"},
    ]
    return tuple(json.dumps(d).encode() for d in docs)


def state_seeds() -> tuple[bytes, ...]:
    online = {
        "device": DEVICE, "online": True, "ts": NOW, "fleet": FLEET, "profile": "rpi4", "groups": [GROUP],
        "agent_version": "0.1.0", "health": "ok", "pid": 812,
        "slots": {"active": "b", "previous": "a", "floor": "1.1.0", "versions": {"a": "1.0.0", "b": "1.1.0"}},
        "models": {"active": {"name": "digits", "version": "1.1.0", "slot": "b"}, "previous": None},
    }
    offline = {"device": DEVICE, "online": False, "reason": "connection lost"}
    return (json.dumps(online).encode(), json.dumps(offline).encode(), b"")


def http_seeds() -> tuple[bytes, ...]:
    """The HTTP harness's input: one selector byte (content type, schema), then the request body."""
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("image.npy", _npy(np.zeros((1, 4), dtype=np.float32)))
        z.writestr("ids.npy", _npy(np.arange(3, dtype=np.int8)))
    return (
        bytes([0]) + json.dumps({"input": [[0.5, 1, 2, 3]]}).encode(),
        bytes([4 * 2]) + json.dumps({"inputs": {"image": [[0.0] * 4], "ids": [1, 2, 3]}}).encode(),
        bytes([1]) + _npy(np.zeros((1, 4), dtype=np.float32)),
        bytes([1 + 4]) + _npy(np.asfortranarray(np.ones((2, 3), dtype=">i2"))),
        bytes([2 + 4 * 2]) + npz.getvalue(),
    )


# --- update trust (edgeops.trust) ---------------------------------------------------------------------------

TRUST_NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)  # the reference time of the fuzzed trust set
TRUST_ROLES = ("root", "timestamp", "snapshot", "targets", "release")


@functools.lru_cache(maxsize=1)
def trust_set() -> dict[str, Any]:
    """A genuine TUF set (root v1 and v2, timestamp, snapshot, targets listing one release) made once per machine
    in a fixed temp folder, so that the fuzzer's child processes and the seed writer share the same keys."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from edgeops.signing import load_private_key
    from edgeops.trust_repo import init_repo, load_repo

    final = Path(tempfile.gettempdir()) / f"edgeops-fuzz-trust-{os.getuid()}"
    if not (final / "metadata" / "root" / "2.json").exists():
        work = Path(tempfile.mkdtemp(prefix="edgeops-fuzz-trust-"))
        repo = init_repo(work / "trust", fleet="fuzz", now=TRUST_NOW)
        keys = repo.keys_dir
        repo.rotate("commands", [KEY.public_key()], [load_private_key(keys / "root-1.key"),
                                                    load_private_key(keys / "root-2.key")], now=TRUST_NOW)
        release = release_envelopes()[0]
        repo.add_release(_release_metas()[0].release_id, release, load_private_key(keys / "targets.key"),
                         now=TRUST_NOW)
        repo.publish_timestamp(load_private_key(keys / "timestamp.key"), now=TRUST_NOW)
        with contextlib.suppress(OSError):  # atomic: another process may have won the race
            os.rename(work / "trust", final)
        shutil.rmtree(work, ignore_errors=True)
    repo = load_repo(final)
    return {
        "root": repo.root_bytes(1),
        "root2": repo.root_bytes(2),
        "current": {r: repo.role_bytes(r) for r in ("timestamp", "snapshot", "targets")},
        "release_id": _release_metas()[0].release_id,
        "release": release_envelopes()[0],
    }


def trust_seeds() -> tuple[bytes, ...]:
    """Selector byte (the role the rest replaces) + the genuine bytes of that role."""
    t = trust_set()
    genuine = (t["root2"], t["current"]["timestamp"], t["current"]["snapshot"], t["current"]["targets"], t["release"])
    return tuple(bytes([i]) + raw for i, raw in enumerate(genuine))
