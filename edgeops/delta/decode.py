"""Applying a delta patch with bounded memory (light core: the device runs this).

:func:`apply_delta` checks the whole patch structure (header, op table, totals) and OLD's size and sha256 before
it writes a byte; then it makes NEW op by op, reading OLD by offset (``pread``, so OLD is never mapped or held)
and writing NEW sequentially to a temp file in OUT's directory while hashing it; it fsyncs and renames the temp
file onto OUT only when the hash is the one the patch announces (and the caller expects).

Memory: at most one DIFF/PLANES op (MAX_DIFF_BYTES of NEW) in a few copies, plus, when the patch has a literal
stream, its dictionary D (OLD's bytes outside the tensors the ops read; all of OLD for ``zstd-patch-from``) and
the zstd window W (at most the literal stream's size, and capped by what the encoder asks for): the peak is about
max(2 D, D + W) + a few MiB. For tensor-planes patches D and W are the files' non-tensor bytes (kilobytes to a
few MiB); for zstd-patch-from it is max(2 old, old + new), within old + new + 16 MiB unless OLD is much larger
than NEW.

Guarantees: on any failure no OUT and no temp file are left, and OUT keeps what it held. Raises
:class:`DeltaFormatError` (malformed or truncated patch, or OLD is not its base), :class:`IntegrityError` (the
result's sha256 is not the announced or expected one), :class:`StorageError` (OUT cannot be written: missing
or read-only directory, disk full, file too large), and OSError when OLD or the patch cannot be read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

import numpy as np
import zstandard

from edgeops.atomic_file import fsync_dir
from edgeops.delta.op_table import Copy, Diff, Literal, Planes, iter_dict_ranges, iter_ops
from edgeops.delta.patch_format import HEADER_SIZE, PatchHeader, SectionSizes, parse_header
from edgeops.delta.planes import apply_transform, decode_planes
from edgeops.delta.zstd_prefix import prefix_window_log
from edgeops.errors import DeltaFormatError, IntegrityError, StorageError

__all__ = ["apply_delta", "read_patch_header"]

IO_CHUNK = 1 << 20  # bytes read or written at a time


def _pread(fd: int, length: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise DeltaFormatError(f"{what} ends early (wanted {length} bytes at {offset})")
    return data


def _open_header(fd: int) -> tuple[PatchHeader, SectionSizes]:
    size = os.fstat(fd).st_size
    return parse_header(os.pread(fd, HEADER_SIZE, 0), size)


def read_patch_header(patch: Path) -> PatchHeader:
    """The header of ``patch``, its section sizes checked against the file. Raises DeltaFormatError, OSError."""
    fd = os.open(patch, os.O_RDONLY)
    try:
        return _open_header(fd)[0]
    finally:
        os.close(fd)


def _check_base(fd: int, path: Path, header: PatchHeader) -> None:
    size = os.fstat(fd).st_size
    digest = hashlib.sha256()
    if size == header.old_size:
        for offset in range(0, size, IO_CHUNK):
            digest.update(_pread(fd, min(IO_CHUNK, size - offset), offset, str(path)))
    if size != header.old_size or digest.hexdigest() != header.old_sha256:
        raise DeltaFormatError(
            f"{path} is not the base of this patch: the patch applies to sha256 {header.old_sha256} "
            f"({header.old_size} bytes), {path} has {size} bytes"
            + (f" and sha256 {digest.hexdigest()}" if size == header.old_size else "")
        )


def _decompress_table(fd: int, sizes: SectionSizes) -> bytes:
    raw = _pread(fd, sizes.table, HEADER_SIZE, "delta op table")
    try:
        params = zstandard.get_frame_parameters(raw)
        if params.content_size != sizes.table_raw:
            raise DeltaFormatError("delta op table frame does not announce the table's size")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        table = dobj.decompress(raw)
        if len(table) != sizes.table_raw or not dobj.eof or dobj.unused_data:
            raise DeltaFormatError("delta op table frame is truncated or has trailing bytes")
        return table
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"corrupt delta op table: {exc}") from None


class _Section:
    """A read-only file-like view of ``length`` bytes at ``offset`` of ``fd`` (the literal frame's source)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.pos, self.end = fd, offset, offset + length

    def read(self, size: int = -1) -> bytes:
        n = self.end - self.pos if size < 0 else min(size, self.end - self.pos)
        data = os.pread(self.fd, n, self.pos) if n > 0 else b""
        self.pos += len(data)
        return data


class _LiteralStream:
    """The literal stream: one zstd frame decoded on demand, never more than asked for."""

    def __init__(self, patch_fd: int, old_fd: int, table: bytes, header: PatchHeader, sizes: SectionSizes) -> None:
        self.remaining = sizes.literal_raw
        if not sizes.literal_raw:
            self.reader = None
            return
        start = HEADER_SIZE + sizes.table
        try:
            params = zstandard.get_frame_parameters(_pread(patch_fd, min(sizes.literal, 18), start, "literal frame"))
        except zstandard.ZstdError as exc:
            raise DeltaFormatError(f"corrupt literal frame: {exc}") from None
        dict_size = sum(n for _, n in iter_dict_ranges(table, header.old_size))
        window_cap = 1 << prefix_window_log(dict_size, sizes.literal_raw)  # what the encoder asks for, at most
        if params.content_size != sizes.literal_raw or params.window_size > window_cap or params.dict_id:
            raise DeltaFormatError("literal frame does not match the patch header")
        dictionary = _dictionary(old_fd, table, header.old_size, dict_size)
        dctx = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=max(params.window_size, 1 << 10))
        section = cast(IO[bytes], _Section(patch_fd, start, sizes.literal))  # read() is all the reader uses
        self.reader = dctx.stream_reader(section, read_size=1 << 16)

    def read(self, length: int) -> Iterator[bytes]:
        """The next ``length`` bytes of the stream, in pieces of at most IO_CHUNK."""
        if self.reader is None or length > self.remaining:
            raise DeltaFormatError("LIT op reads past the literal stream")
        self.remaining -= length
        try:
            while length:
                piece = self.reader.read(min(length, IO_CHUNK))
                if not piece:
                    raise DeltaFormatError("literal frame is truncated")
                length -= len(piece)
                yield piece
        except zstandard.ZstdError as exc:
            raise DeltaFormatError(f"corrupt literal frame: {exc}") from None

    def check_end(self) -> None:
        try:
            if self.reader is not None and self.reader.read(1):
                raise DeltaFormatError("literal frame holds more bytes than the header announces")
        except zstandard.ZstdError as exc:
            raise DeltaFormatError(f"corrupt literal frame: {exc}") from None


