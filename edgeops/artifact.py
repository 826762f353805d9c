"""The edgeops artifact: one canonical, uncompressed POSIX ustar file per model build (light core).

Layout (in this order, nothing else)::

    manifest.json      the manifest (see :mod:`edgeops.manifest`), the bytes that are signed
    manifest.sig       {"signatures": [{"keyid": <sha256 of raw pubkey>, "sig": <base64 Ed25519>}]}
    <files...>         model file(s) and golden data, in strictly ascending name order

Every header is exactly the one :func:`pack_artifact` writes for that name and size (mode 0644, uid/gid 0,
mtime 0, no user names), data padding is zero, and the file ends with exactly two zero blocks. The reader
rejects anything else, so *every* byte of the file is checked: headers and padding by canonical form, the
manifest by its signature, the other files by the sha256 the signed manifest lists. The file is a plain tar
(``tar -tvf`` lists it) and, being uncompressed, deltas between versions stay small.

Guarantees: ``verify_artifact`` returns only when all of the above holds for a trusted key; it raises
:class:`ArtifactFormatError`, :class:`SignatureError` or :class:`IntegrityError` (all ``UntrustedInput``)
otherwise. Reading is bounded: at most ``MAX_MEMBERS`` members and ``max_bytes`` in all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeops import bounded_json
from edgeops.errors import ArtifactFormatError, IntegrityError, SignatureError
from edgeops.manifest import Manifest
from edgeops.signing import key_id, sign, verify_signature

__all__ = [
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "Member",
    "VerifiedArtifact",
    "pack_artifact",
    "read_members",
    "read_unverified_manifest",
    "sign_manifest",
    "verify_artifact",
]

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MEMBERS = 256
MAX_SIGNATURE_BYTES = 64 * 1024
DEFAULT_MAX_BYTES = 4 * 1024**3  # 4 GiB
BLOCK = 512
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._\-]*(/[A-Za-z0-9_][A-Za-z0-9._\-]*)*$")


def _check_name(name: str) -> None:
    if len(name) > 99 or not _NAME_RE.match(name) or ".." in name.split("/"):
        raise ArtifactFormatError(f"invalid member name {name!r}")


def _header(name: str, size: int) -> bytes:
    """The canonical ustar header for a regular file ``name`` of ``size`` bytes."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name.encode("ascii")
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _padding(size: int) -> int:
    return -size % BLOCK


def pack_artifact(manifest: bytes, signature: bytes, files: Mapping[str, bytes]) -> bytes:
    """Serialise an artifact canonically. Same inputs → same bytes."""
    members: list[tuple[str, bytes]] = [(MANIFEST_NAME, manifest), (SIGNATURE_NAME, signature)]
    for name in sorted(files):
        if name in (MANIFEST_NAME, SIGNATURE_NAME):
            raise RuntimeError(f"{name} is reserved")
        _check_name(name)
        members.append((name, files[name]))
    if len(members) > MAX_MEMBERS:
        raise RuntimeError(f"an artifact holds at most {MAX_MEMBERS} members")
    out = bytearray()
    for name, data in members:
        out += _header(name, len(data)) + data + b"\0" * _padding(len(data))
    out += b"\0" * (2 * BLOCK)
    return bytes(out)


