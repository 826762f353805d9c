"""The op table of a delta patch: what makes each byte of NEW (light core; sans-I/O: bytes in, values out).

Table, in LEB128 varints (``v``; ``z`` = zigzag varint, a signed number)::

    v n_ranges, n_ranges x (v gap, v length)   dictionary: OLD ranges, ascending, disjoint, non-empty; ``gap``
                                               counts from the end of the previous range (from 0 for the first)
    ops, until the end of the table; each makes the next ``length`` bytes of NEW:
      0x01 COPY   z old_delta, v length        OLD[old : old + length]
      0x02 LIT    v length                     the next ``length`` bytes of the literal stream
      0x03 DIFF   z old_delta, v length, u8 transform, planes
                                               inverse transform of (OLD[old : old + length], planes)
      0x04 PLANES v length, planes             the planes' bytes themselves (no counterpart in OLD)
    planes: u8 elem_size (1, 2, 4, 8), u8 flags (bit 0: sparse), [v nonzero if sparse],
            one u8 method per plane, [v frame_length if any method is ZSTD]

``old = cursor + old_delta``, where the cursor is the end of the previous COPY/DIFF's OLD range advanced by the
lengths of the LIT/PLANES ops since (0 at the start): for a file whose layout did not move, every delta is 0.

Planes: a DIFF's difference ``d`` (for PLANES, NEW's own bytes) is ``n = length / elem_size`` elements; plane k
holds byte k of every element. Dense: ``elem_size`` planes of n bytes. Sparse: first a mask plane of
ceil(n / 8) bytes (bit i, little-endian bit order, set when element i is not zero; exactly ``nonzero`` bits
set), then ``elem_size`` planes of ``nonzero`` bytes holding only the non-zero elements. Each plane is ZERO (all
zero, nothing stored), RAW (stored as is) or ZSTD; the ZSTD planes, concatenated in order, are one zstd frame
of ``frame_length`` bytes that announces their total size. An op's payload is its RAW planes in order, then its
frame. ``length`` is at most MAX_DIFF_BYTES.

Transforms (:mod:`edgeops.delta.planes`): SUB8 per byte mod 256, SUB zigzag of the per-element difference mod
2^(8 elem_size), XOR.

Guarantees: :func:`iter_ops` and :func:`iter_dict_ranges` accept only well-formed input with consistent totals:
every offset, length and count is checked (OLD ranges inside OLD, the dictionary at most OLD's size, ops making
exactly ``new_size`` bytes, LIT ops exactly ``literal_raw``, payloads exactly ``payload_size``) before a caller
uses it. Anything else raises :class:`DeltaFormatError`; no other exception escapes. Parsing is linear in the
table and holds no per-op list.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from edgeops.delta.patch_format import MAX_TABLE_RAW, PatchHeader, SectionSizes
from edgeops.errors import DeltaFormatError

__all__ = [
    "ELEM_SIZES",
    "MAX_DIFF_BYTES",
    "Copy",
    "Diff",
    "Literal",
    "Op",
    "PlaneMethod",
    "PlaneSet",
    "Planes",
    "TableWriter",
    "Transform",
    "iter_dict_ranges",
    "iter_ops",
]

MAX_DIFF_BYTES = 2 << 20  # NEW bytes one DIFF/PLANES op makes: what apply holds in memory at once (a few copies)
ELEM_SIZES = (1, 2, 4, 8)
_SPARSE = 1


class Transform(IntEnum):
    NONE = 0  # the planes are NEW's bytes: a PLANES op (never in a DIFF op)
    SUB8 = 1
    SUB = 2
    XOR = 3


class PlaneMethod(IntEnum):
    ZERO = 0
    RAW = 1
    ZSTD = 2


class _OpCode(IntEnum):
    COPY = 1
    LIT = 2
    DIFF = 3
    PLANES = 4


@dataclass(frozen=True)
class PlaneSet:
    """How the byte planes of one DIFF/PLANES op of ``length`` bytes are stored."""

    length: int  # bytes of NEW the op makes
    elem_size: int
    nonzero: int | None  # sparse: elements that are not zero (a mask plane comes first); None: dense
    methods: tuple[PlaneMethod, ...]  # one per plane, the mask plane first when sparse
    frame_length: int  # bytes of the zstd frame of the ZSTD planes; 0 when there are none

    def plane_lengths(self) -> tuple[int, ...]:
        n = self.length // self.elem_size
        if self.nonzero is None:
            return (n,) * self.elem_size
        return ((n + 7) // 8,) + (self.nonzero,) * self.elem_size

    def raw_lengths(self) -> tuple[int, ...]:
        """Lengths of the RAW planes, in payload order."""
        return tuple(n for n, m in zip(self.plane_lengths(), self.methods) if m == PlaneMethod.RAW)

    def frame_content(self) -> int:
        """Bytes the zstd frame holds: the ZSTD planes' lengths added up."""
        return sum(n for n, m in zip(self.plane_lengths(), self.methods) if m == PlaneMethod.ZSTD)

    @property
    def payload_length(self) -> int:
        return sum(self.raw_lengths()) + self.frame_length


