"""Update trust: TUF metadata checked on the device (light core, sans-I/O).

A fleet's releases are vouched for by The Update Framework's four top-level roles, in python-tuf's own metadata
format, so that a compromised broker or release server cannot install anything the release keys did not sign,
cannot hold a device on stale releases (freeze) or send it back (rollback), and cannot pair metadata that was
never published together (mix-and-match)::

    root        offline, a threshold of root keys; names every role's keys, and the fleet's own two roles in
                "x-edgeops-roles": "commands" (fleet commands) and "artifacts" (the build key of .edgeops files)
    targets     offline-ish, the release key: lists every release as target "releases/{release_id}" with the
                length and sha256 of its release metadata (edgeops.release; its envelope is signed by the same key)
    snapshot    online: the version of targets.json (signed with the timestamp key)
    timestamp   online, short expiry: the hash and version of snapshot.json — the freshness guarantee

On MQTT (retained, QoS 1; :func:`trust_topics`): ``edgeops/v1/{fleet}/trust/root/{version}`` for every root version,
and ``.../trust/timestamp``, ``.../trust/snapshot``, ``.../trust/targets`` for the current ones. A device that was
offline during a key rotation receives every root version on reconnect and walks the chain one version at a time.

:class:`TrustSession` runs the TUF client workflow (specification §5.3–5.6) over bytes the caller already has,
with python-tuf's ``TrustedMetadataSet`` doing the checks: root N+1 must be signed by a threshold of root N's
keys and of its own; versions never go back; expired metadata is refused at the instant passed in. Every
failure is a :class:`ReleaseRejected` with an :class:`~edgeops.release.OtaReason` code (expired-metadata,
metadata-rollback, untrusted-metadata, metadata-mismatch, not-in-targets, malformed, oversized) and nothing
else. Expiry only blocks updates: it never touches the model a device runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Root, Snapshot, Targets, Timestamp
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet  # sans-I/O; pinned tuf>=6,<8
from tuf.ngclient.config import EnvelopeType

from edgeops import bounded_json
from edgeops.errors import ReleaseRejected
from edgeops.protocol import TOPIC_ROOT, validate_segment
from edgeops.release import OtaReason, ReleaseMetadata, parse_release

__all__ = [
    "ARTIFACTS_ROLE",
    "COMMANDS_ROLE",
    "EDGEOPS_ROLES_FIELD",
    "MAX_TRUST_METADATA_BYTES",
    "TrustSession",
    "TrustTopics",
    "TrustedState",
    "check_release",
    "release_target",
    "role_keys",
    "trust_topics",
]

COMMANDS_ROLE = "commands"
ARTIFACTS_ROLE = "artifacts"
EDGEOPS_ROLES_FIELD = "x-edgeops-roles"
MAX_TRUST_METADATA_BYTES = 8 * 1024 * 1024  # targets.json grows by ~250 bytes per release
_TOP_LEVEL = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
_ROOT_TOPIC_RE = re.compile(r"[1-9][0-9]{0,8}")


@dataclass(frozen=True)
class TrustTopics:
    root_prefix: str  # + "/{version}"; subscribe to root_prefix + "/+"
    timestamp: str
    snapshot: str
    targets: str

    def root(self, version: int) -> str:
        return f"{self.root_prefix}/{version}"

    @property
    def all(self) -> str:
        """The filter that covers every trust topic."""
        return self.root_prefix.rsplit("/", 1)[0] + "/#"

    def root_version(self, topic: str) -> int | None:
        """The version in a root topic, or None when ``topic`` is not one."""
        prefix = self.root_prefix + "/"
        if not topic.startswith(prefix) or not _ROOT_TOPIC_RE.fullmatch(topic[len(prefix) :]):
            return None
        return int(topic[len(prefix) :])


def trust_topics(fleet: str) -> TrustTopics:
    """The retained trust metadata topics of a fleet. Raises ValueError for an invalid fleet name."""
    base = f"{TOPIC_ROOT}/{validate_segment(fleet, 'fleet')}/trust"
    return TrustTopics(f"{base}/root", f"{base}/timestamp", f"{base}/snapshot", f"{base}/targets")


def release_target(release_id: str) -> str:
    """The target path that lists a release in targets.json. Raises ValueError for an invalid release id."""
    return f"releases/{validate_segment(release_id, 'release id')}"


def _reject(reason: OtaReason, detail: str) -> ReleaseRejected:
    return ReleaseRejected(reason.value, detail[:200])


def _utc_text(when: dt.datetime) -> str:
    """``2026-01-31T12:00:00Z``: how expiry and device times read in a refusal."""
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _expired(what: str, expires: dt.datetime | None, now: dt.datetime) -> ReleaseRejected:
    """expired-metadata, saying when it expired and what the device's clock read: a clock running ahead is the
    common cause on a device (no RTC, no NTP), a freeze the other."""
    when = f" expired {_utc_text(expires)}" if expires is not None else ""
    return _reject(OtaReason.EXPIRED_METADATA, f"{what}{when}; device clock {_utc_text(now)} (ahead? or a freeze)")


@contextlib.contextmanager
def _as_rejection(what: str, now: dt.datetime | None = None) -> Iterator[None]:
    """Turn python-tuf's errors (and its parsers' stray ones on hostile bytes) into ReleaseRejected; ``now`` is
    the reference time, named in an expiry refusal."""
    try:
        yield
    except tuf_errors.ExpiredMetadataError as exc:
        if now is not None:
            raise _expired(f"{what}: {exc}", None, now) from None
        raise _reject(OtaReason.EXPIRED_METADATA, f"{what}: {exc}") from None
    except tuf_errors.BadVersionNumberError as exc:
        raise _reject(OtaReason.METADATA_ROLLBACK, f"{what}: {exc or 'version goes back'}") from None
    except tuf_errors.UnsignedMetadataError as exc:
        raise _reject(OtaReason.UNTRUSTED_METADATA, f"{what}: {exc}") from None
    except tuf_errors.LengthOrHashMismatchError as exc:
        raise _reject(OtaReason.METADATA_MISMATCH, f"{what}: {exc}") from None
    except (tuf_errors.RepositoryError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        # DeserializationError is a RepositoryError; from_dict raises the others on documents of the wrong shape
        raise _reject(OtaReason.MALFORMED, f"{what}: {type(exc).__name__}: {exc}") from None


def _sized(raw: bytes, what: str) -> bytes:
    """``raw`` when its size and JSON nesting are bounded (python-tuf's parser recurses in C: see bounded_json)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_TRUST_METADATA_BYTES:
        raise _reject(OtaReason.OVERSIZED, f"{what} over {MAX_TRUST_METADATA_BYTES} bytes")
    if bounded_json.nesting_depth(raw) > bounded_json.MAX_DEPTH:
        raise _reject(OtaReason.MALFORMED, f"{what} nested deeper than {bounded_json.MAX_DEPTH} levels")
    return bytes(raw)


def _ed25519(key: Any, role: str) -> Ed25519PublicKey:
    if getattr(key, "keytype", None) != "ed25519" or getattr(key, "scheme", None) != "ed25519":
        raise _reject(OtaReason.MALFORMED, f"role {role}: only ed25519 keys are supported")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.keyval["public"]))
    except (KeyError, TypeError, ValueError):
        raise _reject(OtaReason.MALFORMED, f"role {role}: bad ed25519 public key") from None