def sign_manifest(manifest: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The ``manifest.sig`` bytes for ``manifest`` signed by ``private_key``."""
    entry = {"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(sign(private_key, manifest)).decode()}
    return (json.dumps({"signatures": [entry]}, indent=1, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the data, from the start of the file
    size: int


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ArtifactFormatError(f"truncated artifact (in {what})")
    return data


def _parse_header(block: bytes) -> tuple[str, int]:
    raw_name = block[0:100].split(b"\0", 1)[0]
    try:
        name = raw_name.decode("ascii")
        size = int(block[124:135], 8)
    except (UnicodeDecodeError, ValueError):
        raise ArtifactFormatError("malformed member header") from None
    _check_name(name)
    if size < 0 or block != _header(name, size):  # "%011o" % -n is "-000..." and would round-trip
        raise ArtifactFormatError(f"non-canonical header for {name!r}")
    return name, size


def read_members(f: BinaryIO, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Member]:
    """Walk the file's structure and check its canonical form (not the hashes or the signature).

    Raises ArtifactFormatError on any deviation: bad or non-canonical header, non-zero padding, wrong member
    order, duplicates, too many members, oversize, missing end blocks or trailing bytes.
    """
    members: list[Member] = []
    pos = 0
    while True:
        block = _read_exact(f, BLOCK, "header")
        if block == b"\0" * BLOCK:
            if _read_exact(f, BLOCK, "end of archive") != b"\0" * BLOCK or f.read(1):
                raise ArtifactFormatError("bytes after the end of the artifact")
            break
        name, size = _parse_header(block)
        pos += BLOCK
        if pos + size > max_bytes or len(members) >= MAX_MEMBERS:
            raise ArtifactFormatError("artifact exceeds its size or member limit")
        _check_order(members, name)
        members.append(Member(name, pos, size))
        f.seek(size, 1)
        pad = _padding(size)
        if _read_exact(f, pad, name) != b"\0" * pad:
            raise ArtifactFormatError(f"non-zero padding after {name!r}")
        pos += size + pad
    if len(members) < 2:
        raise ArtifactFormatError("artifact has no manifest or no signature")
    return members


def _check_order(members: Sequence[Member], name: str) -> None:
    index = len(members)
    expected = {0: MANIFEST_NAME, 1: SIGNATURE_NAME}.get(index)
    if expected is not None and name != expected:
        raise ArtifactFormatError(f"member {index} must be {expected}, found {name!r}")
    if expected is None and (name in (MANIFEST_NAME, SIGNATURE_NAME) or (index > 2 and name <= members[-1].name)):
        raise ArtifactFormatError(f"member {name!r} is out of order or repeated")


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact whose structure, signature and file hashes all checked out."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    keyid: str
    members: tuple[Member, ...]

    def read(self, name: str) -> bytes:
        """The bytes of member ``name`` (re-read from disk; callers that need a guarantee re-verify)."""
        for m in self.members:
            if m.name == name:
                with self.path.open("rb") as f:
                    f.seek(m.offset)
                    return _read_exact(f, m.size, name)
        raise KeyError(name)


def _parse_signatures(raw: bytes) -> list[tuple[str, bytes]]:
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise ArtifactFormatError("signature file too large")
    try:
        doc = bounded_json.loads(raw)
        return [(str(s["keyid"]), base64.b64decode(s["sig"], validate=True)) for s in doc["signatures"]]
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
        raise ArtifactFormatError("malformed manifest.sig") from None


def _check_signature(manifest: bytes, sig_raw: bytes, trusted: Sequence[Ed25519PublicKey]) -> str:
    sigs = _parse_signatures(sig_raw)
    if not sigs:
        raise SignatureError("artifact is not signed")
    by_id = {key_id(k): k for k in trusted}
    for kid, sig in sigs:
        if kid in by_id:
            verify_signature(by_id[kid], manifest, sig)
            return kid
    raise SignatureError("artifact is not signed by a trusted key")


def _check_files(f: BinaryIO, manifest: Manifest, members: Sequence[Member]) -> None:
    listed = {e.path: e for e in manifest.files}
    present = {m.name: m for m in members[2:]}
    if set(listed) != set(present):
        extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
        raise IntegrityError(f"artifact files differ from the manifest (extra {extra}, missing {missing})")
    for name, member in present.items():
        entry = listed[name]
        if member.size != entry.size:
            raise IntegrityError(f"{name}: size {member.size} != manifest {entry.size}")
        f.seek(member.offset)
        digest, left = hashlib.sha256(), member.size
        while left:
            chunk = _read_exact(f, min(left, 1 << 20), name)
            digest.update(chunk)
            left -= len(chunk)
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(f"{name}: sha256 does not match the signed manifest")


def verify_artifact(
    path: Path, trusted_keys: Sequence[Ed25519PublicKey], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> VerifiedArtifact:
    """Check structure, signature (by one of ``trusted_keys``) and every file hash of the artifact at ``path``.

    Raises ArtifactFormatError, SignatureError or IntegrityError; OSError when the file cannot be opened.
    """
    with path.open("rb") as f:
        members = read_members(f, max_bytes=max_bytes)
        f.seek(members[0].offset)
        manifest_bytes = _read_exact(f, members[0].size, MANIFEST_NAME)
        f.seek(members[1].offset)
        sig_raw = _read_exact(f, members[1].size, SIGNATURE_NAME)
        kid = _check_signature(manifest_bytes, sig_raw, trusted_keys)
        manifest = Manifest.from_bytes(manifest_bytes)
        _check_files(f, manifest, members)
    return VerifiedArtifact(path, manifest, manifest_bytes, kid, tuple(members))


def read_unverified_manifest(path: Path) -> Manifest:
    """The manifest of an artifact, structure-checked but NOT signature-checked (for ``inspect``)."""
    with path.open("rb") as f:
        members = read_members(f)
        f.seek(members[0].offset)
        return Manifest.from_bytes(_read_exact(f, members[0].size, MANIFEST_NAME))
