"""Model slots on the device's disk — active, previous and candidate — with one atomic commit point.

Layout under ``root`` (``DATA_DIR/slots``)::

    a.edgeops  b.edgeops  c.edgeops  state.json   {"active": "a", "previous": "b", "floor": "1.2.0", ...}

Three slots rather than A/B: a candidate is staged in the slot that is neither active nor previous, so an
install that fails its checks or its health gate never costs the device its rollback target. (Models are
small next to a root filesystem; the third copy is the price of always having a fallback.)

Guarantees:

- :meth:`SlotStore.stage` never touches the active or the previous slot. It copies the artifact into a temp
  file beside the candidate slot, fsyncs it, verifies it *from that file* (structure, signature by a trusted
  key, every file hash, profile = the device's, version newer than the anti-rollback floor), renames it into
  place and fsyncs the directory. A kill or a full disk at any point leaves the old slot file or the complete new
  one; the candidate slot's old version is dropped from ``state.json`` before its file is replaced, so the state
  never names a slot whose bytes changed under it.
- :meth:`SlotStore.commit` is the only moment a swap becomes durable: ``state.json`` is replaced atomically
  (temp, fsync, rename, fsync dir). The floor only moves up, so a version rolled away from cannot come back.
- :meth:`SlotStore.verify_slot` re-verifies a slot from disk; the agent calls it before it loads anything.

It does not load models or decide about health: :mod:`device_agent.agent` does, with :mod:`health_gate`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.fault_points import fault_point
from edgeops.artifact import VerifiedArtifact, verify_artifact
from edgeops.atomic_file import fsync_dir, write_bytes_atomic
from edgeops.errors import (
    DowngradeError,
    EdgeopsError,
    OutputError,
    ProfileMismatch,
    StorageError,
    UntrustedInput,
)
from edgeops.manifest import parse_semver

__all__ = ["SLOTS", "SlotState", "SlotStore"]

SLOTS = ("a", "b", "c")
STATE_FILE = "state.json"
DEFAULT_MAX_ARTIFACT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class SlotState:
    active: str | None = None
    previous: str | None = None
    floor: str | None = None  # highest version ever committed (anti-rollback)
    versions: dict[str, str] = field(default_factory=dict)  # slot -> version held (verified at stage time)
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _state_from_json(raw: bytes) -> SlotState:
    try:
        doc = json.loads(raw)
        state = SlotState(
            active=doc.get("active"),
            previous=doc.get("previous"),
            floor=doc.get("floor"),
            versions={str(k): str(v) for k, v in dict(doc.get("versions", {})).items()},
            updated_at=float(doc.get("updated_at", 0.0)),
        )
    except (ValueError, TypeError, AttributeError):
        raise StorageError("slot state.json is corrupt") from None
    if state.active not in (None, *SLOTS) or state.previous not in (None, *SLOTS):
        raise StorageError("slot state.json names an unknown slot")
    return state


def _newer(version: str, than: str | None) -> bool:
    return than is None or parse_semver(version) > parse_semver(than)


class SlotStore:
    """The device's two model slots and their committed state (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        trusted_keys: Sequence[Ed25519PublicKey],
        profile: str,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
        read_only: bool = False,
    ) -> None:
        self.root = root
        self.trusted_keys = list(trusted_keys)
        self.profile = profile
        self.max_artifact_bytes = max_artifact_bytes
        if not read_only:  # a reader (status, offline infer) must not touch files an agent may be writing
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create the slot directory {root}: {exc.strerror}") from None
            self.clean_temp()
        self._state = self._read_state()

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def state(self) -> SlotState:
        return self._state

    def path(self, slot: str) -> Path:
        return self.root / f"{slot}.edgeops"

    def _read_state(self) -> SlotState:
        try:
            return _state_from_json((self.root / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return SlotState()
        except OSError as exc:
            raise StorageError(f"cannot read {self.root / STATE_FILE}: {exc.strerror}") from None

    def _write_state(self, state: SlotState) -> SlotState:
        state = dataclasses.replace(state, updated_at=time.time())
        raw = (json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n").encode()
        try:
            write_bytes_atomic(self.root / STATE_FILE, raw)
        except OutputError as exc:
            raise StorageError(f"cannot commit the slot state: {exc}") from None
        fault_point("slot.state.replaced")
        self._state = state
        return state

    def clean_temp(self) -> None:
        """Remove temp files a crash left behind (they were never committed)."""
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def candidate_slot(self) -> str:
        """The slot a new artifact is staged in: neither the active nor the previous one."""
        taken = {self._state.active, self._state.previous}
        return next(s for s in SLOTS if s not in taken)

    # -- install -----------------------------------------------------------------------------------------------
    def check_manifest(self, artifact: VerifiedArtifact) -> None:
        """Profile and anti-rollback checks. Raises ProfileMismatch or DowngradeError."""
        m = artifact.manifest
        if m.profile != self.profile:
            raise ProfileMismatch(f"artifact is for profile {m.profile!r}, this device is {self.profile!r}")
        floor = self._state.floor
        if not _newer(m.version, floor):
            raise DowngradeError(f"version {m.version} is not newer than {floor} (anti-rollback)")

    def stage(self, src: Path) -> tuple[str, VerifiedArtifact]:
        """Copy ``src`` into the candidate slot and verify it there; returns (slot, verified artifact).

        Raises UntrustedInput (format, signature, integrity, profile, downgrade), StorageError (disk full,
        unreadable source). The active and previous slots (files and state entries) are never modified.
        """
        slot = self.candidate_slot()
        try:
            size = src.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot read {src}: {exc.strerror}") from None
        if size > self.max_artifact_bytes:
            raise UntrustedInput(f"artifact is {size} bytes, over the device's limit of {self.max_artifact_bytes}")
        tmp = self.root / f".{slot}.edgeops.tmp"
        try:
            self._copy_synced(src, tmp)
            fault_point("stage.copied")
            artifact = verify_artifact(tmp, self.trusted_keys, max_bytes=self.max_artifact_bytes)
            self.check_manifest(artifact)
            fault_point("stage.verified")
            if slot in self._state.versions:  # forgotten before its bytes change: the state never names stale ones
                versions = {k: v for k, v in self._state.versions.items() if k != slot}
                self._write_state(dataclasses.replace(self._state, versions=versions))
            os.replace(tmp, self.path(slot))
            fsync_dir(self.root)
            fault_point("stage.renamed")
        except OSError as exc:
            raise StorageError(f"cannot write slot {slot}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return slot, dataclasses.replace(artifact, path=self.path(slot))

    @staticmethod
    def _copy_synced(src: Path, dst: Path) -> None:
        with src.open("rb") as fin, dst.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())

    def commit(self, slot: str, version: str) -> SlotState:
        """Make ``slot`` (holding ``version``) active; the old active becomes previous. Raises StorageError."""
        if slot not in SLOTS:
            raise RuntimeError(f"unknown slot {slot!r}")
        s = self._state
        floor = version if _newer(version, s.floor) else s.floor
        previous = s.active if s.active != slot else s.previous
        versions = {**s.versions, slot: version}
        return self._write_state(SlotState(active=slot, previous=previous, floor=floor, versions=versions))

    def rollback(self, *, keep_current: bool = True) -> SlotState:
        """Make the previous slot active again. ``keep_current=False`` forgets the rolled-away slot (it failed).

        Raises EdgeopsError when there is no previous slot, StorageError when the state cannot be written.
        """
        s = self._state
        if s.previous is None:
            raise EdgeopsError("no previous model to roll back to")
        return self._write_state(dataclasses.replace(s, active=s.previous, previous=s.active if keep_current else None))

    def forget(self, slot: str) -> SlotState:
        """Drop a slot from the state (e.g. it failed re-verification); the file stays for inspection."""
        s = self._state
        return self._write_state(
            dataclasses.replace(
                s,
                active=None if s.active == slot else s.active,
                previous=None if s.previous == slot else s.previous,
                versions={k: v for k, v in s.versions.items() if k != slot},
            )
        )

    def verify_slot(self, slot: str) -> VerifiedArtifact:
        """Re-verify a slot from disk (structure, signature, hashes, profile). Raises UntrustedInput, StorageError."""
        path = self.path(slot)
        try:
            artifact = verify_artifact(path, self.trusted_keys, max_bytes=self.max_artifact_bytes)
        except FileNotFoundError:
            raise StorageError(f"slot {slot} is missing ({path})") from None
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise StorageError(f"slot {slot} cannot be read: I/O error") from None
            raise StorageError(f"slot {slot} cannot be read: {exc.strerror}") from None
        if artifact.manifest.profile != self.profile:
            raise ProfileMismatch(f"slot {slot} holds a {artifact.manifest.profile!r} artifact")
        return artifact
