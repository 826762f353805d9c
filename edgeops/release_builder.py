"""Build a release from a target artifact and its base artifacts, into a release store (host side).

A release store is a directory with one sub-directory per release id (``{name}-{version}-{profile}``)::

    STORE/<release_id>/target.edgeops              the target artifact (the full payload)
    STORE/<release_id>/delta-<base sha256[:16]>.patch  one edgeops.delta patch per base (also a cache)
    STORE/<release_id>/release.json                a readable summary (sizes, ratios, codecs, signer key)
    STORE/<release_id>/release.signed              the signed release metadata (edgeops.release), written last

Guarantees: every file is written atomically (temp file, fsync, rename, fsync of the directory), and
``release.signed`` last, so a release whose ``release.signed`` exists is complete; an interrupted build leaves at
most whole files that the next build reuses or replaces. A patch is computed once per (base, target): a patch
file whose header names the same base and target hashes is reused. The same inputs and the same ``now`` give
the same bytes in every file. Payloads are read in chunks, never whole.

It does not publish anything (:mod:`edgeops.release_server` does) and keeps one release per release id: building
the same artifact for another fleet replaces the release in that store.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeops.artifact import read_unverified_manifest, verify_artifact
from edgeops.atomic_file import fsync_dir, write_bytes_atomic
from edgeops.delta import make_delta, read_patch_header
from edgeops.errors import (
    DeltaFormatError,
    DowngradeError,
    IntegrityError,
    OutputError,
    ProfileMismatch,
    ReleaseRejected,
)
from edgeops.manifest import parse_semver
from edgeops.release import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_PAYLOADS,
    MIN_CHUNK_SIZE,
    OtaReason,
    Payload,
    PayloadKind,
    ReleaseMetadata,
    make_release_id,
    parse_release,
    sign_release,
)
from edgeops.signing import key_id

__all__ = [
    "SIGNED_NAME",
    "SUMMARY_NAME",
    "TARGET_NAME",
    "PublishedRelease",
    "build_release",
    "delta_file_name",
    "load_release",
    "load_releases",
]

TARGET_NAME = "target.edgeops"
SIGNED_NAME = "release.signed"
SUMMARY_NAME = "release.json"
_READ_BLOCK = 1 << 20  # bytes read at a time when hashing or copying


def delta_file_name(base_sha256: str) -> str:
    return f"delta-{base_sha256[:16]}.patch"


@dataclass(frozen=True)
class PublishedRelease:
    """A built release: its metadata, the signed bytes devices receive, and where each payload's file lies."""

    meta: ReleaseMetadata
    signed: bytes  # the signed metadata envelope, published retained as is
    directory: Path
    payload_files: dict[str, Path]  # payload id -> file holding exactly that payload's bytes

    def payload_file(self, payload_id: str) -> Path:
        return self.payload_files[payload_id]


@dataclass(frozen=True)
class _Artifact:
    path: Path
    name: str
    version: str
    profile: str
    sha256: str
    size: int


