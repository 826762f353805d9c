"""The fleet's TUF repository on the host: keys, root rotation, targets per release, snapshot + timestamp.

Layout of a trust directory (``edgeops trust init --dir trust``)::

    trust.json                 fleet name and expiry windows
    keys/root-{i}.key|.pub     root keys (offline material: move the .key files off the build machine)
    keys/targets.key|.pub      the release key: signs targets.json and every release's metadata envelope
    keys/timestamp.key|.pub    online: signs snapshot.json and timestamp.json (the fleet service holds it)
    keys/commands.key|.pub     fleet commands (``fleet serve --key``) unless another key was named at init
    keys/artifacts.key|.pub    the build key of .edgeops artifacts unless another key was named at init
    metadata/root/{n}.json     every root version, each signed by a threshold of the previous root's keys and its own
    metadata/targets.json, metadata/snapshot.json, metadata/timestamp.json   the current ones

Every file is written atomically (temp file, fsync, rename). Signing checks its own result with the device's
verifier (:class:`edgeops.trust.TrustSession`), so the repository never publishes metadata a device would refuse for
a reason the repository could have seen (missing signatures, a version that goes back).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Role, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgeops.atomic_file import write_bytes_atomic
from edgeops.errors import ConfigError, OutputError, ReleaseRejected
from edgeops.protocol import validate_segment
from edgeops.signing import load_private_key, load_public_key
from edgeops.trust import (
    ARTIFACTS_ROLE,
    COMMANDS_ROLE,
    EDGEOPS_ROLES_FIELD,
    TrustSession,
    release_target,
    trust_topics,
)

log = logging.getLogger(__name__)

__all__ = ["ROLES", "TrustFeed", "TrustRepo", "init_repo", "load_repo"]

ROLES = (Root.type, Targets.type, Timestamp.type, COMMANDS_ROLE, ARTIFACTS_ROLE)  # snapshot shares timestamp's keys
_SERIALIZER = JSONSerializer(compact=True)
_SETTINGS = "trust.json"


def _utc(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).replace(microsecond=0)


def _sslib(public: Ed25519PublicKey) -> SSlibKey:
    return SSlibKey.from_crypto(public)


def _write_key(directory: Path, name: str) -> Ed25519PublicKey:
    """A new Ed25519 key pair as ``name.key`` (PKCS#8 PEM, 0600) and ``name.pub``; returns the public key."""
    key = Ed25519PrivateKey.generate()
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_bytes_atomic(directory / f"{name}.key", pem_key, mode=0o600)
    pub = key.public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_bytes_atomic(directory / f"{name}.pub", pem)
    return pub


@dataclass(frozen=True)
class Settings:
    fleet: str
    root_expiry_days: int = 365
    targets_expiry_days: int = 365
    timestamp_expiry_s: int = 86400  # the freeze window: a device refuses updates this long after the last refresh
    snapshot_expiry_days: int = 30


class TrustRepo:
    """One trust directory (see the module docstring). Methods raise ConfigError for a bad directory or keys
    that do not match the roles, OutputError when a file cannot be written."""

    def __init__(self, directory: Path, settings: Settings) -> None:
        self.directory = Path(directory)
        self.settings = settings

    # -- paths and reading ---------------------------------------------------------------------------------
    @property
    def keys_dir(self) -> Path:
        return self.directory / "keys"

    @property
    def metadata_dir(self) -> Path:
        return self.directory / "metadata"

    def root_path(self, version: int) -> Path:
        return self.metadata_dir / "root" / f"{version}.json"

    def role_path(self, role: str) -> Path:
        return self.metadata_dir / f"{role}.json"

    def root_versions(self) -> list[int]:
        found = [int(p.stem) for p in (self.metadata_dir / "root").glob("*.json") if p.stem.isdigit()]
        return sorted(found)

    def root_bytes(self, version: int | None = None) -> bytes:
        version = version if version is not None else self.root_versions()[-1]
        return self._read(self.root_path(version))

    def role_bytes(self, role: str) -> bytes | None:
        path = self.role_path(role)
        return path.read_bytes() if path.exists() else None

    def root(self) -> Root:
        return Metadata[Root].from_bytes(self.root_bytes()).signed

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None

    def _load(self, role: str) -> Metadata[Any]:
        return Metadata.from_bytes(self._read(self.role_path(role)))

    def retained_messages(self) -> dict[str, bytes]:
        """topic → bytes of every trust message devices need, in publishing order: every root version, then
        targets, snapshot, timestamp (so a device never sees a timestamp before what it names)."""
        topics = trust_topics(self.settings.fleet)
        out = {topics.root(v): self.root_bytes(v) for v in self.root_versions()}
        for role, topic in ((Targets.type, topics.targets), (Snapshot.type, topics.snapshot),
                            (Timestamp.type, topics.timestamp)):
            raw = self.role_bytes(role)
            if raw is not None:
                out[topic] = raw
        return out

    # -- signing helpers -----------------------------------------------------------------------------------
    def _sign(self, md: Metadata[Any], keys: Sequence[Ed25519PrivateKey], role: str) -> bytes:
        root = self.root() if role != Root.type else md.signed
        allowed = self._keyids(root, role)
        used = 0
        for key in keys:
            signer = CryptoSigner(key)
            if signer.public_key.keyid in allowed or role == Root.type:
                md.sign(signer, append=True)
                used += 1
        if used == 0:
            raise ConfigError(f"none of the keys given is a {role} key of root v{root.version}")
        return md.to_bytes(_SERIALIZER)

    @staticmethod
    def _keyids(root: Root, role: str) -> list[str]:
        if role in (Root.type, Targets.type, Timestamp.type, Snapshot.type):
            return list(root.roles[role].keyids)
        return list(root.unrecognized_fields[EDGEOPS_ROLES_FIELD][role]["keyids"])

    def _check(self, timestamp: bytes | None = None, *, now: dt.datetime | None = None) -> None:
        """Run the device's verifier over root v1 → newest, timestamp, snapshot, targets. Raises ConfigError with
        the device's reason when a device would refuse the result."""
        try:
            session = TrustSession(self.root_bytes(1), now=_utc(now))
            session.update_roots({v: self.root_bytes(v) for v in self.root_versions()})
            session.refresh(
                timestamp=timestamp or self.role_bytes(Timestamp.type),
                snapshot=self.role_bytes(Snapshot.type),
                targets=self.role_bytes(Targets.type),
            )
        except ReleaseRejected as exc:
            hint = " (re-sign: trust rotate --targets-key)" if "targets" in exc.detail else ""
            raise ConfigError(f"devices would refuse this metadata: {exc.detail}{hint}") from None

    # -- operations ----------------------------------------------------------------------------------------
    def add_release(
        self, release_id: str, signed_metadata: bytes, targets_key: Ed25519PrivateKey, *, now: dt.datetime | None = None
    ) -> int:
        """List a release in targets.json (replacing an earlier listing of the same id); returns the new targets
        version. Snapshot and timestamp follow with :meth:`publish_timestamp`."""
        path = release_target(release_id)
        return self.resign_targets(targets_key, now=now, add={path: TargetFile.from_data(path, signed_metadata,
                                                                                          ["sha256"])})

    def resign_targets(
        self,
        targets_key: Ed25519PrivateKey,
        *,
        now: dt.datetime | None = None,
        add: dict[str, TargetFile] | None = None,
    ) -> int:
        """Sign targets.json again (version + 1, fresh expiry) with ``targets_key``, adding ``add``; returns the
        version. Raises ConfigError when the key is not a targets key of the newest root."""
        md = self._load(Targets.type)
        targets: Targets = md.signed
        targets.targets.update(add or {})
        targets.version += 1
        targets.expires = _utc(now) + dt.timedelta(days=self.settings.targets_expiry_days)
        md.signatures.clear()
        write_bytes_atomic(self.role_path(Targets.type), self._sign(md, [targets_key], Targets.type))
        return int(targets.version)

    def timestamp_due(self, *, now: dt.datetime | None = None) -> bool:
        """True when snapshot/timestamp must be re-signed: targets changed, or the timestamp is past half its
        window (the fleet service re-signs ahead of expiry so devices never see it lapse)."""
        ts_raw, snap_raw = self.role_bytes(Timestamp.type), self.role_bytes(Snapshot.type)
        if ts_raw is None or snap_raw is None:
            return True
        ts: Timestamp = Metadata[Timestamp].from_bytes(ts_raw).signed
        snap: Snapshot = Metadata[Snapshot].from_bytes(snap_raw).signed
        targets_version = self._load(Targets.type).signed.version
        half = dt.timedelta(seconds=self.settings.timestamp_expiry_s / 2)
        return snap.meta["targets.json"].version != targets_version or ts.expires - _utc(now) < half

    def publish_timestamp(self, timestamp_key: Ed25519PrivateKey, *, now: dt.datetime | None = None) -> bytes:
        """Sign a new snapshot (when targets changed) and a new timestamp with a fresh expiry; returns the
        timestamp bytes."""
        now = _utc(now)
        targets_raw = self._read(self.role_path(Targets.type))
        targets_version = Metadata[Targets].from_bytes(targets_raw).signed.version
        snap_raw = self.role_bytes(Snapshot.type)
        snap_md: Metadata[Snapshot] | None = None if snap_raw is None else Metadata.from_bytes(snap_raw)
        half_snapshot = dt.timedelta(days=self.settings.snapshot_expiry_days / 2)
        if (
            snap_md is None
            or snap_md.signed.meta["targets.json"].version != targets_version
            or snap_md.signed.expires - now < half_snapshot
        ):
            version = 1 if snap_md is None else snap_md.signed.version + 1
            snap_md = Metadata(
                Snapshot(
                    version=version,
                    expires=now + dt.timedelta(days=self.settings.snapshot_expiry_days),
                    meta={"targets.json": MetaFile.from_data(targets_version, targets_raw, ["sha256"])},
                )
            )
            snap_raw = self._sign(snap_md, [timestamp_key], Snapshot.type)
            write_bytes_atomic(self.role_path(Snapshot.type), snap_raw)
        assert snap_raw is not None
        ts_raw = self.role_bytes(Timestamp.type)
        ts_version = 1 if ts_raw is None else Metadata[Timestamp].from_bytes(ts_raw).signed.version + 1
        ts_md = Metadata(
            Timestamp(
                version=ts_version,
                expires=now + dt.timedelta(seconds=self.settings.timestamp_expiry_s),
                snapshot_meta=MetaFile.from_data(snap_md.signed.version, snap_raw, ["sha256"]),
            )
        )
        raw = self._sign(ts_md, [timestamp_key], Timestamp.type)
        self._check(raw, now=now)
        write_bytes_atomic(self.role_path(Timestamp.type), raw)
        return raw

    def rotate(
        self,
        role: str,
        new_keys: Sequence[Ed25519PublicKey],
        root_keys: Sequence[Ed25519PrivateKey],
        *,
        threshold: int = 1,
        targets_key: Ed25519PrivateKey | None = None,
        now: dt.datetime | None = None,
    ) -> int:
        """Replace ``role``'s keys with ``new_keys`` in a new root version; returns it. With ``targets_key`` (the
        new release key, when ``role`` is targets) targets.json is re-signed at once, so updates do not stall.

        ``root_keys`` sign the new root: a threshold of the current root keys, and — when the root keys
        themselves change — a threshold of the new ones. Raises ConfigError when the result would not verify on a
        device (too few signatures) or the role is unknown; nothing is written then.
        """
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        if not new_keys or not 1 <= threshold <= len(new_keys):
            raise ConfigError(f"a {role} role needs 1..{len(new_keys)} as threshold and at least one key")
        current = self.root_versions()[-1]
        md: Metadata[Root] = Metadata.from_bytes(self.root_bytes(current))
        root = md.signed
        keyids = [_sslib(k).keyid for k in new_keys]
        for key in new_keys:
            sk = _sslib(key)
            root.keys[sk.keyid] = sk
        targets = [role] if role != Timestamp.type else [Timestamp.type, Snapshot.type]
        for r in targets:
            if r in root.roles:
                root.roles[r] = Role(keyids, threshold)
            else:
                root.unrecognized_fields[EDGEOPS_ROLES_FIELD][r] = {"keyids": keyids, "threshold": threshold}
        used = {k for r in root.roles.values() for k in r.keyids}
        used |= {k for spec in root.unrecognized_fields[EDGEOPS_ROLES_FIELD].values() for k in spec["keyids"]}
        root.keys = {k: v for k, v in root.keys.items() if k in used}
        root.version = current + 1
        root.expires = _utc(now) + dt.timedelta(days=self.settings.root_expiry_days)
        md.signatures.clear()
        raw = self._sign(md, root_keys, Root.type)
        try:
            session = TrustSession(self.root_bytes(current), now=_utc(now))
            session.update_roots({current + 1: raw})
        except ReleaseRejected as exc:
            raise ConfigError(f"root v{current + 1} would not be trusted by devices: {exc.detail}") from None
        write_bytes_atomic(self.root_path(current + 1), raw)
        if targets_key is not None:
            self.resign_targets(targets_key, now=now)
        return current + 1


class TrustFeed:
    """The trust metadata a release server keeps published for one fleet; with the online timestamp key it
    re-signs snapshot + timestamp whenever :meth:`TrustRepo.timestamp_due` says so (targets changed, or half the
    freeze window has passed)."""

    def __init__(self, directory: Path, fleet: str, timestamp_key: Path | None = None) -> None:
        """Raises ConfigError when ``directory`` is not a trust repository of ``fleet``; KeyFileError for a bad key."""
        self.repo = load_repo(directory)
        if self.repo.settings.fleet != fleet:
            raise ConfigError(f"{directory} is the trust directory of fleet {self.repo.settings.fleet}, not {fleet}")
        self._key = load_private_key(timestamp_key) if timestamp_key is not None else None

    def messages(self, *, now: dt.datetime | None = None) -> dict[str, bytes]:
        """topic → retained bytes, re-signing the timestamp first when due. Raises ConfigError when the result
        would be refused by devices (e.g. targets signed by a rotated-out key)."""
        if self._key is not None and self.repo.timestamp_due(now=now):
            self.repo.publish_timestamp(self._key, now=now)
            log.info("trust: snapshot and timestamp re-signed")
        return self.repo.retained_messages()


def _private_keys(paths: Sequence[Path]) -> list[Ed25519PrivateKey]:
    return [load_private_key(p) for p in paths]


def init_repo(
    directory: Path,
    *,
    fleet: str,
    root_keys: int = 3,
    root_threshold: int = 2,
    commands_key: Path | None = None,
    artifacts_key: Path | None = None,
    settings: dict[str, int] | None = None,
    now: dt.datetime | None = None,
) -> TrustRepo:
    """Create a trust directory: keys, root v1, an empty targets.json. Snapshot and timestamp follow with
    :meth:`TrustRepo.publish_timestamp`. ``commands_key``/``artifacts_key`` are public key files of keys that
    exist already (e.g. ``keys/signing.pub``); new keys are generated otherwise.

    Raises OutputError when the directory holds a repository already, ConfigError for bad numbers or names.
    """
    directory = Path(directory)
    validate_segment(fleet, "fleet")
    if (directory / _SETTINGS).exists():
        raise OutputError(f"{directory} holds a trust repository already (refusing to overwrite its keys)")
    if not 1 <= root_threshold <= root_keys:
        raise ConfigError(f"root threshold must be 1..{root_keys}, got {root_threshold}")
    cfg = Settings(fleet=fleet, **(settings or {}))
    repo = TrustRepo(directory, cfg)
    keys_dir = repo.keys_dir
    keys_dir.mkdir(parents=True, exist_ok=True)
    (repo.metadata_dir / "root").mkdir(parents=True, exist_ok=True)
    roots = [_write_key(keys_dir, f"root-{i}") for i in range(1, root_keys + 1)]
    pubs: dict[str, list[Ed25519PublicKey]] = {Root.type: roots}
    pubs[Targets.type] = [_write_key(keys_dir, "targets")]
    pubs[Timestamp.type] = [_write_key(keys_dir, "timestamp")]
    pubs[COMMANDS_ROLE] = [load_public_key(commands_key) if commands_key else _write_key(keys_dir, "commands")]
    pubs[ARTIFACTS_ROLE] = [load_public_key(artifacts_key) if artifacts_key else _write_key(keys_dir, "artifacts")]
    keys: dict[str, Any] = {}
    ids: dict[str, list[str]] = {}
    for role, role_pubs in pubs.items():
        ids[role] = []
        for pub in role_pubs:
            sk = _sslib(pub)
            keys[sk.keyid] = sk
            ids[role].append(sk.keyid)
    when = _utc(now)
    root = Root(
        version=1,
        expires=when + dt.timedelta(days=cfg.root_expiry_days),
        keys=keys,
        roles={
            Root.type: Role(ids[Root.type], root_threshold),
            Targets.type: Role(ids[Targets.type], 1),
            Snapshot.type: Role(ids[Timestamp.type], 1),
            Timestamp.type: Role(ids[Timestamp.type], 1),
        },
        consistent_snapshot=False,
        unrecognized_fields={
            EDGEOPS_ROLES_FIELD: {r: {"keyids": ids[r], "threshold": 1} for r in (COMMANDS_ROLE, ARTIFACTS_ROLE)}
        },
    )
    root_md = Metadata(root)
    root_keys_priv = _private_keys([keys_dir / f"root-{i}.key" for i in range(1, root_keys + 1)])
    write_bytes_atomic(repo.root_path(1), repo._sign(root_md, root_keys_priv[:root_threshold], Root.type))
    targets_md = Metadata(Targets(version=1, expires=when + dt.timedelta(days=cfg.targets_expiry_days)))
    targets_key = load_private_key(keys_dir / "targets.key")
    write_bytes_atomic(repo.role_path(Targets.type), repo._sign(targets_md, [targets_key], Targets.type))
    write_bytes_atomic(directory / _SETTINGS, json.dumps(cfg.__dict__, indent=2).encode())
    return repo


def load_repo(directory: Path) -> TrustRepo:
    """Open a trust directory. Raises ConfigError when it is not one."""
    directory = Path(directory)
    try:
        doc = json.loads((directory / _SETTINGS).read_text())
        settings = Settings(**doc)
    except OSError as exc:
        raise ConfigError(f"{directory} is not a trust repository ({_SETTINGS}: {exc.strerror})") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{directory / _SETTINGS}: {exc}") from None
    repo = TrustRepo(directory, settings)
    if not repo.root_versions():
        raise ConfigError(f"{directory} has no root metadata")
    return repo
