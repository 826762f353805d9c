"""Over-the-air updates on the device: the adapter around the OTA decision core and the download on disk.

Data flow (docs/ota.md)::

    ota-update command ──▶ subscribe release/{id}/manifest (retained) ──▶ parse_release (signature) ──▶
    select_payload (fleet, profile, newer, size limit) ──▶ TransferStore.begin (preallocate) ──▶ subscribe
    release/{id}/chunk ──▶ per chunk: parse_chunk, Assembler.classify (signed hash), Transfer.write_chunk ──▶
    repair requests (bitmap) on device/{id}/ota when chunks are missing ──▶ complete: apply the delta (or take the
    full artifact), check the target hash ──▶ Agent.install (slot store verifies the signature, health gate) ──▶
    events ota.* and install.*, retained state

Guarantees: nothing is downloaded before the metadata's signature, fleet, profile, version and size have been
checked; every chunk is checked against the signed hash list before it is written; a download survives restarts
of the agent, the device and the broker (the transfer store keeps chunks and flags; the broker keeps chunks
broadcast while the agent was away in its persistent session); every refusal or failure is an ``ota.rejected`` or
``ota.failed`` event with an :class:`~edgeops.release.OtaReason` code, and the active model keeps serving
throughout. MQTT callbacks only parse, check and write chunks; the apply and install run on a worker thread.

A full disk is not a failure: before a download starts, the free space must hold the download, the applied
target (delta payloads) and the slot copy plus ``SPACE_SLACK_BYTES``; when it does not, or when a write still
meets a full disk (download, apply, slot copy, state commit), whatever was written is removed and the release
stays wanted (``ota-wanted.json``): one ``ota.deferred`` event (reason ``disk-full``, bytes needed and free), the
state's ``ota`` phase ``waiting-for-space``, and a new try once that much space is free (looked at every
``SPACE_POLL_S``), at once on a new ``ota-update`` for the release, and after a restart. Other storage errors
(an I/O error, a file size limit) end the update with ``ota.failed`` (``storage``) as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent import disk_space
from device_agent.fault_points import fault_point
from device_agent.ota_receiver import Assembler, ChunkOutcome, select_payload
from device_agent.transfer_store import Transfer, TransferStore
from edgeops.atomic_file import write_bytes_atomic
from edgeops.delta import apply_delta
from edgeops.errors import IntegrityError, ReleaseRejected, StorageError, UntrustedInput
from edgeops.protocol import TOPIC_ROOT, release_topics, validate_segment
from edgeops.release import OtaReason, Payload, PayloadKind, ReleaseMetadata, parse_chunk, parse_release
from edgeops.signing import load_public_key

if TYPE_CHECKING:
    from device_agent.agent import Agent

__all__ = ["OtaClient"]

log = logging.getLogger(__name__)
TICK_S = 0.1  # how often the repair timer looks at the download
SPACE_POLL_S = 2.0  # how often a release waiting for disk space looks at the free space again
MAX_RETRY_S = 300.0  # the longest wait between two tries of a release that met a full disk
SPACE_SLACK_BYTES = 1 << 20  # kept free beyond an update's own files (state.json, the spool, logs)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _record_applied() -> None:
    """Called by apply_delta after each op (the light core knows no fault points)."""
    fault_point("ota.apply.record")


# refusals that fresher trust metadata can lift: a saved download is kept for them
_WAIT_FOR_TRUST = frozenset({OtaReason.MISSING_METADATA.value, OtaReason.EXPIRED_METADATA.value})


def _space_needed(meta: ReleaseMetadata, payload: Payload) -> int:
    """Bytes an update through ``payload`` writes: the download, the applied target (delta) and the slot copy."""
    applied = meta.target_size if payload.kind is PayloadKind.DELTA else 0
    return payload.size + applied + meta.target_size


@dataclass
class _Deferred:
    """A release that met a full disk: tried again once ``need`` bytes are free, not before ``not_before``."""

    release_id: str
    version: str
    raw: bytes  # the signed release metadata, verified again at the next try
    need: int | None  # bytes that must be free for the next try; None: try at ``not_before`` regardless
    not_before: float  # monotonic seconds
    free: int | None  # bytes free when last looked at
    tries: int = 1


@dataclass
class _Download:
    meta: ReleaseMetadata
    raw: bytes
    payload: Payload
    transfer: Transfer
    assembler: Assembler
    started: float
    since_sync: int = 0
    applying: bool = False


class OtaClient:
    """One device's OTA: at most one release at a time (a newer command replaces the current download)."""

    def __init__(self, agent: Agent) -> None:
        cfg = agent.cfg
        self.agent = agent
        self.cfg = cfg.ota
        self._keys = [load_public_key(p) for p in cfg.trusted_keys]  # static-key mode (agent.trust is None)
        self._prefix = f"{TOPIC_ROOT}/{cfg.fleet}/release/"
        self._wanted_file = Path(cfg.data_dir) / "ota-wanted.json"
        self.transfers = TransferStore(Path(cfg.data_dir) / "ota")
        self._lock = threading.RLock()
        self._wanted: str | None = None
        self._awaiting_trust: tuple[str, bytes] | None = None  # release metadata that arrived before the trust chain
        self._deferred: _Deferred | None = None  # the wanted release, waiting for disk space
        self._dl: _Download | None = None
        self._jobs: queue.Queue[_Download | None] = queue.Queue()
        self._stop = threading.Event()
        self._downloading = threading.Event()  # set (under _lock) while _dl is set: the repair timer sleeps otherwise
        self._threads = [
            threading.Thread(target=self._apply_worker, name="ota-apply", daemon=True),
            threading.Thread(target=self._repair_timer, name="ota-repair", daemon=True),
        ]

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume a saved download, or wait again for the metadata of a release asked for before a restart."""
        for release_id, raw, _payload_id in self.transfers.saved():
            try:
                meta = self._verify(release_id, raw)
            except ReleaseRejected as exc:
                if exc.reason in _WAIT_FOR_TRUST:  # kept: resumed when the release metadata is trusted again
                    log.info("saved download %s waits for trust metadata: %s", release_id, exc.detail)
                    continue
                log.warning("saved download %s dropped: %s", release_id, exc)
                self.transfers.discard(release_id)
                continue
            except StorageError as exc:
                log.warning("saved download %s dropped: %s", release_id, exc)
                self.transfers.discard(release_id)
                continue
            self._wanted = meta.release_id
            self._on_metadata(meta, raw, resumed=True)
        if self._dl is None and self._wanted is None:
            self._wanted = self._read_wanted()
        self._update_subscriptions()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._downloading.set()  # wakes the repair timer to see _stop
        self._jobs.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=5)

    # -- requests --------------------------------------------------------------------------------------------
    def request(self, release_id: str) -> dict[str, Any]:
        """Start fetching ``release_id`` (from the ``ota-update`` command). Returns what the device is doing."""
        with self._lock:
            dl = self._dl
            if dl is not None and dl.meta.release_id == release_id:
                return {"release_id": release_id, "status": "downloading", **dl.assembler.progress()}
            deferred = self._deferred
            if deferred is not None and deferred.release_id == release_id:  # asked again: try now, space or not
                deferred.need, deferred.not_before = None, 0.0
                return {"release_id": release_id, "status": "retrying", "reason": OtaReason.DISK_FULL.value}
            if dl is not None and not dl.applying:
                self._drop(dl, "replaced by a request for " + release_id)
            self._deferred = None
            self._wanted = release_id
            write_bytes_atomic(self._wanted_file, json.dumps({"release_id": release_id}).encode())
            fault_point("ota.requested")
            self._update_subscriptions()
        return {"release_id": release_id, "status": "waiting-for-metadata"}

    def progress(self) -> dict[str, Any] | None:
        with self._lock:
            if self._dl is not None:
                phase = "applying" if self._dl.applying else "downloading"
                return {"phase": phase, "version": self._dl.meta.version, **self._dl.assembler.progress()}
            d = self._deferred
            if d is not None:
                return {
                    "phase": "waiting-for-space",
                    "release_id": d.release_id,
                    "version": d.version,
                    "reason": OtaReason.DISK_FULL.value,
                    "need_bytes": d.need,
                    "free_bytes": d.free,
                }
            if self._wanted is not None:
                return {"phase": "waiting-for-metadata", "release_id": self._wanted}
        return None

    def owns(self, topic: str) -> bool:
        return topic.startswith(self._prefix)

    # -- MQTT (network thread; never raises) -----------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        leaf = topic.rsplit("/", 1)[-1]
        release_id = topic[len(self._prefix) :].split("/", 1)[0]
        try:
            if leaf == "manifest":
                if payload and release_id == self._wanted:
                    self._on_metadata_bytes(release_id, payload)
            elif leaf == "chunk":
                self._on_chunk(payload)
        except Exception:  # a bug here must not stop the network thread; logged with its traceback
            log.exception("ota: handling a message on %s failed", topic)

    def _on_metadata_bytes(self, release_id: str, raw: bytes) -> None:
        with self._lock:
            if self._dl is not None and self._dl.meta.release_id == release_id:
                return  # the retained metadata again (reconnect): nothing new
            try:
                meta = self._verify(release_id, raw)
            except ReleaseRejected as exc:
                if exc.reason == OtaReason.MISSING_METADATA.value:  # trust metadata still on its way (a restart)
                    log.info("ota: %s waits for trust metadata: %s", release_id, exc.detail)
                    self._awaiting_trust = (release_id, raw)
                    return
                self._reject(release_id, exc)
                return
            except StorageError as exc:
                self._fail(release_id, OtaReason.STORAGE, str(exc))
                return
            self._on_metadata(meta, raw, resumed=False)

    def trust_updated(self) -> None:
        """New trust metadata arrived: retry release metadata that waited for it (network thread; never raises)."""
        with self._lock:
            pending, self._awaiting_trust = self._awaiting_trust, None
            if pending is None or pending[0] != self._wanted or self._dl is not None:
                return
        try:
            self._on_metadata_bytes(*pending)
        except Exception:  # a bug here must not stop the network thread; logged with its traceback
            log.exception("ota: retrying %s after new trust metadata failed", pending[0])

    def _verify(self, release_id: str, raw: bytes) -> ReleaseMetadata:
        """The release metadata when it is trusted: signed by a trusted key (static keys), or vouched for by the
        whole TUF chain now (TUF mode). Raises ReleaseRejected, or StorageError from the trust store."""
        trust = self.agent.trust
        meta = parse_release(raw, self._keys) if trust is None else trust.verify_release(release_id, raw)
        if meta.release_id != release_id:
            raise ReleaseRejected(OtaReason.MALFORMED.value, f"metadata of {meta.release_id} under {release_id}")
        return meta

    def _on_metadata(self, meta: ReleaseMetadata, raw: bytes, *, resumed: bool) -> None:
        store = self.agent.store
        active = store.state.active
        active_version = self.agent.active_version()
        if active_version == meta.version and active is not None and self._active_sha(active) == meta.target_sha256:
            log.info("ota: %s is already installed", meta.release_id)
            self._finish(meta.release_id)
            return
        try:
            payload = select_payload(
                meta,
                fleet=self.agent.cfg.fleet,
                profile=self.agent.cfg.profile,
                active_version=active_version,
                floor_version=store.state.floor,
                active_sha256=self._active_sha(active) if active else None,
                max_download_bytes=self.cfg.max_download_bytes,
            )
        except ReleaseRejected as exc:
            self._reject(meta.release_id, exc)
            return
        short = self._shortfall(meta, payload)
        if short is not None:
            need, free = short
            self._defer(meta, payload, raw, f"{need} bytes needed for the download and the install, {free} free")
            return
        try:
            transfer = self.transfers.begin(raw, meta, payload)
        except StorageError as exc:
            self._storage_failed(meta, payload, raw, exc)
            return
        assembler = Assembler(
            meta,
            payload,
            transfer.held,
            repair_idle_s=self.cfg.repair_idle_s,
            repair_min_interval_s=self.cfg.repair_min_interval_s,
            started_at=time.monotonic(),
        )
        dl = _Download(meta, raw, payload, transfer, assembler, time.monotonic())
        self._dl = dl
        self._deferred = None
        self._downloading.set()
        self._wanted = meta.release_id
        self.agent.reporter.event(
            "ota.started",
            release_id=meta.release_id,
            version=meta.version,
            payload=str(payload.kind),
            base_version=payload.base_version,
            size=payload.size,
            chunks=payload.chunk_count,
            held=assembler.received,
            resumed=resumed or assembler.received > 0,
        )
        self._update_subscriptions()
        if assembler.complete:
            self._complete(dl)
        else:
            self._request_repairs(dl)  # a fresh download asks at once; a resumed one waits (repair_due decides)

    def _request_repairs(self, dl: _Download) -> None:
        now = time.monotonic()
        if self.agent.reporter.connected and dl.assembler.repair_due(now):
            self.agent.reporter.publish_now(self.agent.reporter.topics.ota, dl.assembler.repair_request(now))

    def _on_chunk(self, raw: bytes) -> None:
        with self._lock:
            dl = self._dl
            if dl is None or dl.applying:
                return
            try:
                chunk = parse_chunk(raw, max_data=dl.meta.chunk_size)
            except ReleaseRejected as exc:
                log.info("ota: chunk dropped: %s", exc)
                return
            outcome = dl.assembler.classify(chunk)
            if outcome is ChunkOutcome.CORRUPT:
                dl.assembler.note_corrupt(chunk.index, time.monotonic())
                log.warning("ota: chunk %d of %s does not match its signed hash", chunk.index, dl.meta.release_id)
                return
            if outcome is not ChunkOutcome.STORE:
                return
            try:
                dl.transfer.write_chunk(chunk.index, chunk.data)
            except StorageError as exc:
                self._drop(dl, str(exc))
                self._storage_failed(dl.meta, dl.payload, dl.raw, exc)
                return
            dl.assembler.mark_stored(chunk.index, time.monotonic())
            fault_point("ota.chunk.stored")
            dl.since_sync += 1
            if dl.assembler.complete:
                self._complete(dl)
            elif dl.since_sync >= self.cfg.sync_every_chunks:
                dl.since_sync = 0
                self._sync(dl)

    def _sync(self, dl: _Download) -> None:
        try:
            dl.transfer.sync()
        except StorageError as exc:
            log.warning("ota: sync failed: %s", exc)

    def _complete(self, dl: _Download) -> None:
        self._sync(dl)
        dl.applying = True
        self._jobs.put(dl)  # first: nothing below may strand a complete download
        self._update_subscriptions()
        self.agent.reporter.event(
            "ota.downloaded",
            release_id=dl.meta.release_id,
            seconds=round(time.monotonic() - dl.started, 3),
            **{k: v for k, v in dl.assembler.progress().items() if k in ("received", "total", "bytes", "corrupt")},
        )

    # -- repair requests -------------------------------------------------------------------------------------
    def _repair_timer(self) -> None:
        while True:
            self._downloading.wait()  # no wake-ups while there is no download (a fleet of idle agents stays idle)
            if self._stop.wait(TICK_S):
                return
            with self._lock:
                if self._dl is None and self._deferred is None:
                    self._downloading.clear()
                elif self._dl is not None and not self._dl.applying:
                    self._request_repairs(self._dl)
                retry = self._due_retry()
            if retry is not None:
                try:
                    self._on_metadata_bytes(retry.release_id, retry.raw)
                except Exception:  # the timer must outlive a bug in one try; logged with its traceback
                    log.exception("ota: trying %s again failed", retry.release_id)

    # -- a full disk -----------------------------------------------------------------------------------------
    def _shortfall(self, meta: ReleaseMetadata, payload: Payload) -> tuple[int, int] | None:
        """(bytes needed, bytes free) when the data disk lacks room for this update's files, else None. What the
        transfer store holds counts as free: a resumed download keeps it, another one is discarded."""
        slot = meta.target_size
        download = max(0, _space_needed(meta, payload) - slot - self.transfers.allocated_bytes())
        ota_root, slot_root = self.transfers.root, self.agent.store.root
        if disk_space.same_filesystem(ota_root, slot_root):
            checks = [(ota_root, download + slot + SPACE_SLACK_BYTES)]
        else:
            checks = [(ota_root, download + SPACE_SLACK_BYTES), (slot_root, slot + SPACE_SLACK_BYTES)]
        for path, need in checks:
            free = disk_space.free_bytes(path)
            if free is not None and free < need:
                return need, free
        return None

    def _storage_failed(
        self,
        meta: ReleaseMetadata,
        payload: Payload,
        raw: bytes,
        exc: StorageError,
        reason: OtaReason = OtaReason.STORAGE,
    ) -> None:
        """A write failed and what it wrote is removed: a full disk defers the release, anything else fails it."""
        if disk_space.is_disk_full(exc):
            self._defer(meta, payload, raw, str(exc))
        else:
            self._fail(meta.release_id, reason, str(exc))

    def _defer(self, meta: ReleaseMetadata, payload: Payload, raw: bytes, detail: str) -> None:
        """Keep wanting ``meta``'s release, try it again once the update's bytes are free; reported once per streak."""
        need = _space_needed(meta, payload) + SPACE_SLACK_BYTES
        free = disk_space.free_bytes(self.transfers.root)
        with self._lock:
            d = self._deferred
            again = d is not None and d.release_id == meta.release_id
            tries = d.tries + 1 if d is not None and again else 1
            wait = min(SPACE_POLL_S * 2 ** (tries - 1), MAX_RETRY_S)
            self._deferred = _Deferred(meta.release_id, meta.version, raw, need, time.monotonic() + wait, free, tries)
            self._wanted = meta.release_id
            self._downloading.set()  # the repair timer tries it again
            self._update_subscriptions()
        log.warning("ota: %s waits for disk space (try %d): %s", meta.release_id, tries, detail)
        if not again:
            self.agent.reporter.event(
                "ota.deferred",
                release_id=meta.release_id,
                version=meta.version,
                reason=OtaReason.DISK_FULL.value,
                detail=detail,
                need_bytes=need,
                free_bytes=free,
            )
            self.agent.reporter.publish_state()

    def _due_retry(self) -> _Deferred | None:
        """The deferred release when it is time to try it again (the caller holds the lock)."""
        d = self._deferred
        now = time.monotonic()
        if d is None or self._dl is not None or now < d.not_before:
            return None
        if d.need is not None:
            d.free = disk_space.free_bytes(self.transfers.root)
            if d.free is not None and d.free < d.need:
                d.not_before = now + SPACE_POLL_S
                return None
        d.not_before = now + MAX_RETRY_S  # the try defers it again (with its own wait) or starts the download
        return d

    # -- apply and install (worker thread) -------------------------------------------------------------------
    def _apply_worker(self) -> None:
        while True:
            dl = self._jobs.get()
            if dl is None:
                return
            try:
                self._apply_and_install(dl)
            except Exception as exc:  # a bug must not kill the worker; the download is dropped and reported
                log.exception("ota: applying %s failed", dl.meta.release_id)
                self._fail(dl.meta.release_id, OtaReason.INSTALL_FAILED, f"internal: {exc}")
                self._drop(dl, "internal error")

    def _target_file(self, dl: _Download) -> Path:
        """The target artifact built from the download, its hash checked. Raises ReleaseRejected, StorageError."""
        part, meta = dl.transfer.part_path, dl.meta
        fault_point("ota.apply.started")
        if dl.payload.kind is PayloadKind.FULL:
            if _sha256_file(part) != meta.target_sha256:
                raise ReleaseRejected(OtaReason.RESULT_MISMATCH.value, "the download is not the announced artifact")
            return part
        active = self.agent.store.state.active
        base = self.agent.store.path(active) if active else None
        if base is None or self._active_sha(active) != dl.payload.base_sha256:
            raise ReleaseRejected(OtaReason.NO_PAYLOAD.value, "the active model is no longer the delta's base")
        out = dl.transfer.scratch_path("target.edgeops")
        try:
            apply_delta(base, part, out, expected_sha256=meta.target_sha256, on_op=_record_applied)
        except (UntrustedInput, IntegrityError) as exc:
            raise ReleaseRejected(OtaReason.RESULT_MISMATCH.value, str(exc)) from None
        return out

    def _apply_and_install(self, dl: _Download) -> None:
        rid = dl.meta.release_id
        try:
            target = self._target_file(dl)
        except ReleaseRejected as exc:
            self._drop(dl, str(exc))
            self._reject(rid, exc)
            return
        except StorageError as exc:
            self._drop(dl, str(exc))
            self._storage_failed(dl.meta, dl.payload, dl.raw, exc)
            return
        fault_point("ota.applied")
        try:
            gate = self.agent.install(target, source=f"ota:{rid}")
        except UntrustedInput as exc:  # install already reported install.rejected
            self._drop(dl, str(exc))
            self._fail(rid, OtaReason.INSTALL_FAILED, str(exc))
            return
        except StorageError as exc:  # the slot copy or the state commit
            self._drop(dl, str(exc))
            self._storage_failed(dl.meta, dl.payload, dl.raw, exc, OtaReason.INSTALL_FAILED)
            return
        fault_point("ota.installed")
        stats = {"seconds": round(time.monotonic() - dl.started, 3), **dl.assembler.progress()}
        self._drop(dl, "finished")
        self._finish(rid)
        if gate.passed:
            self.agent.reporter.event("ota.completed", release_id=rid, version=dl.meta.version, stats=stats)
        else:
            self._fail(rid, OtaReason.INSTALL_FAILED, f"health gate: {gate.check}: {gate.reason}", check=gate.check)
        self.agent.reporter.publish_state()

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _active_sha(self, slot: str | None) -> str | None:
        if slot is None:
            return None
        try:
            return _sha256_file(self.agent.store.path(slot))
        except OSError:
            return None

    def _drop(self, dl: _Download, why: str) -> None:
        with self._lock:
            log.info("ota: download of %s ends: %s", dl.meta.release_id, why)
            dl.transfer.close()
            self.transfers.discard(dl.meta.release_id)
            if self._dl is dl:
                self._dl = None
            self._update_subscriptions()

    def _finish(self, release_id: str) -> None:
        with self._lock:
            if self._wanted == release_id:
                self._wanted = None
                self._wanted_file.unlink(missing_ok=True)
            if self._deferred is not None and self._deferred.release_id == release_id:
                self._deferred = None
            if self._dl is not None and self._dl.meta.release_id == release_id:
                self._drop(self._dl, "finished")
            else:
                self.transfers.discard(release_id)
            self._update_subscriptions()

    def _reject(self, release_id: str, exc: ReleaseRejected) -> None:
        log.warning("ota: %s", exc)
        self.agent.reporter.event("ota.rejected", release_id=release_id, reason=exc.reason, detail=exc.detail)
        self._finish(release_id)

    def _fail(self, release_id: str, reason: OtaReason, detail: str, **fields: Any) -> None:
        log.warning("ota: %s failed (%s): %s", release_id, reason, detail)
        self.agent.reporter.event("ota.failed", release_id=release_id, reason=reason.value, detail=detail, **fields)
        self._finish(release_id)

    def _update_subscriptions(self) -> None:
        topics: list[str] = [] if self.agent.trust is None else [self.agent.trust.topics.all]
        wanted = self._dl.meta.release_id if self._dl is not None else self._wanted
        if wanted is not None:
            t = release_topics(self.agent.cfg.fleet, wanted)
            topics.append(t.manifest)
            if self._dl is not None and not self._dl.applying:
                topics.append(t.chunk)
        self.agent.reporter.set_extra_subscriptions(topics)

    def _read_wanted(self) -> str | None:
        try:
            doc = json.loads(self._wanted_file.read_bytes())
            return validate_segment(doc["release_id"], "release id")
        except (OSError, ValueError, KeyError, TypeError):  # a missing or damaged file: nothing is wanted
            return None