@dataclass(frozen=True)
class Copy:
    old_offset: int
    length: int


@dataclass(frozen=True)
class Literal:
    length: int


@dataclass(frozen=True)
class Diff:
    old_offset: int
    transform: Transform
    planes: PlaneSet

    @property
    def length(self) -> int:
        return self.planes.length


@dataclass(frozen=True)
class Planes:
    planes: PlaneSet

    @property
    def length(self) -> int:
        return self.planes.length


Op = Copy | Literal | Diff | Planes


class TableWriter:
    """Builds the op table; the encoder's half of :func:`iter_ops`. Raises ValueError on misuse."""

    def __init__(self, dict_ranges: list[tuple[int, int]]) -> None:
        self._out = bytearray()
        self._cursor = 0
        self._varint(len(dict_ranges))
        end = 0
        for offset, length in dict_ranges:
            if offset < end or length <= 0:
                raise ValueError("dictionary ranges must be ascending, disjoint and non-empty")
            self._varint(offset - end)
            self._varint(length)
            end = offset + length

    def _varint(self, value: int) -> None:
        if value < 0:
            raise ValueError("varints are unsigned")
        while value >= 0x80:
            self._out.append((value & 0x7F) | 0x80)
            value >>= 7
        self._out.append(value)

    def _old(self, offset: int, length: int) -> None:
        delta = offset - self._cursor
        self._varint(2 * delta if delta >= 0 else -2 * delta - 1)
        self._cursor = offset + length

    def _planes(self, p: PlaneSet) -> None:
        if p.length > MAX_DIFF_BYTES or p.elem_size not in ELEM_SIZES or p.length % p.elem_size or p.length <= 0:
            raise ValueError("DIFF/PLANES op out of bounds")
        self._out += bytes((p.elem_size, _SPARSE if p.nonzero is not None else 0))
        if p.nonzero is not None:
            self._varint(p.nonzero)
        self._out += bytes(p.methods)
        if PlaneMethod.ZSTD in p.methods:
            self._varint(p.frame_length)

    def op(self, op: Op) -> None:
        """Append ``op``."""
        if isinstance(op, Copy):
            self._out.append(_OpCode.COPY)
            self._old(op.old_offset, op.length)
            self._varint(op.length)
        elif isinstance(op, Literal):
            self._out.append(_OpCode.LIT)
            self._varint(op.length)
            self._cursor += op.length
        elif isinstance(op, Diff):
            if op.transform == Transform.NONE:
                raise ValueError("a DIFF op needs a transform (NONE is a PLANES op)")
            self._out.append(_OpCode.DIFF)
            self._old(op.old_offset, op.length)
            self._varint(op.length)
            self._out.append(op.transform)
            self._planes(op.planes)
        else:
            self._out.append(_OpCode.PLANES)
            self._varint(op.length)
            self._planes(op.planes)
            self._cursor += op.length

    def getvalue(self) -> bytes:
        if len(self._out) > MAX_TABLE_RAW:
            raise ValueError(f"op table over {MAX_TABLE_RAW} bytes")
        return bytes(self._out)