def _edgeops_role(root: Root, role: str) -> tuple[list[str], int]:
    roles = root.unrecognized_fields.get(EDGEOPS_ROLES_FIELD)
    spec = roles.get(role) if isinstance(roles, dict) else None
    if not isinstance(spec, dict):
        raise _reject(OtaReason.MALFORMED, f"root v{root.version} does not name the {role} role's keys")
    keyids, threshold = spec.get("keyids"), spec.get("threshold")
    if (
        not isinstance(keyids, list)
        or not keyids
        or not all(isinstance(k, str) for k in keyids)
        or isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not 1 <= threshold <= len(keyids)
    ):
        raise _reject(OtaReason.MALFORMED, f"root v{root.version}: bad {role} role")
    return list(keyids), threshold


def role_keys(root: Root, role: str) -> tuple[Ed25519PublicKey, ...]:
    """The public keys ``root`` names for ``role`` (a TUF top-level role, ``commands`` or ``artifacts``).

    Raises ReleaseRejected(malformed) when the role is missing, names an unknown key or a key that is not Ed25519.
    """
    if role in _TOP_LEVEL:
        keyids = list(root.roles[role].keyids)
    else:
        keyids, _ = _edgeops_role(root, role)
    missing = [k for k in keyids if k not in root.keys]
    if missing:
        raise _reject(OtaReason.MALFORMED, f"root v{root.version}: role {role} names unknown key {missing[0][:16]}")
    return tuple(_ed25519(root.keys[k], role) for k in keyids)


