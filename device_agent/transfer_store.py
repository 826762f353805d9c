"""An OTA download on the device's disk, resumable across agent, device and broker restarts.

Layout under ``root`` (``DATA_DIR/ota``), one directory per release id, at most one at a time::

    {release_id}/release.json   the signed release metadata, raw bytes as received
    {release_id}/payload.json   {"payload_id", "sha256", "size", "chunk_size"}: which payload is downloading
    {release_id}/payload.part   the payload file, preallocated to its full size; chunk i at i * chunk_size
    {release_id}/have.bitmap    one byte per chunk: 1 = chunk written (a hint, re-verified on open)

Guarantees:

- :meth:`TransferStore.begin` builds a new transfer in a temp directory (``.new-*``: metadata files fsynced, the
  part file preallocated with ``posix_fallocate``, else sized with ``ftruncate``) and renames it into place, so a
  transfer directory is either complete or absent; a full disk raises :class:`StorageError` and leaves nothing
  behind. Only one release downloads at a time: ``begin`` discards every other release's directory.
- :meth:`Transfer.write_chunk` writes a chunk's bytes first and its flag second, without fsync (slow on SD
  cards): after a power cut a flag may claim bytes that never reached the disk, so :meth:`TransferStore.open`
  re-hashes every flagged chunk against the signed chunk digests and clears the flags that do not match. What
  :attr:`Transfer.held` reports after an open is therefore exactly the verified chunks.
- Release ids are re-validated before they name a directory: a topic segment
  (:func:`edgeops.protocol.validate_segment`) that does not start with a dot (``.`` and ``..`` are segments);
  nothing outside ``root`` is ever read, written or removed, and symlinks inside it are not followed.
- Disk errors (full disk, file size limit, I/O error, read-only directory) raise :class:`StorageError` naming
  the path; a caller's misuse (bad index, wrong chunk length, a closed transfer) raises ValueError/RuntimeError.

Not done here: signature checks (the adapter re-verifies ``release.json`` from :meth:`TransferStore.saved` and
checks its release id), deciding what to download (:mod:`device_agent.ota_receiver`), or applying the payload.
Not thread-safe, one process per root; close a :class:`Transfer` before its directory is discarded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from device_agent.fault_points import fault_point
from edgeops.atomic_file import fsync_dir, write_bytes_atomic
from edgeops.errors import OutputError, ReleaseRejected, StorageError
from edgeops.protocol import validate_segment
from edgeops.release import OtaReason, Payload, ReleaseMetadata

__all__ = ["Transfer", "TransferStore"]

RELEASE_FILE = "release.json"
PAYLOAD_FILE = "payload.json"
PART_FILE = "payload.part"
BITMAP_FILE = "have.bitmap"
_OWN_FILES = frozenset({RELEASE_FILE, PAYLOAD_FILE, PART_FILE, BITMAP_FILE})
_TEMP_PREFIX = ".new-"
_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}  # posix_fallocate refusals that mean "not here"


def _storage_error(what: str, path: Path, exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "disk full"
    elif exc.errno == errno.EFBIG:
        why = "file too large for this filesystem or process limit"
    else:
        why = exc.strerror or str(exc)
    return StorageError(f"cannot {what} {path}: {why}")


def _payload_doc(meta: ReleaseMetadata, payload: Payload) -> dict[str, Any]:
    return {"payload_id": payload.id, "sha256": payload.sha256, "size": payload.size, "chunk_size": meta.chunk_size}


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class Transfer:
    """One open download: the part file and its chunk flags. Made by :class:`TransferStore`; close it after use."""

    def __init__(
        self, release_id: str, payload: Payload, chunk_size: int, directory: Path, part_fd: int, bitmap_fd: int,
        flags: bytearray,
    ) -> None:
        self.release_id = release_id
        self.payload = payload
        self.chunk_size = chunk_size
        self.dir = directory
        self._part_fd: int | None = part_fd
        self._bitmap_fd: int | None = bitmap_fd
        self._flags = flags
        self._held = sum(flags)

    @property
    def part_path(self) -> Path:
        return self.dir / PART_FILE

    @property
    def held(self) -> frozenset[int]:
        return frozenset(int(i) for i in np.flatnonzero(np.frombuffer(bytes(self._flags), dtype=np.uint8)))

    @property
    def complete(self) -> bool:
        return self._held == self.payload.chunk_count

    @property
    def closed(self) -> bool:
        return self._part_fd is None

    def write_chunk(self, index: int, data: bytes) -> None:
        """Write chunk ``index`` into the part file, then flag it (no fsync; see :meth:`sync`).

        Raises StorageError when the disk refuses (full, file size limit, I/O error); ValueError for an index out
        of range or data that is not the chunk's length; RuntimeError when the transfer is closed.
        """
        part_fd, bitmap_fd = self._fds()
        if not 0 <= index < self.payload.chunk_count:
            raise ValueError(f"chunk index {index} out of range 0..{self.payload.chunk_count - 1}")
        offset, length = self.payload.chunk_range(index, self.chunk_size)
        if len(data) != length:
            raise ValueError(f"chunk {index} must be {length} bytes, got {len(data)}")
        try:
            _pwrite_all(part_fd, data, offset)
        except OSError as exc:
            raise _storage_error(f"write chunk {index} to", self.part_path, exc) from exc
        fault_point("transfer.chunk.written")
        try:
            _pwrite_all(bitmap_fd, b"\x01", index)
        except OSError as exc:
            raise _storage_error(f"flag chunk {index} in", self.dir / BITMAP_FILE, exc) from exc
        if not self._flags[index]:
            self._flags[index] = 1
            self._held += 1

    def sync(self) -> None:
        """Make the chunks written so far durable: fsync the part file, then the flags. Raises StorageError."""
        part_fd, bitmap_fd = self._fds()
        for fd, name in ((part_fd, PART_FILE), (bitmap_fd, BITMAP_FILE)):
            try:
                os.fsync(fd)
            except OSError as exc:
                raise _storage_error("sync", self.dir / name, exc) from exc
        fault_point("transfer.synced")

    def scratch_path(self, name: str) -> Path:
        """A path in the transfer directory for the adapter's own files (e.g. the applied target).

        Raises ValueError for a name that is not a plain file name or is one of the store's own files.
        """
        validate_segment(name, "scratch file name")
        if name in _OWN_FILES or name.startswith("."):
            raise ValueError(f"{name!r} is reserved for the transfer store")
        return self.dir / name

    def close(self) -> None:
        """Close the files (idempotent). Does not sync: call :meth:`sync` first to make the chunks durable."""
        for fd in (self._part_fd, self._bitmap_fd):
            if fd is not None:
                os.close(fd)
        self._part_fd = self._bitmap_fd = None

    def __enter__(self) -> Transfer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _fds(self) -> tuple[int, int]:
        if self._part_fd is None or self._bitmap_fd is None:
            raise RuntimeError(f"transfer {self.release_id} is closed")
        return self._part_fd, self._bitmap_fd


class TransferStore:
    """The OTA downloads under ``root``. Raises StorageError when ``root`` cannot be created."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_error("create the OTA directory", self.root, exc) from exc

    def begin(self, meta_raw: bytes, meta: ReleaseMetadata, payload: Payload) -> Transfer:
        """The transfer for ``payload`` of ``meta``: the one on disk when it is for this payload (resumed, its
        chunks re-verified), else a new one; every other transfer directory is discarded first.

        Raises StorageError when the disk cannot hold the payload (nothing is left behind); ReleaseRejected
        (malformed) when the release id is not safe as a directory name (``..``, a leading dot); ValueError when
        ``payload`` is not one of ``meta``'s payloads.
        """
        directory = self._dir_for(meta, payload)
        self._discard_all_but(directory.name)
        if self._is_own_dir(directory) and self._payload_doc(directory) == _payload_doc(meta, payload):
            try:
                transfer = self.open(meta, payload)
            except StorageError:
                pass  # unusable leftovers: start over below
            else:
                self._refresh_metadata(directory, meta_raw)
                return transfer
        self.discard(directory.name)
        self._create(directory, meta_raw, meta, payload)
        return self.open(meta, payload)

    def saved(self) -> list[tuple[str, bytes, str]]:
        """(release id, raw metadata bytes, payload id) of each transfer on disk, by release id.

        A directory with a missing or unreadable file, and the leftovers of an interrupted :meth:`begin`, are
        removed. The metadata is NOT verified here: the caller checks its signature and release id.
        """
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(_TEMP_PREFIX):
                self._remove(entry)  # an interrupted begin()
                continue
            if not self._is_own_dir(entry):
                continue
            raw, doc = self._release_raw(entry), self._payload_doc(entry)
            if raw is None or doc is None or not (entry / PART_FILE).is_file() or not (entry / BITMAP_FILE).is_file():
                self._remove(entry)
                continue
            found.append((entry.name, raw, str(doc["payload_id"])))
        return found

    def open(self, meta: ReleaseMetadata, payload: Payload) -> Transfer:
        """Reopen the saved transfer of ``payload``: flagged chunks whose bytes do not hash to the signed digest are
        un-flagged (they will be downloaded again).

        Raises StorageError when there is no such transfer or its files are unusable (another payload, a part
        file of the wrong size, a bitmap of the wrong length, unreadable); ReleaseRejected, ValueError as
        :meth:`begin`.
        """
        directory = self._dir_for(meta, payload)
        if self._payload_doc(directory) != _payload_doc(meta, payload):
            raise StorageError(f"{directory} holds no usable transfer of payload {payload.id}")
        part = directory / PART_FILE
        fds: list[int] = []
        try:
            fds.append(os.open(part, os.O_RDWR | os.O_NOFOLLOW))
            if os.fstat(fds[0]).st_size != payload.size:
                raise StorageError(f"{part} is {os.fstat(fds[0]).st_size} bytes, the payload is {payload.size}")
            fds.append(os.open(directory / BITMAP_FILE, os.O_RDWR | os.O_NOFOLLOW))
            flags = bytearray(os.pread(fds[1], payload.chunk_count + 1, 0))
            if len(flags) != payload.chunk_count:
                raise StorageError(f"{directory / BITMAP_FILE} is not one byte per chunk ({payload.chunk_count})")
            self._verify_flags(fds[0], fds[1], flags, payload, meta.chunk_size)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise _storage_error("open the transfer in", directory, exc) from exc
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Transfer(meta.release_id, payload, meta.chunk_size, directory, fds[0], fds[1], flags)

    def allocated_bytes(self) -> int:
        """Bytes the transfers under ``root`` take on disk now: what discarding them all would give back."""
        total = 0
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(directory, name)).st_blocks * 512
                except OSError:  # removed meanwhile
                    continue
        return total

    def discard(self, release_id: str) -> None:
        """Remove a release's transfer directory (nothing when there is none).

        Raises StorageError when it cannot be removed; ValueError for a release id unsafe as a directory name.
        """
        self._remove(self.root / _dir_name(release_id))

    # --- internals ----------------------------------------------------------------------------------------

    def _dir_for(self, meta: ReleaseMetadata, payload: Payload) -> Path:
        if payload not in meta.payloads:
            raise ValueError(f"payload {payload.id} is not one of release {meta.release_id}'s payloads")
        try:
            return self.root / _dir_name(meta.release_id)
        except ValueError as exc:
            raise ReleaseRejected(OtaReason.MALFORMED.value, str(exc)) from None

    @staticmethod
    def _is_own_dir(entry: Path) -> bool:
        try:
            _dir_name(entry.name)
        except ValueError:
            return False
        return entry.is_dir() and not entry.is_symlink()

    def _discard_all_but(self, keep: str) -> None:
        for entry in self.root.iterdir():
            if entry.name != keep and (entry.name.startswith(_TEMP_PREFIX) or self._is_own_dir(entry)):
                self._remove(entry)

    def _remove(self, path: Path) -> None:
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage_error("remove", path, exc) from exc

    @staticmethod
    def _release_raw(directory: Path) -> bytes | None:
        try:
            raw = (directory / RELEASE_FILE).read_bytes()
            return raw if isinstance(json.loads(raw), dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _payload_doc(directory: Path) -> dict[str, Any] | None:
        try:
            doc = json.loads((directory / PAYLOAD_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("payload_id"), str):
            return None
        return doc

    @staticmethod
    def _verify_flags(part_fd: int, bitmap_fd: int, flags: bytearray, payload: Payload, chunk_size: int) -> None:
        """Keep a flag only when its chunk's bytes on disk hash to the signed digest; persist the cleared flags."""
        on_disk = bytes(flags)
        for index, flag in enumerate(on_disk):
            if flag == 0:
                continue
            if flag == 1:
                offset, length = payload.chunk_range(index, chunk_size)
                if hashlib.sha256(os.pread(part_fd, length, offset)).digest() == payload.chunk_hashes[index]:
                    continue
            flags[index] = 0
        if bytes(flags) != on_disk:
            _pwrite_all(bitmap_fd, bytes(flags), 0)

    def _create(self, directory: Path, meta_raw: bytes, meta: ReleaseMetadata, payload: Payload) -> None:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{directory.name}-", dir=self.root))
        except OSError as exc:
            raise _storage_error("create a transfer in", self.root, exc) from exc
        try:
            _write_synced(tmp / RELEASE_FILE, meta_raw)
            _write_synced(tmp / PAYLOAD_FILE, json.dumps(_payload_doc(meta, payload)).encode())
            _write_synced(tmp / BITMAP_FILE, bytes(payload.chunk_count))
            _preallocate(tmp / PART_FILE, payload.size)
            fsync_dir(tmp)
            fault_point("transfer.preallocated")
            os.rename(tmp, directory)
            fsync_dir(self.root)
            fault_point("transfer.created")
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _storage_error(f"store the {payload.size}-byte download in", self.root, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _refresh_metadata(directory: Path, meta_raw: bytes) -> None:
        """A re-published release (same payload, new signature or date) resumes; keep its newest metadata."""
        path = directory / RELEASE_FILE
        try:
            if path.read_bytes() == meta_raw:
                return
        except OSError:
            pass
        try:
            write_bytes_atomic(path, meta_raw)
        except OutputError as exc:
            raise StorageError(str(exc)) from exc


def _dir_name(release_id: str) -> str:
    """``release_id`` when it is safe as a directory name: a topic segment that does not start with a dot (which
    ``validate_segment`` alone would allow: ``.`` and ``..`` are segments). Raises ValueError otherwise."""
    validate_segment(release_id, "release id")
    if release_id.startswith("."):
        raise ValueError(f"invalid release id {release_id!r}: must not start with '.'")
    return release_id


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _preallocate(path: Path, size: int) -> None:
    """Create ``path`` with ``size`` bytes reserved on disk (sparse when the filesystem cannot reserve)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
                os.ftruncate(fd, size)
        elif size:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