class _Reader:
    def __init__(self, table: bytes) -> None:
        self.buf = table
        self.pos = 0
        self.cursor = 0  # the OLD cursor of the module docstring

    def at_end(self) -> bool:
        return self.pos >= len(self.buf)

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise DeltaFormatError("delta op table is truncated")
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 64, 7):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
        raise DeltaFormatError("overlong varint in the delta op table")

    def old_range(self, old_size: int) -> tuple[int, int]:
        z = self.varint()
        offset = self.cursor + (z >> 1 if not z & 1 else -((z + 1) >> 1))
        length = self.varint()
        if length == 0 or offset < 0 or offset + length > old_size:
            raise DeltaFormatError(f"delta op reads OLD[{offset}:{offset + length}] outside the {old_size}-byte base")
        self.cursor = offset + length
        return offset, length


def iter_dict_ranges(table: bytes, old_size: int) -> Iterator[tuple[int, int]]:
    """The dictionary's OLD ranges (offset, length), checked. Raises DeltaFormatError."""
    r = _Reader(table)
    count = r.varint()
    if count > len(table):
        raise DeltaFormatError("delta dictionary count exceeds the op table")
    end = 0
    for _ in range(count):
        offset = end + r.varint()
        length = r.varint()
        if length == 0 or offset + length > old_size:
            raise DeltaFormatError("delta dictionary range outside the base file")
        end = offset + length
        yield offset, length


def _plane_set(r: _Reader, length: int) -> PlaneSet:
    elem_size, flags = r.byte(), r.byte()
    if elem_size not in ELEM_SIZES or not 0 < length <= MAX_DIFF_BYTES or length % elem_size or flags & ~_SPARSE:
        raise DeltaFormatError(f"op of {length} bytes with element size {elem_size} is out of bounds")
    n = length // elem_size
    nonzero = r.varint() if flags & _SPARSE else None
    if nonzero is not None and not 0 < nonzero <= n:
        raise DeltaFormatError("sparse op with a non-zero count out of bounds")
    methods = []
    for _ in range(elem_size + (nonzero is not None)):
        method = r.byte()
        if method not in PlaneMethod._value2member_map_:
            raise DeltaFormatError(f"unknown plane method {method}")
        methods.append(PlaneMethod(method))
    if nonzero is not None and methods[0] == PlaneMethod.ZERO:
        raise DeltaFormatError("sparse op with an empty mask")
    frame = r.varint() if PlaneMethod.ZSTD in methods else 0
    if PlaneMethod.ZSTD in methods and frame == 0:
        raise DeltaFormatError("empty plane frame")
    return PlaneSet(length, elem_size, nonzero, tuple(methods), frame)


def _op(r: _Reader, code: int, old_size: int) -> Op:
    if code == _OpCode.COPY:
        return Copy(*r.old_range(old_size))
    if code == _OpCode.LIT:
        length = r.varint()
        if length == 0:
            raise DeltaFormatError("empty LIT op")
        r.cursor += length
        return Literal(length)
    if code == _OpCode.DIFF:
        offset, length = r.old_range(old_size)
        transform = r.byte()
        if transform not in Transform._value2member_map_ or transform == Transform.NONE:
            raise DeltaFormatError(f"unknown DIFF transform {transform}")
        return Diff(offset, Transform(transform), _plane_set(r, length))
    if code == _OpCode.PLANES:
        planes = _plane_set(r, r.varint())
        r.cursor += planes.length
        return Planes(planes)
    raise DeltaFormatError(f"unknown delta op {code}")


def iter_ops(table: bytes, header: PatchHeader, sizes: SectionSizes) -> Iterator[Op]:
    """The ops after the dictionary, checked one by one and, at the end, for their totals.

    A caller that must not act on a bad table runs this once to the end (validation) before acting on a second
    pass. Raises DeltaFormatError.
    """
    r = _Reader(table)
    count = r.varint()
    if count > len(table):
        raise DeltaFormatError("delta dictionary count exceeds the op table")
    for _ in range(2 * count):
        r.varint()
    made = literal = payload = 0
    while not r.at_end():
        op = _op(r, r.byte(), header.old_size)
        made += op.length
        if isinstance(op, Literal):
            literal += op.length
        elif isinstance(op, (Diff, Planes)):
            payload += op.planes.payload_length
        if made > header.new_size or literal > sizes.literal_raw or payload > sizes.payload:
            raise DeltaFormatError("delta ops make more bytes than the header announces")
        yield op
    if (made, literal, payload) != (header.new_size, sizes.literal_raw, sizes.payload):
        raise DeltaFormatError("delta ops do not add up to the sizes in the header")