def _blocks(path: Path, size: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(size):
            yield block


def _sha256_and_size(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for block in _blocks(path, _READ_BLOCK):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def _describe(path: Path, pubkey: Ed25519PublicKey | None) -> _Artifact:
    manifest = verify_artifact(path, [pubkey]).manifest if pubkey is not None else read_unverified_manifest(path)
    return _Artifact(path, manifest.name, manifest.version, manifest.profile, *_sha256_and_size(path))


def _check_base(base: _Artifact, target: _Artifact) -> None:
    if (base.name, base.profile) != (target.name, target.profile):
        raise ProfileMismatch(
            f"base {base.path} is {base.name} for profile {base.profile}, the target is {target.name} for "
            f"{target.profile}: a delta base must be an earlier version of the same model and profile"
        )
    if parse_semver(base.version) >= parse_semver(target.version):
        raise DowngradeError(
            f"base {base.path} is version {base.version}, not older than the target {target.version}"
        )


def _payload_of(path: Path, chunk_size: int, base: _Artifact | None = None, codec: str | None = None) -> Payload:
    digest, size, hashes = hashlib.sha256(), 0, []
    for block in _blocks(path, chunk_size):
        digest.update(block)
        size += len(block)
        hashes.append(hashlib.sha256(block).digest())
    if not hashes:  # an empty file is one empty chunk
        hashes.append(hashlib.sha256(b"").digest())
    sha = digest.hexdigest()
    if base is None:
        return Payload(sha[:16], PayloadKind.FULL, sha, size, tuple(hashes))
    return Payload(sha[:16], PayloadKind.DELTA, sha, size, tuple(hashes), base.version, base.sha256, codec)


def _copy_atomic(src: Path, dst: Path, sha256: str) -> None:
    """Copy ``src`` to ``dst`` atomically, streaming, unless ``dst`` already holds those bytes.
    Raises OutputError (the temp file removed) when ``dst`` cannot be written."""
    if dst.is_file() and _sha256_and_size(dst)[0] == sha256:
        return
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {dst.parent}: {exc.strerror}") from exc
    tmp = Path(name)
    try:
        with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, _READ_BLOCK)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot copy {src} to {dst}: {exc.strerror}") from exc
    except BaseException:  # Ctrl-C: leave no temp file behind
        tmp.unlink(missing_ok=True)
        raise


def _cached_codec(patch: Path, base: _Artifact, target: _Artifact) -> str | None:
    """The codec of an existing patch made from ``base`` to ``target``, or None when there is none to reuse."""
    if not patch.is_file():
        return None
    try:
        header = read_patch_header(patch)
    except (DeltaFormatError, OSError):
        return None
    if (header.old_sha256, header.new_sha256) != (base.sha256, target.sha256):
        return None
    return str(header.codec)


def _delta(base: _Artifact, target: _Artifact, directory: Path, progress: Callable[[str], None]) -> tuple[Path, str]:
    """(patch file, codec) of the delta from ``base`` to ``target``, computed only when not cached."""
    patch = directory / delta_file_name(base.sha256)
    codec = _cached_codec(patch, base, target)
    if codec is not None:
        progress(f"delta from {base.version}: reusing {patch.name}")
        return patch, codec
    progress(f"delta from {base.version}: computing")
    info = make_delta(base.path, target.path, patch)  # written atomically
    progress(f"delta from {base.version}: {info.patch_size} bytes ({info.codec}) in {info.seconds:.2f} s")
    return patch, str(info.codec)


def _summary(meta: ReleaseMetadata, key: Ed25519PublicKey, files: dict[str, Path], skipped: list[Any]) -> bytes:
    raw_key = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = {
        "release_id": meta.release_id,
        "fleet": meta.fleet,
        "name": meta.name,
        "version": meta.version,
        "profile": meta.profile,
        "created_at": meta.created_at,
        "target": {"sha256": meta.target_sha256, "size": meta.target_size},
        "chunk_size": meta.chunk_size,
        "signer": {"keyid": key_id(key), "public_key": base64.b64encode(raw_key).decode()},
        "payloads": [
            {
                "id": p.id,
                "kind": p.kind.value,
                "file": files[p.id].name,
                "size": p.size,
                "sha256": p.sha256,
                "chunk_count": p.chunk_count,
                "ratio": round(p.size / meta.target_size, 6),
                "base_version": p.base_version,
                "base_sha256": p.base_sha256,
                "codec": p.codec,
            }
            for p in meta.payloads
        ],
        "skipped": skipped,
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def build_release(
    target: Path,
    bases: Sequence[Path],
    *,
    fleet: str,
    key: Ed25519PrivateKey,
    store: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pubkey: Ed25519PublicKey | None = None,
    now: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> PublishedRelease:
    """Build (or rebuild) the release of ``target`` with one delta per base into ``store``; sign it with ``key``.

    With ``pubkey``, the target and every base must verify against it; without, only their structure is read.
    A delta that is not smaller than the full artifact is left out (devices on that base take the full one).

    Raises ProfileMismatch (a base of another model or profile), DowngradeError (a base not older than the
    target), ArtifactFormatError/SignatureError/IntegrityError (a bad artifact), OutputError (the store cannot be
    written), ValueError (bad fleet, chunk size, too many bases, or a name/version/profile that makes no release
    id), OSError (an artifact cannot be read).
    """
    say = progress or (lambda _msg: None)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    tgt = _describe(target, pubkey)
    release_id = make_release_id(tgt.name, tgt.version, tgt.profile)
    unique: dict[str, _Artifact] = {}
    for path in bases:
        base = _describe(path, pubkey)
        _check_base(base, tgt)
        if base.sha256 in unique:
            say(f"base {path} is the same file as {unique[base.sha256].path}: one delta for both")
        unique.setdefault(base.sha256, base)
    if len(unique) + 1 > MAX_PAYLOADS:
        raise ValueError(f"at most {MAX_PAYLOADS - 1} bases per release, got {len(unique)}")
    say(f"release {release_id}: target {tgt.name} {tgt.version} for {tgt.profile}, {tgt.size} bytes")
    directory = store / release_id
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {directory}: {exc.strerror}") from exc
    copy = directory / TARGET_NAME
    _copy_atomic(target, copy, tgt.sha256)
    tgt_copy = _Artifact(copy, tgt.name, tgt.version, tgt.profile, tgt.sha256, tgt.size)
    full = _payload_of(copy, chunk_size)
    payloads, files, skipped = [full], {full.id: copy}, []
    for base in sorted(unique.values(), key=lambda b: (parse_semver(b.version), b.sha256)):
        patch, codec = _delta(base, tgt_copy, directory, say)
        delta = _payload_of(patch, chunk_size, base, codec)
        if delta.size >= full.size:
            say(f"delta from {base.version} ({delta.size} bytes) is not smaller than the full artifact: left out")
            skipped.append({"base_version": base.version, "base_sha256": base.sha256, "size": delta.size})
            continue
        payloads.append(delta)
        files[delta.id] = patch
    meta = ReleaseMetadata(
        release_id=release_id,
        fleet=fleet,
        name=tgt.name,
        version=tgt.version,
        profile=tgt.profile,
        created_at=float(time.time() if now is None else now),
        target_sha256=tgt.sha256,
        target_size=tgt.size,
        chunk_size=chunk_size,
        payloads=tuple(payloads),
    )
    signed = sign_release(key, meta)
    write_bytes_atomic(directory / SUMMARY_NAME, _summary(meta, key.public_key(), files, skipped))
    write_bytes_atomic(directory / SIGNED_NAME, signed)
    return PublishedRelease(meta, signed, directory, files)


def _stored_signer(directory: Path) -> list[Ed25519PublicKey]:
    """The public key the build recorded in release.json (for loading a store without a trusted key)."""
    try:
        doc = json.loads((directory / SUMMARY_NAME).read_bytes())
        raw = base64.b64decode(doc["signer"]["public_key"], validate=True)
        return [Ed25519PublicKey.from_public_bytes(raw)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReleaseRejected(OtaReason.MALFORMED.value, f"{directory / SUMMARY_NAME}: no readable signer") from exc


def load_release(directory: Path, trusted: Sequence[Ed25519PublicKey] | None) -> PublishedRelease:
    """The release in one store directory; raises as :func:`load_releases`."""
    signed = (directory / SIGNED_NAME).read_bytes()
    keys = list(trusted) if trusted is not None else _stored_signer(directory)
    try:
        meta = parse_release(signed, keys)
    except ReleaseRejected as exc:
        raise ReleaseRejected(exc.reason, f"{directory / SIGNED_NAME}: {exc.detail}") from None
    if meta.release_id != directory.name:
        raise ReleaseRejected(OtaReason.MALFORMED.value, f"{directory} holds release {meta.release_id}")
    files = {}
    for p in meta.payloads:
        path = directory / (TARGET_NAME if p.kind is PayloadKind.FULL else delta_file_name(p.base_sha256 or ""))
        size = path.stat().st_size if path.is_file() else None
        if size != p.size:
            raise IntegrityError(f"{path}: {size} bytes on disk, the release announces {p.size}")
        files[p.id] = path
    return PublishedRelease(meta, signed, directory, files)


def load_releases(store: Path, trusted: Sequence[Ed25519PublicKey] | None) -> list[PublishedRelease]:
    """Every complete release in ``store`` (those with a ``release.signed``), in release id order.

    With ``trusted``, each release's metadata must be signed by one of those keys; with None, by the key its own
    build recorded (a check of the store's integrity, not of who built it). A missing store is empty.
    Raises ReleaseRejected (metadata that does not verify or parse), IntegrityError (a payload file whose size
    is not the announced one), OSError (a file that cannot be read).
    """
    if not store.is_dir():
        return []
    dirs = sorted(d for d in store.iterdir() if (d / SIGNED_NAME).is_file())
    return [load_release(d, trusted) for d in dirs]
