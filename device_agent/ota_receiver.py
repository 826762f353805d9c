"""The device's OTA decisions, sans I/O: which payload of a release to fetch, and how a download is assembled.

:func:`select_payload` decides whether a verified release (:func:`edgeops.release.parse_release`) fits this
device and picks what to download: the delta from the artifact the device runs when the release has one, else
the full artifact. :class:`Assembler` tracks one payload download: it classifies every incoming chunk, knows
which chunks are held and which are missing, and says when to ask the publisher for the missing ones.

Guarantees:

- :func:`select_payload` raises :class:`ReleaseRejected` with an :class:`OtaReason` code, checked in the order
  wrong-fleet, wrong-profile, not-newer, no-payload, too-large; the detail names the values compared.
- :meth:`Assembler.classify` stores nothing and accepts a chunk (``STORE``) only when it belongs to this release
  and payload, is not held yet, has the length of its slot and hashes to the chunk digest in the SIGNED metadata
  (a chunk header's own hash proves nothing). So ``held`` only ever grows by chunks that passed ``classify``.
- Repair requests are rate limited: never two within ``repair_min_interval_s``, and never while chunks keep
  arriving (``repair_idle_s`` without one first), except the first request of a fresh download, which is due
  at once. A resumed download waits ``repair_idle_s`` first: the broker may still hold chunks queued for this
  device's persistent session.

Not done here: no file, socket, clock or thread. Writing chunk bytes is :mod:`device_agent.transfer_store`'s
job, MQTT and the apply step are the adapter's (:mod:`device_agent.ota`); ``now`` is passed in (any monotonic
seconds). Not thread-safe: one adapter thread drives one assembler.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from enum import Enum
from typing import Any

import numpy as np

from edgeops.errors import ReleaseRejected
from edgeops.manifest import parse_semver
from edgeops.release import Chunk, OtaReason, Payload, ReleaseMetadata, encode_repair

__all__ = ["Assembler", "ChunkOutcome", "select_payload"]


def _reject(reason: OtaReason, detail: str) -> ReleaseRejected:
    return ReleaseRejected(reason.value, detail)


def select_payload(
    meta: ReleaseMetadata,
    *,
    fleet: str,
    profile: str,
    active_version: str | None,
    floor_version: str | None,
    active_sha256: str | None,
    max_download_bytes: int,
) -> Payload:
    """The payload this device should download for ``meta``.

    ``active_version``/``active_sha256`` describe the artifact the device runs (None when it runs none);
    ``floor_version`` is its anti-rollback floor (the highest version it ever committed). A delta whose base is
    the active artifact is preferred over the full artifact.

    Raises ReleaseRejected with reason wrong-fleet, wrong-profile, not-newer (the release's version is not above
    the active version and the floor), no-payload (no delta from this base and no full artifact) or too-large
    (the chosen payload or the target artifact is over ``max_download_bytes``), checked in that order.
    Raises ValueError when ``active_version`` or ``floor_version`` is not semver (the caller's own state).
    """
    if meta.fleet != fleet:
        raise _reject(OtaReason.WRONG_FLEET, f"release is for fleet {meta.fleet}, this device is in {fleet}")
    if meta.profile != profile:
        raise _reject(OtaReason.WRONG_PROFILE, f"release is for {meta.profile}, this device is {profile}")
    offered = parse_semver(meta.version)
    for what, version in (("runs", active_version), ("has a floor of", floor_version)):
        if version is not None and offered <= parse_semver(version):
            raise _reject(OtaReason.NOT_NEWER, f"release {meta.version} is not newer: this device {what} {version}")
    chosen = meta.delta_from(active_sha256) if active_sha256 is not None else None
    if chosen is None:
        chosen = meta.full()
    if chosen is None:
        base = f"base {active_sha256[:16]}" if active_sha256 is not None else "no base"
        bases = ", ".join(sorted({p.base_version for p in meta.payloads if p.base_version}))
        detail = f"release {meta.version} has no full payload and no delta from {base} (only from {bases})"
        raise _reject(OtaReason.NO_PAYLOAD, detail)
    for what, size in ((f"{chosen.kind.value} payload", chosen.size), ("target artifact", meta.target_size)):
        if size > max_download_bytes:
            raise _reject(OtaReason.TOO_LARGE, f"{what} is {size} bytes, this device's limit is {max_download_bytes}")
    return chosen


class ChunkOutcome(str, Enum):
    """What to do with an incoming chunk (see :meth:`Assembler.classify`)."""

    STORE = "store"  # write it, then call mark_stored
    DUPLICATE = "duplicate"  # already held: drop it
    CORRUPT = "corrupt"  # not the signed bytes of its slot: drop it, call note_corrupt (it stays missing)
    FOREIGN = "foreign"  # another release, another payload or an index past the end: ignore it

    def __str__(self) -> str:
        return self.value


class Assembler:
    """Tracks one payload download: which chunks are held, which are missing, when to ask for repairs.

    ``have`` are the chunks already on disk (a resumed download); ``started_at`` starts the idle clock of a
    resumed download (when None, the first call that passes ``now`` starts it). Raises ValueError when
    ``payload`` is not one of ``meta``'s payloads or an index in ``have`` is out of range.
    """

    def __init__(
        self,
        meta: ReleaseMetadata,
        payload: Payload,
        have: Iterable[int] = (),
        *,
        repair_idle_s: float = 2.0,  # seconds without a chunk before missing chunks are requested
        repair_min_interval_s: float = 2.0,  # seconds between two repair requests
        started_at: float | None = None,
    ) -> None:
        if payload not in meta.payloads:
            raise ValueError(f"payload {payload.id} is not one of release {meta.release_id}'s payloads")
        if repair_idle_s < 0 or repair_min_interval_s < 0:
            raise ValueError("repair intervals must not be negative")
        self.meta = meta
        self.payload = payload
        self.repair_idle_s = repair_idle_s
        self.repair_min_interval_s = repair_min_interval_s
        self._flags = np.zeros(payload.chunk_count, dtype=np.bool_)
        self._received = 0
        self._bytes = 0
        self._corrupt = 0
        for index in have:
            self._check_index(index)
            self._hold(index)
        self._idle_since = started_at  # last chunk, last request or start; None until the first `now`
        self._last_request: float | None = None

    # --- state --------------------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return self.payload.chunk_count

    @property
    def received(self) -> int:
        return self._received

    @property
    def corrupt_count(self) -> int:
        return self._corrupt

    @property
    def complete(self) -> bool:
        return self._received == self.total

    @property
    def held(self) -> frozenset[int]:
        return frozenset(int(i) for i in np.flatnonzero(self._flags))

    @property
    def missing(self) -> list[int]:
        """The chunks not held yet, ascending."""
        return [int(i) for i in np.flatnonzero(~self._flags)]

    def progress(self) -> dict[str, Any]:
        """A JSON-ready summary for telemetry and events."""
        return {
            "release_id": self.meta.release_id,
            "payload_id": self.payload.id,
            "kind": self.payload.kind.value,
            "received": self._received,
            "total": self.total,
            "bytes": self._bytes,
            "corrupt": self._corrupt,
        }

    # --- chunks -------------------------------------------------------------------------------------------

    def classify(self, chunk: Chunk) -> ChunkOutcome:
        """What ``chunk`` is to this download; changes nothing.

        FOREIGN: another release or payload, or an index past the last chunk. DUPLICATE: already held.
        CORRUPT: its length is not its slot's, or its sha256 is not the signed digest of its slot. STORE: else.
        """
        if (
            chunk.release_id != self.meta.release_id
            or chunk.payload_id != self.payload.id
            or not 0 <= chunk.index < self.total
        ):
            return ChunkOutcome.FOREIGN
        if self._flags[chunk.index]:
            return ChunkOutcome.DUPLICATE
        _, length = self.payload.chunk_range(chunk.index, self.meta.chunk_size)
        if len(chunk.data) != length or hashlib.sha256(chunk.data).digest() != self.payload.chunk_hashes[chunk.index]:
            return ChunkOutcome.CORRUPT
        return ChunkOutcome.STORE

    def mark_stored(self, index: int, now: float) -> None:
        """Record that chunk ``index`` (classified STORE) is written. Idempotent. Raises ValueError out of range."""
        self._check_index(index)
        self._hold(index)
        self._idle_since = now

    def note_corrupt(self, index: int, now: float) -> None:
        """Count a corrupt chunk; it stays missing and is requested again. Raises ValueError out of range."""
        self._check_index(index)
        self._corrupt += 1
        self._idle_since = now  # the stream is alive: let it finish before asking for repairs

    # --- repairs ------------------------------------------------------------------------------------------

    def repair_due(self, now: float) -> bool:
        """Whether a repair request should be sent now (see the module docstring for the rules)."""
        if self.complete:
            return False
        if self._last_request is None and self._received == 0:
            return True  # a fresh download (nothing held, nothing asked yet): ask for everything at once
        if self._idle_since is None:
            self._idle_since = now  # a resumed download's first tick starts its idle clock
        if now - self._idle_since < self.repair_idle_s:
            return False
        return self._last_request is None or now - self._last_request >= self.repair_min_interval_s

    def repair_request(self, now: float) -> bytes:
        """The repair request (``edgeops.release.encode_repair``) for the missing chunks; records the time.

        Raises RuntimeError when the download is complete (there is nothing to ask for).
        """
        if self.complete:
            raise RuntimeError(f"download of {self.meta.release_id}/{self.payload.id} is complete")
        raw = encode_repair(self.meta.release_id, self.payload.id, self.total, self.missing)
        self._last_request = now
        self._idle_since = now
        return raw

    # --- internals ----------------------------------------------------------------------------------------

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.total:
            raise ValueError(f"chunk index {index} out of range 0..{self.total - 1}")

    def _hold(self, index: int) -> None:
        if not self._flags[index]:
            self._flags[index] = True
            self._received += 1
            self._bytes += self.payload.chunk_range(index, self.meta.chunk_size)[1]
