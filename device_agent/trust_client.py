"""The device's update trust: TUF metadata received over MQTT, checked by :mod:`edgeops.trust`, kept on disk.

The agent subscribes to its fleet's trust topics (``edgeops/v1/{fleet}/trust/#``, retained) for as long as it
runs. :meth:`TrustClient.handle` records what arrives and follows root rotations at once (a new command or
artifact key takes effect without waiting for an update); :meth:`TrustClient.verify_release` runs the whole TUF
client workflow before a release's metadata is believed, with the wall clock as the reference time.

On disk (``data_dir/trust``, each file replaced atomically)::

    root.json        the newest trusted root (at first: a copy of the provisioning root from agent.toml)
    timestamp.json, snapshot.json, targets.json     the last trusted ones: floors against rollback

Guarantees: a root, timestamp, snapshot or targets file is written only after the verifier accepted it; a
rejected root or stale metadata never changes the keys in force; expired metadata refuses updates
(``expired-metadata``) and nothing else — inference, telemetry and commands go on. Thread-safe.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tuf.api.metadata import Root

from device_agent.fault_points import fault_point
from edgeops.atomic_file import write_bytes_atomic
from edgeops.errors import ConfigError, OutputError, ReleaseRejected, StorageError
from edgeops.release import ReleaseMetadata
from edgeops.trust import (
    ARTIFACTS_ROLE,
    COMMANDS_ROLE,
    MAX_TRUST_METADATA_BYTES,
    TrustedState,
    TrustSession,
    check_release,
    role_keys,
    trust_topics,
)

__all__ = ["TrustClient"]

log = logging.getLogger(__name__)
# python-tuf logs each root key that did not sign (normal under a threshold) at INFO: not news on a device
logging.getLogger("tuf").setLevel(logging.WARNING)
_ROLES = ("timestamp", "snapshot", "targets")
MAX_ROOTS_HELD = 64  # root versions received and not yet applied (a chain longer than this is followed in steps)


class TrustClient:
    """One device's trust state. ``on_root`` is called (outside the lock) after a new root is trusted;
    ``on_reject`` with (what, reason, detail) when received metadata is refused."""

    def __init__(
        self,
        data_dir: Path,
        fleet: str,
        initial_root: Path,
        *,
        clock: Callable[[], float] = time.time,
        on_root: Callable[[int], None] | None = None,
        on_reject: Callable[[str, str, str], None] | None = None,
    ) -> None:
        """Raises ConfigError when the provisioning root is needed (first start, or a damaged stored root) and cannot
        be read or is not valid self-signed root metadata; StorageError when the trust directory cannot be used.
        """
        self.topics = trust_topics(fleet)
        self._dir = Path(data_dir) / "trust"
        self._clock = clock
        self._lock = threading.RLock()
        self.on_root = on_root
        self.on_reject = on_reject
        self._received_roots: dict[int, bytes] = {}
        self._received: dict[str, bytes] = {}
        self.expires: dt.datetime | None = None  # of the metadata trusted at the last refresh: updates stop then
        self.last_error: str | None = None  # the reason of the last refresh that failed
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self._dir}: {exc.strerror}") from None
        stored = self._stored_root()
        if stored is None:  # first start, or the stored root is unreadable: start over from the provisioning root
            try:
                raw = Path(initial_root).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the provisioning root {initial_root}: {exc.strerror}") from None
            try:
                stored = (raw, TrustSession(raw, now=self._now()).root)
            except ReleaseRejected as exc:
                raise ConfigError(f"{initial_root} is not valid root metadata: {exc.detail}") from None
            self._write("root.json", raw)
        self._root, self._session_root = stored
        self._local = {r: (self._dir / f"{r}.json").read_bytes() for r in _ROLES if (self._dir / f"{r}.json").exists()}

    def _stored_root(self) -> tuple[bytes, Root] | None:
        """The stored root and its parsed form; None when there is none or it no longer verifies (damaged storage:
        logged; the device then follows the published chain again from its provisioning root)."""
        path = self._dir / "root.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from None
        try:
            return raw, TrustSession(raw, now=self._now()).root
        except ReleaseRejected as exc:
            log.error("trust: stored root %s is damaged (%s); starting over from the provisioning root", path, exc)
            return None

    # -- keys in force -------------------------------------------------------------------------------------
    @property
    def root_version(self) -> int:
        with self._lock:
            return int(self._session_root.version)

    def command_keys(self) -> tuple[Ed25519PublicKey, ...]:
        with self._lock:
            return role_keys(self._session_root, COMMANDS_ROLE)

    def status(self) -> dict[str, object]:
        """For the agent's status: root version, when updates stop without fresher metadata, the last refusal."""
        with self._lock:
            return {
                "mode": "tuf",
                "root_version": int(self._session_root.version),
                "metadata_expires": self.expires.isoformat() if self.expires else None,
                "last_error": self.last_error,
            }

    def artifact_keys(self) -> tuple[Ed25519PublicKey, ...]:
        with self._lock:
            return role_keys(self._session_root, ARTIFACTS_ROLE)

    # -- MQTT (network thread; never raises) ---------------------------------------------------------------
    def owns(self, topic: str) -> bool:
        return topic.startswith(self.topics.root_prefix.rsplit("/", 1)[0] + "/")

    def handle(self, topic: str, payload: bytes) -> None:
        if not payload or len(payload) > MAX_TRUST_METADATA_BYTES:
            return  # a cleared retained message, or one no verifier would accept
        version = self.topics.root_version(topic)
        with self._lock:
            if version is not None:
                if version > self._session_root.version:
                    self._received_roots[version] = bytes(payload)
                    if len(self._received_roots) > MAX_ROOTS_HELD:  # keep the lowest: the chain needs those next
                        del self._received_roots[max(self._received_roots)]
            elif topic in (self.topics.timestamp, self.topics.snapshot, self.topics.targets):
                self._received[topic.rsplit("/", 1)[-1]] = bytes(payload)
                return
            else:
                return
        try:
            self.follow_roots()
        except Exception:  # a bug here must not stop the network thread
            log.exception("trust: following root metadata failed")

    def follow_roots(self) -> int:
        """Apply every received root that continues the chain; returns the trusted root version."""
        with self._lock:
            session = TrustSession(self._root, now=self._now())
            before = session.root.version
            try:
                self._accept_roots(session)
            except ReleaseRejected as exc:
                self._rejected(f"root v{session.root.version + 1}", exc)
            after = session.root.version
        if after != before and self.on_root is not None:
            self.on_root(int(after))
        return int(after)

    def _accept_roots(self, session: TrustSession) -> None:
        """Apply received roots to ``session`` and store the newest one it accepted (also when a later one in the
        chain is refused: that error is re-raised after the good part is kept)."""
        error: ReleaseRejected | None = None
        try:
            session.update_roots(self._received_roots)
        except ReleaseRejected as exc:
            error = exc
        # drop what is applied, and the refused one: only a new publication of that version is tried again
        refused = session.root.version + 1 if error is not None else None
        self._received_roots = {
            v: r for v, r in self._received_roots.items() if v > session.root.version and v != refused
        }
        if session.root.version != self._session_root.version:
            self._write("root.json", session.root_bytes)  # each root was checked against its predecessor
            self._root = session.root_bytes
            self._session_root = session.root
        if error is not None:
            raise error

    # -- releases ------------------------------------------------------------------------------------------
    def verify_release(self, release_id: str, raw: bytes) -> ReleaseMetadata:
        """The release's metadata when the full TUF chain vouches for it now.

        Raises ReleaseRejected (reason codes of :func:`edgeops.trust.check_release` and
        :meth:`edgeops.trust.TrustSession.refresh`); StorageError when a newly trusted file cannot be stored.
        """
        state = self.refresh()
        return check_release(state, release_id, raw)

    def refresh(self) -> TrustedState:
        """Run the client workflow over what was received; store what became trusted. Raises ReleaseRejected."""
        with self._lock:
            session = TrustSession(self._root, now=self._now())
            before = session.root.version
            self._accept_roots(session)
            try:
                state = session.refresh(
                    timestamp=self._received.get("timestamp"),
                    snapshot=self._received.get("snapshot"),
                    targets=self._received.get("targets"),
                    local=self._local,
                )
            except ReleaseRejected as exc:
                self.last_error = f"{exc.reason}: {exc.detail}"
                raise
            self.expires, self.last_error = state.expires, None
            for role in _ROLES:
                data = getattr(state, role)
                if self._local.get(role) != data:
                    self._write(f"{role}.json", data)
                    self._local[role] = data
        if session.root.version != before and self.on_root is not None:
            self.on_root(int(session.root.version))
        return state

    # -- helpers -------------------------------------------------------------------------------------------
    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.timezone.utc)

    def _write(self, name: str, data: bytes) -> None:
        try:
            write_bytes_atomic(self._dir / name, data)
        except OutputError as exc:  # the device's disk, not the input
            raise StorageError(f"cannot store trust metadata {name}: {exc}") from None
        fault_point(f"trust.{name.removesuffix('.json')}.written")  # TRUST_POINTS

    def _rejected(self, what: str, exc: ReleaseRejected) -> None:
        log.warning("trust: %s refused: %s", what, exc)
        if self.on_reject is not None:
            self.on_reject(what, exc.reason, exc.detail)