@dataclass(frozen=True)
class TrustedState:
    """The metadata a device trusts after a refresh: what to persist and what to check releases against."""

    root: bytes  # the newest trusted root
    timestamp: bytes
    snapshot: bytes
    targets: bytes
    root_meta: Root
    targets_meta: Targets
    expires: dt.datetime  # the earliest expiry among the four: after it, no update without fresher metadata

    @property
    def root_version(self) -> int:
        return int(self.root_meta.version)


class TrustSession:
    """One pass of the TUF client workflow over metadata the caller holds (no file, socket or clock).

    ``trusted_root`` is the newest root the device trusts (its provisioning root at first). ``now`` is the
    reference time for every expiry check (aware UTC). Use once: :meth:`update_roots`, then :meth:`refresh`.
    """

    def __init__(self, trusted_root: bytes, *, now: dt.datetime) -> None:
        """Raises ReleaseRejected when ``trusted_root`` is not valid self-signed root metadata."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (UTC)")
        with _as_rejection("trusted root"):
            self._set = TrustedMetadataSet(_sized(trusted_root, "trusted root"), EnvelopeType.METADATA)
        self._set.reference_time = now
        self._root_bytes = bytes(trusted_root)

    @property
    def root(self) -> Root:
        return self._set.root

    @property
    def root_bytes(self) -> bytes:
        return self._root_bytes

    def update_roots(self, available: Mapping[int, bytes]) -> list[bytes]:
        """Follow root rotations: apply versions N+1, N+2, ... from ``available`` (version → bytes) until one is
        missing. Returns the roots accepted, in order (persist each before using the next).

        Raises ReleaseRejected for a root that is not signed by a threshold of the previous root's keys and of its
        own, or whose version is not its topic's; the roots accepted before it stay trusted (``root``).
        """
        accepted: list[bytes] = []
        while (raw := available.get(self._set.root.version + 1)) is not None:
            with _as_rejection(f"root v{self._set.root.version + 1}"):
                self._set.update_root(_sized(raw, "root metadata"))
            self._root_bytes = bytes(raw)
            accepted.append(self._root_bytes)
        return accepted

    def refresh(
        self,
        *,
        timestamp: bytes | None,
        snapshot: bytes | None,
        targets: bytes | None,
        local: Mapping[str, bytes] | None = None,
    ) -> TrustedState:
        """Load timestamp, snapshot and targets: the device's own last trusted copies (``local``, by role name;
        used for rollback protection and when nothing newer was published) then the received ones.

        Raises ReleaseRejected: expired-metadata (root, timestamp, snapshot or targets past their expiry at ``now``:
        a freeze, or a device clock running ahead; the detail names the expiry and ``now``),
        metadata-rollback (a version lower than one trusted before, or not the one the newer role names),
        untrusted-metadata (not signed by a threshold of the role's keys in the trusted root), metadata-mismatch
        (length or hash not the one the timestamp/snapshot names), malformed, oversized; missing-metadata when a
        role's metadata has not been received (yet).
        """
        local = local or {}
        s = self._set
        chosen: dict[str, bytes] = {}
        for role, remote, loader in (
            (Timestamp.type, timestamp, s.update_timestamp),
            (Snapshot.type, snapshot, s.update_snapshot),
            (Targets.type, targets, s.update_targets),
        ):
            if role in local:  # an earlier trusted copy: a floor for versions; may be expired or superseded
                with contextlib.suppress(tuf_errors.RepositoryError, ValueError, TypeError, KeyError):
                    if role == Snapshot.type:
                        s.update_snapshot(_sized(local[role], role), trusted=True)
                    elif role == Timestamp.type or self._targets_version_due() == _version_in(local[role]):
                        loader(_sized(local[role], role))
                    if role in s:
                        chosen[role] = bytes(local[role])
            # the timestamp is always checked for a newer version; snapshot and targets only when the trusted
            # copy is not the version their parent names
            fresh = remote is not None and remote != chosen.get(role)
            if role == Timestamp.type:
                due = fresh and not (role in s and _version_in(remote) == s.timestamp.version)
            else:
                due = fresh and not self._current(role)
            if due and remote is not None:
                try:
                    with _as_rejection(f"{role} metadata", s.reference_time):
                        loader(_sized(remote, role))
                except ReleaseRejected as exc:
                    # python-tuf keeps an expired new timestamp/snapshot loaded: name its expiry in the refusal
                    if exc.reason == OtaReason.EXPIRED_METADATA.value and self._expired_role(role):
                        self._raise_stale(role)
                    raise
                chosen[role] = bytes(remote)
            if not self._current(role):
                self._raise_stale(role)
        root, ts, snap, tgt = s.root, s.timestamp, s.snapshot, s.targets
        return TrustedState(
            root=self._root_bytes,
            timestamp=chosen[Timestamp.type],
            snapshot=chosen[Snapshot.type],
            targets=chosen[Targets.type],
            root_meta=root,
            targets_meta=tgt,
            expires=min(root.expires, ts.expires, snap.expires, tgt.expires),
        )

    def _targets_version_due(self) -> int | None:
        s = self._set
        if Snapshot.type not in s:
            return None
        meta = s.snapshot.meta.get(f"{Targets.type}.json")
        return None if meta is None else int(meta.version)

    def _current(self, role: str) -> bool:
        """True when ``role`` is loaded as *final* metadata (unexpired and the version its parent names)."""
        s = self._set
        if role not in s:
            return False
        now = s.reference_time
        if role == Timestamp.type:
            return not s.timestamp.is_expired(now)
        if role == Snapshot.type:
            return not s.snapshot.is_expired(now) and s.snapshot.version == s.timestamp.snapshot_meta.version
        return not s.targets.is_expired(now) and s.targets.version == self._targets_version_due()

    def _expired_role(self, role: str) -> bool:
        s = self._set
        return role in s and bool(s[role].is_expired(s.reference_time))

    def _raise_stale(self, role: str) -> None:
        s = self._set
        now = s.reference_time
        if role not in s:
            if role == Timestamp.type and s.root.is_expired(now):
                raise _expired(f"root v{s.root.version}", s.root.expires, now)
            raise _reject(OtaReason.MISSING_METADATA, f"no {role} metadata received")
        signed = s[role]
        if signed.is_expired(now):
            raise _expired(f"{role} v{signed.version}", signed.expires, now)
        raise _reject(OtaReason.METADATA_ROLLBACK, f"{role} v{signed.version} is not the version its parent names")


def _version_in(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        version = doc["signed"]["version"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def check_release(state: TrustedState, release_id: str, raw: bytes) -> ReleaseMetadata:
    """The release metadata ``raw`` when the trusted targets list it under ``release_id`` with these exact bytes
    and its envelope is signed by the targets role's key.

    Raises ReleaseRejected: not-in-targets (targets.json does not list the release), metadata-mismatch (the bytes
    are not the ones listed: another release's metadata or an older signing of this one), untrusted-key /
    bad-signature / malformed (edgeops.release.parse_release), malformed (listed under another release id).
    """
    try:
        path = release_target(release_id)
    except ValueError as exc:
        raise _reject(OtaReason.MALFORMED, str(exc)) from None
    target = state.targets_meta.targets.get(path)
    if target is None:
        raise _reject(OtaReason.NOT_IN_TARGETS, f"targets v{state.targets_meta.version} does not list {path}")
    with _as_rejection(f"release metadata of {release_id}"):
        target.verify_length_and_hashes(raw)
    meta = parse_release(raw, role_keys(state.root_meta, Targets.type))
    if meta.release_id != release_id:
        raise _reject(OtaReason.MALFORMED, f"metadata of {meta.release_id} listed as {release_id}")
    return meta