def _dictionary(old_fd: int, table: bytes, old_size: int, total: int) -> zstandard.ZstdCompressionDict | None:
    """The literal stream's raw-content dictionary: the OLD ranges the table lists (``total`` bytes), concatenated.

    Held once: the bytearray is copied into the dictionary and dropped, so the peak is 2 x ``total`` only while
    the dictionary is built, before the zstd window exists.
    """
    if not total:
        return None
    buf = bytearray(total)
    view, pos = memoryview(buf), 0
    for offset, length in iter_dict_ranges(table, old_size):
        if os.preadv(old_fd, [view[pos : pos + length]], offset) != length:
            raise DeltaFormatError("base file ends early")
        pos += length
    return zstandard.ZstdCompressionDict(buf, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


@contextmanager
def _temp_output(out: Path) -> Iterator[tuple[int, str]]:
    """A temp file beside ``out`` (fd, path), removed unless the caller renamed it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise StorageError(f"cannot write to {out.parent}: {exc.strerror}") from exc
    try:
        yield fd, tmp
    finally:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)


class _Output:
    """NEW's bytes going to the temp file, hashed on the way; write errors become StorageError."""

    def __init__(self, fd: int, out: Path) -> None:
        self.fd, self.out = fd, out
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.written += len(view)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise StorageError(f"cannot write {self.out}: {exc.strerror}") from exc


def _copy(old_fd: int, op: Copy, sink: _Output) -> None:
    for start in range(0, op.length, IO_CHUNK):
        n = min(IO_CHUNK, op.length - start)
        sink.write(_pread(old_fd, n, op.old_offset + start, "base file"))


def _planes_op(
    old_fd: int, patch_fd: int, op: Diff | Planes, cursor: int, sink: _Output, dctx: zstandard.ZstdDecompressor
) -> int:
    """Apply one DIFF/PLANES op whose payload starts at ``cursor``; return where the next payload starts."""
    size = op.planes.payload_length
    d = decode_planes(op.planes, _pread(patch_fd, size, cursor, "delta payload") if size else b"", dctx)
    if isinstance(op, Planes):
        sink.write(d.data)
    else:
        old = np.frombuffer(_pread(old_fd, op.length, op.old_offset, "base file"), dtype=np.uint8)
        sink.write(apply_transform(op.transform, old, d, op.planes.elem_size).data)
    return cursor + size


def _run_ops(
    old_fd: int,
    patch_fd: int,
    table: bytes,
    header: PatchHeader,
    sizes: SectionSizes,
    sink: _Output,
    on_op: Callable[[], None] | None,
) -> None:
    literal = _LiteralStream(patch_fd, old_fd, table, header, sizes)
    dctx = zstandard.ZstdDecompressor()
    cursor = HEADER_SIZE + sizes.table + sizes.literal  # next plane payload
    for op in iter_ops(table, header, sizes):
        if isinstance(op, Copy):
            _copy(old_fd, op, sink)
        elif isinstance(op, Literal):
            for piece in literal.read(op.length):
                sink.write(piece)
        else:
            cursor = _planes_op(old_fd, patch_fd, op, cursor, sink, dctx)
        if on_op is not None:
            on_op()
    literal.check_end()


def apply_delta(
    old: Path,
    patch: Path,
    out: Path,
    *,
    expected_sha256: str | None = None,
    on_op: Callable[[], None] | None = None,
) -> str:
    """Make NEW from ``old`` and ``patch`` at ``out`` (atomically); return NEW's sha256 (hex).

    ``on_op`` is called after each op's bytes were written to the temp file (the agent's crash point
    ``ota.apply.record``; progress reporting); what it raises propagates, and the temp file is removed.

    Raises DeltaFormatError, IntegrityError, StorageError (see the module docstring); OSError when ``old`` or
    ``patch`` cannot be read.
    """
    expected = expected_sha256.lower() if expected_sha256 is not None else None
    with _open_fd(patch) as patch_fd, _open_fd(old) as old_fd:
        header, sizes = _open_header(patch_fd)
        if expected is not None and expected != header.new_sha256:
            raise IntegrityError(f"{patch} makes sha256 {header.new_sha256}, not the expected {expected}")
        _check_base(old_fd, old, header)
        table = _decompress_table(patch_fd, sizes)
        for _ in iter_dict_ranges(table, header.old_size):  # validate the whole table before writing anything
            pass
        for _ in iter_ops(table, header, sizes):
            pass
        with _temp_output(out) as (out_fd, tmp):
            sink = _Output(out_fd, out)
            _run_ops(old_fd, patch_fd, table, header, sizes, sink, on_op)
            result = sink.digest.hexdigest()
            if result != header.new_sha256:
                raise IntegrityError(f"{patch} applied to {old} gives sha256 {result}, not {header.new_sha256}")
            _commit(out_fd, tmp, out)
    return result


def _commit(fd: int, tmp: str, out: Path) -> None:
    try:
        os.fsync(fd)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {out}: {exc.strerror}") from exc


@contextmanager
def _open_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)
