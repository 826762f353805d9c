"""Tensor data regions of a TFLite flatbuffer, read without TensorFlow (light core: stdlib only).

The reader walks only what the delta encoder needs from ``tensorflow/lite/schema/schema.fbs``::

    table Model     { version:uint; operator_codes; subgraphs:[SubGraph] (2); description; buffers:[Buffer] (4); ... }
    table SubGraph  { tensors:[Tensor] (0); inputs; outputs; operators; name; ... }
    table Tensor    { shape; type:TensorType (1, byte); buffer:uint (2); name:string (3); ... }
    table Buffer    { data:[ubyte] (0); offset:ulong (1); size:ulong (2) }   // offset/size: models > 2 GB

A buffer's bytes are either the ``data`` vector inside the flatbuffer or, for large models, ``size`` bytes at
``offset`` from the start of the file (after the flatbuffer). Each buffer becomes one :class:`Region` keyed by
the name of the first tensor that uses it (``buffer#N`` when no tensor names it), with the element size of that
tensor's type.

Guarantees: every offset and length is checked against the buffer before use, every vector length against the
bytes left, and loops run at most once per element of a bounds-checked vector, so any input ends in bounded time
and memory. Malformed input raises :class:`LayoutError` (the caller then treats the file as opaque); no other
exception escapes. It does not check that the flatbuffer is a valid model (that is the runtime's job).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from edgeops.delta.regions import LayoutError, Region

__all__ = ["TFLITE_IDENTIFIER", "is_tflite", "tflite_regions"]

TFLITE_IDENTIFIER = b"TFL3"
MAX_NAME_BYTES = 512  # a longer tensor name is cut (only used as a pairing key)

# TensorType -> element size in bytes (sub-byte and opaque types count as 1; complex as its float parts).
_ELEM_SIZE = {
    0: 4,  # FLOAT32
    1: 2,  # FLOAT16
    2: 4,  # INT32
    3: 1,  # UINT8
    4: 8,  # INT64
    5: 1,  # STRING
    6: 1,  # BOOL
    7: 2,  # INT16
    8: 4,  # COMPLEX64
    9: 1,  # INT8
    10: 8,  # FLOAT64
    11: 8,  # COMPLEX128
    12: 8,  # UINT64
    15: 4,  # UINT32
    16: 2,  # UINT16
    18: 2,  # BFLOAT16
}

# Field numbers (vtable slots) of the tables above.
_MODEL_SUBGRAPHS, _MODEL_BUFFERS = 2, 4
_SUBGRAPH_TENSORS = 0
_TENSOR_TYPE, _TENSOR_BUFFER, _TENSOR_NAME = 1, 2, 3
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2


def is_tflite(data: memoryview) -> bool:
    """Whether ``data`` carries the TFLite file identifier."""
    return len(data) >= 8 and bytes(data[4:8]) == TFLITE_IDENTIFIER


class _FlatBuffer:
    """Bounds-checked reads of flatbuffer scalars, tables and vectors in ``buf``."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.size = len(buf)
        # Tables visited, at most one per 8 bytes of file (+ slack): a legitimate model's tables are distinct and
        # each takes at least 8 bytes (its vtable offset and a field), so a file whose vectors point at the same
        # tables again and again (a DAG that would take 10^10 visits) stops here, in time linear in its size.
        self.budget = self.size // 8 + 64

    def check(self, pos: int, n: int) -> None:
        if pos < 0 or pos + n > self.size:
            raise LayoutError(f"flatbuffer read of {n} bytes at {pos} is outside the {self.size}-byte file")

    def u8(self, pos: int) -> int:
        self.check(pos, 1)
        return int(self.buf[pos])

    def u16(self, pos: int) -> int:
        self.check(pos, 2)
        return int(struct.unpack_from("<H", self.buf, pos)[0])

    def u32(self, pos: int) -> int:
        self.check(pos, 4)
        return int(struct.unpack_from("<I", self.buf, pos)[0])

    def i32(self, pos: int) -> int:
        self.check(pos, 4)
        return int(struct.unpack_from("<i", self.buf, pos)[0])

    def u64(self, pos: int) -> int:
        self.check(pos, 8)
        return int(struct.unpack_from("<Q", self.buf, pos)[0])

    def field(self, table: int, slot: int) -> int | None:
        """Absolute position of field ``slot`` of the table at ``table``, or None when the field is absent."""
        vtable = table - self.i32(table)
        vt_size = self.u16(vtable)
        if vt_size < 4 or vt_size % 2:
            raise LayoutError("malformed flatbuffer vtable")
        entry = 4 + 2 * slot
        if entry + 2 > vt_size:
            return None
        rel = self.u16(vtable + entry)
        if rel == 0:
            return None
        if rel >= self.u16(vtable + 2):  # the field must lie inside the table's inline size
            raise LayoutError("flatbuffer field outside its table")
        self.check(table + rel, 1)
        return table + rel

    def deref(self, pos: int) -> int:
        """Follow the uoffset stored at ``pos``."""
        target = pos + self.u32(pos)
        self.check(target, 4)
        return target

    def vector(self, pos: int, elem_bytes: int) -> tuple[int, int]:
        """(start of elements, element count) of the vector referenced by the uoffset at ``pos``."""
        vec = self.deref(pos)
        count = self.u32(vec)
        self.check(vec + 4, count * elem_bytes)
        return vec + 4, count

    def tables(self, table: int, slot: int) -> Iterator[int]:
        """Positions of the tables in the vector-of-tables field ``slot`` (none when absent)."""
        pos = self.field(table, slot)
        if pos is None:
            return
        start, count = self.vector(pos, 4)
        for i in range(count):
            self.budget -= 1
            if self.budget < 0:
                raise LayoutError("flatbuffer visits more tables than it can hold")
            yield self.deref(start + 4 * i)

    def string(self, pos: int) -> str:
        start, count = self.vector(pos, 1)
        return bytes(self.buf[start : start + min(count, MAX_NAME_BYTES)]).decode("utf-8", "replace")


