"""Making a delta patch: pair tensors, encode NEW against OLD with each codec, measure (light core; sans-I/O).

Two codecs (see :class:`~edgeops.delta.patch_format.Codec`):

- ``tensor-planes-zstd``: the layout readers find the tensors of both files; each NEW tensor is paired with an
  OLD one — by key (member + tensor name), else by identical content anywhere in OLD, else by position among the
  remaining tensors of the same length. A paired tensor that did not change is a COPY op (a few bytes); one that
  changed is DIFF ops of byte-plane differences (:mod:`edgeops.delta.planes`), at most MAX_DIFF_BYTES each. A
  NEW tensor with no counterpart becomes PLANES ops when its own planes are clearly cheaper than its bytes.
  The bytes between tensors are a COPY where OLD holds the same bytes at the same relative place (so an
  unchanged layout is one long COPY); everything else (manifest, signature, changed structure, small unpaired
  tensors) is the literal stream, one zstd frame referencing the OLD bytes no op reads (tar headers, manifest,
  unpaired tensors...), so an edited manifest costs only its edits.
- ``zstd-patch-from``: NEW as one literal stream with all of OLD as its dictionary and a window over both (what
  ``zstd --patch-from`` does); the fallback for anything the readers do not understand.

Guarantees: the patch bytes are a function of (OLD, NEW, level) only (deterministic), and applying them never
depends on the layout readers (the decoder does not run them). :func:`edgeops.delta.make_delta` applies the
patch it keeps once before handing it out.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from edgeops.delta.layout import find_regions
from edgeops.delta.op_table import MAX_DIFF_BYTES, Copy, Diff, Literal, Op, Planes, TableWriter, Transform
from edgeops.delta.patch_format import PatchHeader, SectionSizes, pack_header
from edgeops.delta.planes import U8, encode_planes, planes_beat_bytes
from edgeops.delta.regions import Region
from edgeops.delta.zstd_prefix import compress_with_prefix

__all__ = ["Pair", "encode_patch_from", "encode_tensor_planes", "literal_frame", "pair_regions"]

MIN_PLANES_BYTES = 4096  # an unpaired tensor smaller than this stays in the literal stream
PLANES_GAIN = 0.9  # ... and so does one whose planes do not compress below this fraction of its bytes


@dataclass(frozen=True)
class Pair:
    """NEW's tensor at ``new_offset`` and OLD's at ``old_offset``: ``length`` bytes of ``elem_size`` elements."""

    new_offset: int
    old_offset: int
    length: int
    elem_size: int


def _digest(data: memoryview, region: Region) -> tuple[int, bytes]:
    chunk = data[region.offset : region.offset + region.length]
    return region.length, hashlib.blake2b(chunk, digest_size=16).digest()


def pair_regions(
    old_regions: Sequence[Region], new_regions: Sequence[Region], old: memoryview, new: memoryview
) -> list[Pair]:
    """Pair NEW's tensors with OLD's: by key and length, then identical content, then position (same length).

    Returns pairs sorted by NEW offset (NEW regions do not overlap, so neither do the pairs' NEW ranges).
    """
    by_key = {r.key: r for r in old_regions}
    pairs: list[Pair] = []
    used: set[int] = set()
    left: list[Region] = []
    for r in new_regions:
        o = by_key.get(r.key)
        if o is not None and o.length == r.length:
            pairs.append(Pair(r.offset, o.offset, r.length, r.elem_size))
            used.add(o.offset)
        else:
            left.append(r)
    if left:
        by_content: dict[tuple[int, bytes], Region] = {}
        for o in old_regions:
            by_content.setdefault(_digest(old, o), o)
        by_length: dict[int, deque[Region]] = defaultdict(deque)
        for o in old_regions:
            if o.offset not in used:
                by_length[o.length].append(o)
        for r in left:
            same = by_content.get(_digest(new, r))
            if same is None and by_length[r.length]:
                same = by_length[r.length].popleft()
            if same is not None:
                pairs.append(Pair(r.offset, same.offset, r.length, r.elem_size))
    return sorted(pairs, key=lambda p: p.new_offset)


def _complement(size: int, taken: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of [0, size) outside the (offset, length) ranges ``taken``."""
    out, pos = [], 0
    for offset, length in sorted(taken):
        if offset > pos:
            out.append((pos, offset - pos))
        pos = max(pos, offset + length)
    if pos < size:
        out.append((pos, size - pos))
    return out


def plane_compressor(level: int) -> zstandard.ZstdCompressor:
    """The zstd compressor for plane frames at ``level``, its strategy capped at btopt: on plane data (mostly
    entropy coding) btopt is within 0.1 % of btultra2's size and several times faster."""
    params = zstandard.ZstdCompressionParameters.from_level(level)
    return zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            level,
            strategy=min(params.strategy, zstandard.STRATEGY_BTOPT),
            write_content_size=True,
            write_checksum=False,
        )
    )


