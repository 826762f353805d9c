"""Where the tensors are: tensor data regions of a model file or an edgeops artifact (light core).

:func:`find_regions` recognises, by content:

- a POSIX tar (an edgeops artifact is a canonical ustar): it walks the 512-byte headers and looks inside the
  members named ``*.tflite``, ``*.onnx`` and ``*.npy``, so regions are absolute offsets in the archive;
- a TFLite flatbuffer (file identifier ``TFL3``): :mod:`edgeops.delta.tflite_layout`;
- a ``.npy`` array (golden data): its data after the header;
- an ONNX protobuf: :mod:`edgeops.delta.onnx_layout`.

Guarantees: never raises for any input bytes — a file, or a member, that no reader understands yields no
regions, and the encoder then treats its bytes as opaque. The result is sorted by offset, within the input, free
of overlaps and empty regions, holds at most :data:`MAX_REGIONS` regions with unique keys, and each region's
length is a multiple of its element size. The regions only steer the encoder; a patch's correctness never
depends on them (the decoder does not run these readers).
"""

from __future__ import annotations

import re
import struct

from edgeops.delta.onnx_layout import onnx_regions
from edgeops.delta.regions import ELEM_SIZES, LayoutError, Region
from edgeops.delta.tflite_layout import is_tflite, tflite_regions

__all__ = ["MAX_REGIONS", "find_regions"]

MAX_REGIONS = 1_000_000
MAX_TAR_MEMBERS = 100_000
TAR_BLOCK = 512
NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(rb"'descr':\s*'[<>|=]?[a-zA-Z](\d+)'")
_MODEL_SUFFIXES = (".tflite", ".onnx", ".npy")


def find_regions(data: bytes | memoryview) -> tuple[Region, ...]:
    """The tensor data regions of ``data`` (a model file, an artifact, or anything: then none)."""
    view = memoryview(data).cast("B")
    found = _tar_regions(view) if _is_tar(view) else _file_regions(view, 0, "", "")
    return _normalise(found, len(view))


def _file_regions(view: memoryview, base: int, prefix: str, name: str) -> list[Region]:
    """Regions of one file (the whole input, or a tar member at ``base``); none when no reader fits."""
    try:
        if is_tflite(view):
            return tflite_regions(view, base, prefix)
        if bytes(view[: len(NPY_MAGIC)]) == NPY_MAGIC:
            return _npy_regions(view, base, prefix)
        if name.endswith(".onnx") or not name:
            return onnx_regions(view, base, prefix)
    except LayoutError:
        pass
    return []


def _is_tar(view: memoryview) -> bool:
    return len(view) >= TAR_BLOCK and bytes(view[257:262]) == b"ustar" and _tar_checksum_ok(view[:TAR_BLOCK])


def _tar_checksum_ok(header: memoryview) -> bool:
    try:
        stored = int(bytes(header[148:156]).strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 0x20 + sum(header[156:])


def _tar_member(header: memoryview) -> tuple[str, int, bool]:
    """(path, size, is a regular file) of a ustar header; LayoutError when the header is malformed."""
    if not _tar_checksum_ok(header):
        raise LayoutError("tar header checksum mismatch")
    try:
        size = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise LayoutError("tar member size is not octal") from None
    name = bytes(header[0:100]).split(b"\0", 1)[0]
    prefix = bytes(header[345:500]).split(b"\0", 1)[0]
    path = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
    return path, size, bytes(header[156:157]) in (b"0", b"\0")


def _tar_regions(view: memoryview) -> list[Region]:
    regions: list[Region] = []
    pos = 0
    for _ in range(MAX_TAR_MEMBERS):
        if pos + TAR_BLOCK > len(view) or not any(view[pos : pos + TAR_BLOCK]):
            break
        try:
            path, size, regular = _tar_member(view[pos : pos + TAR_BLOCK])
        except LayoutError:
            break
        start = pos + TAR_BLOCK
        if start + size > len(view):
            break
        if regular and path.endswith(_MODEL_SUFFIXES):
            regions += _file_regions(view[start : start + size], start, f"{path}:", path)
        pos = start + size + (-size % TAR_BLOCK)
    return regions


def _npy_regions(view: memoryview, base: int, prefix: str) -> list[Region]:
    if len(view) < 10:
        raise LayoutError("truncated .npy header")
    major = view[6]
    if major == 1:
        header_len, start = struct.unpack_from("<H", view, 8)[0], 10
    elif major in (2, 3) and len(view) >= 12:
        header_len, start = struct.unpack_from("<I", view, 8)[0], 12
    else:
        raise LayoutError("unknown .npy version")
    data_start = start + header_len
    if data_start >= len(view):
        raise LayoutError(".npy header runs past the file or holds no data")
    match = _NPY_DESCR.search(bytes(view[start : min(data_start, start + 4096)]))
    elem = int(match.group(1)) if match else 1
    return [Region(base + data_start, len(view) - data_start, elem, f"{prefix}npy")]


def _normalise(found: list[Region], size: int) -> tuple[Region, ...]:
    """Sorted, in bounds, non-overlapping, non-empty, unique keys, length a multiple of the element size."""
    out: list[Region] = []
    used: set[str] = set()
    suffix: dict[str, int] = {}  # last "#n" given to a repeated key
    end = 0
    for r in sorted(found, key=lambda r: (r.offset, -r.length)):
        if r.length <= 0 or r.offset < end or r.offset + r.length > size or len(out) >= MAX_REGIONS:
            continue  # a buffer shared by two tensors, or a region a malformed file points anywhere
        elem = r.elem_size if r.elem_size in ELEM_SIZES and r.length % r.elem_size == 0 else 1
        key, n = r.key, suffix.get(r.key, 0)
        while key in used:
            n += 1
            key = f"{r.key}#{n}"
        suffix[r.key] = n
        used.add(key)
        out.append(Region(r.offset, r.length, elem, key))
        end = r.offset + r.length
    return tuple(out)