def _tensor_info(fb: _FlatBuffer, model: int) -> dict[int, tuple[str, int]]:
    """buffer index -> (name, element size) of the first tensor, over all subgraphs, that uses it."""
    info: dict[int, tuple[str, int]] = {}
    for subgraph in fb.tables(model, _MODEL_SUBGRAPHS):
        for tensor in fb.tables(subgraph, _SUBGRAPH_TENSORS):
            buf_pos = fb.field(tensor, _TENSOR_BUFFER)
            index = 0 if buf_pos is None else fb.u32(buf_pos)
            if index == 0 or index in info:
                continue
            type_pos = fb.field(tensor, _TENSOR_TYPE)
            elem = _ELEM_SIZE.get(0 if type_pos is None else fb.u8(type_pos), 1)
            name_pos = fb.field(tensor, _TENSOR_NAME)
            info[index] = ("" if name_pos is None else fb.string(name_pos), elem)
    return info


def _buffer_span(fb: _FlatBuffer, buffer: int) -> tuple[int, int] | None:
    """(offset, length) of a buffer's bytes in the file, or None when it holds none."""
    data = fb.field(buffer, _BUFFER_DATA)
    if data is not None:
        start, count = fb.vector(data, 1)
        return (start, count) if count else None
    off_pos, size_pos = fb.field(buffer, _BUFFER_OFFSET), fb.field(buffer, _BUFFER_SIZE)
    if off_pos is None or size_pos is None:
        return None
    offset, size = fb.u64(off_pos), fb.u64(size_pos)
    if offset <= 1 or size == 0 or offset + size > fb.size:  # 0/1: the converter's "no data"; past the end:
        return None  # the data is not in this file (e.g. a model cut short inside an archive): nothing to pair
    return offset, size


def tflite_regions(data: memoryview, base: int = 0, prefix: str = "") -> list[Region]:
    """Regions of every non-empty buffer of the TFLite model in ``data``; offsets are ``base`` + file offset.

    Raises LayoutError when the flatbuffer is malformed.
    """
    fb = _FlatBuffer(data)
    model = fb.deref(0)
    info = _tensor_info(fb, model)
    regions = []
    for index, buffer in enumerate(fb.tables(model, _MODEL_BUFFERS)):
        span = _buffer_span(fb, buffer)
        if span is None:
            continue
        name, elem = info.get(index, ("", 1))
        key = f"{prefix}{name}" if name else f"{prefix}buffer#{index}"
        regions.append(Region(base + span[0], span[1], elem, key))
    return regions