class _PatchBuilder:
    """Accumulates the ops, the literal stream and the plane payloads of one patch, merging adjacent COPYs and
    LITs."""

    def __init__(self, old: memoryview, new: memoryview, level: int) -> None:
        self.new = new
        self.old_u8: U8 = np.frombuffer(old, dtype=np.uint8)
        self.new_u8: U8 = np.frombuffer(new, dtype=np.uint8)
        self.plane_zstd = plane_compressor(level)
        self.ops: list[Op] = []
        self.literal = bytearray()
        self.payloads: list[bytes] = []
        self.cursor = 0  # where in OLD the next byte of NEW would be if the layout did not move

    def gap(self, start: int, length: int) -> None:
        """NEW[start:+length] between tensors: a COPY when OLD holds the same bytes at the cursor, else LIT."""
        old = self.old_u8[self.cursor : self.cursor + length]
        if length > 0 and old.size == length and np.array_equal(old, self.new_u8[start : start + length]):
            self.copy(self.cursor, length)
        else:
            self.lit(start, length)

    def lit(self, start: int, length: int) -> None:
        if length <= 0:
            return
        self.cursor += length
        self.literal += self.new[start : start + length]
        last = self.ops[-1] if self.ops else None
        if isinstance(last, Literal):
            self.ops[-1] = Literal(last.length + length)
        else:
            self.ops.append(Literal(length))

    def copy(self, old_offset: int, length: int) -> None:
        self.cursor = old_offset + length
        last = self.ops[-1] if self.ops else None
        if isinstance(last, Copy) and last.old_offset + last.length == old_offset:
            self.ops[-1] = Copy(last.old_offset, last.length + length)
        else:
            self.ops.append(Copy(old_offset, length))

    def tensor(self, new_offset: int, old_offset: int | None, length: int, elem_size: int) -> None:
        """NEW[new_offset:+length] as COPY/DIFF ops against OLD[old_offset:+length], or PLANES ops without OLD;
        each op makes at most MAX_DIFF_BYTES."""
        step = MAX_DIFF_BYTES - MAX_DIFF_BYTES % elem_size
        for start in range(0, length, step):
            n = min(step, length - start)
            new = self.new_u8[new_offset + start : new_offset + start + n]
            old = None if old_offset is None else self.old_u8[old_offset + start : old_offset + start + n]
            if old_offset is not None and old is not None and np.array_equal(new, old):
                self.copy(old_offset + start, n)
                continue
            enc = encode_planes(new, old, elem_size, self.plane_zstd)
            if old_offset is None or enc.transform == Transform.NONE:
                self.ops.append(Planes(enc.planes))
                self.cursor += n
            else:
                self.ops.append(Diff(old_offset + start, enc.transform, enc.planes))
                self.cursor = old_offset + start + n
            self.payloads.append(enc.payload)

    def referenced(self) -> list[tuple[int, int]]:
        """The OLD ranges (offset, length) that COPY and DIFF ops read."""
        return [(op.old_offset, op.length) for op in self.ops if isinstance(op, (Copy, Diff))]

    def finish(self, header: PatchHeader, dictionary: list[tuple[int, int]], level: int) -> bytes:
        """The patch: header, compressed table, literal frame (dictionary = those OLD ranges), payloads."""
        writer = TableWriter(dictionary)
        for op in self.ops:
            writer.op(op)
        table = writer.getvalue()
        table_z = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress(table)
        dict_bytes = b"".join(self.old_u8[o : o + n].tobytes() for o, n in dictionary) if self.literal else b""
        literal_z = literal_frame(bytes(self.literal), dict_bytes, level)
        payload = b"".join(self.payloads)
        sizes = SectionSizes(len(table_z), len(table), len(literal_z), len(self.literal), len(payload))
        return b"".join((pack_header(header, sizes), table_z, literal_z, payload))


def literal_frame(literal: bytes, dictionary: bytes, level: int) -> bytes:
    """One zstd frame of ``literal`` that may reference ``dictionary`` (as a prefix); empty for no literal."""
    return compress_with_prefix(literal, dictionary, level) if literal else b""


def encode_tensor_planes(
    old: memoryview, new: memoryview, header: PatchHeader, level: int
) -> tuple[bytes, int] | None:
    """The tensor-planes patch and the bytes of NEW it aligned with OLD; None when no tensor pairs up."""
    old_regions, new_regions = find_regions(old), find_regions(new)
    pairs = pair_regions(old_regions, new_regions, old, new)
    if not pairs:
        return None
    builder = _PatchBuilder(old, new, level)
    paired = {p.new_offset for p in pairs}
    spans: list[tuple[int, int | None, int, int]] = [(p.new_offset, p.old_offset, p.length, p.elem_size) for p in pairs]
    spans += [
        (r.offset, None, r.length, r.elem_size)
        for r in new_regions
        if r.offset not in paired and _planes_pay(builder.new_u8, r)
    ]
    pos = 0
    for new_offset, old_offset, length, elem_size in sorted(spans, key=lambda s: s[0]):
        builder.gap(pos, new_offset - pos)
        builder.tensor(new_offset, old_offset, length, elem_size)
        pos = new_offset + length
    builder.gap(pos, len(new) - pos)
    dictionary = _complement(len(old), builder.referenced())  # what the literal stream may still find useful
    return builder.finish(header, dictionary, level), sum(p.length for p in pairs)


def _planes_pay(new: U8, region: Region) -> bool:
    """Whether an unpaired tensor is clearly cheaper as its own byte planes than as literal bytes."""
    if region.length < MIN_PLANES_BYTES or region.elem_size == 1:
        return False
    return planes_beat_bytes(new[region.offset : region.offset + region.length], region.elem_size, PLANES_GAIN)


def encode_patch_from(old: memoryview, new: memoryview, header: PatchHeader, level: int) -> bytes:
    """The zstd-patch-from patch: NEW in the literal stream, all of OLD as its dictionary."""
    builder = _PatchBuilder(old, new, level)
    builder.lit(0, len(new))
    return builder.finish(header, [(0, len(old))] if len(old) else [], level)
