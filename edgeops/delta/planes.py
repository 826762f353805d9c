"""Byte-plane differences of a tensor against its previous version (light core: numpy + zstandard).

A changed tensor is stored as ``d = transform(new, old)`` split into byte planes (plane k = byte k of every
element). When a model is fine-tuned its weights move a little: the high bytes of ``d`` (sign, exponent, top of
the mantissa) are nearly constant and compress to almost nothing, while the low, noisy bytes are stored raw
instead of being run through zstd for no gain — which is where the encoder's speed comes from. When many
elements did not change at all (a head-only fine-tune, dead units, pruned weights), the sparse form stores a
bit mask and the planes of the changed elements only.

Transforms (all exactly invertible, elements little-endian):

- SUB8: ``d = new - old`` per byte, mod 256;
- SUB: ``d = zigzag(new - old)`` per element as a signed integer of ``elem_size`` bytes (zigzag maps small
  negative differences to small unsigned numbers, so the high planes stay zero);
- XOR: ``d = new ^ old``;
- NONE: ``d = new`` (a PLANES op: the tensor has no counterpart, or its own planes are cheaper than any
  difference).

Choosing by measuring: an op up to MEASURE_BELOW bytes is encoded every way (transform x dense/sparse) and the
smallest kept; a larger one picks its way by compressing, every way, a sample of SAMPLE_BYTES from evenly spread
windows at a fast zstd level, then encodes only that way. A plane is ZERO (all zero), RAW (stored as is; a large
plane whose order-0 entropy is near 8 bits/byte is not even run through zstd) or ZSTD (all ZSTD planes of an op
in one frame, kept only when smaller than raw).

The decoder checks the frame against the op (exact content size, bounded window, no trailing bytes) and the
mask against its count, and raises :class:`DeltaFormatError` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from edgeops.delta.op_table import PlaneMethod, PlaneSet, Transform
from edgeops.errors import DeltaFormatError

__all__ = ["U8", "EncodedPlanes", "apply_transform", "decode_planes", "encode_planes", "planes_beat_bytes"]

U8 = npt.NDArray[np.uint8]
RAW_ENTROPY_BITS = 7.8  # a plane whose order-0 entropy is above this is stored raw, not compressed
MEASURE_BELOW = 64 << 10  # ops up to this many bytes are compressed every way to pick the smallest
SAMPLE_BYTES = 64 << 10  # larger ops pick their way by compressing a sample this big ...
SAMPLE_WINDOWS = 4  # ... made of this many evenly spread windows ...
SAMPLE_LEVEL = 1  # ... at this zstd level (on plane data it ranks like level 19, 100x faster)
MAX_PLANE_WINDOW = 1 << 24  # zstd window a plane frame may announce (frames hold <= MAX_DIFF_BYTES + mask)
_UINT: dict[int, np.dtype[Any]] = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_INT: dict[int, np.dtype[Any]] = {1: np.dtype("i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}


@dataclass(frozen=True)
class EncodedPlanes:
    """One DIFF/PLANES op: its transform, how its planes are stored, and its payload bytes."""

    transform: Transform
    planes: PlaneSet
    payload: bytes


def _zigzag(d: npt.NDArray[np.unsignedinteger], elem_size: int) -> npt.NDArray[np.unsignedinteger]:
    s = d.view(_INT[elem_size])
    return ((s << 1) ^ (s >> (8 * elem_size - 1))).view(_UINT[elem_size])


def _unzigzag(z: npt.NDArray[np.unsignedinteger], elem_size: int) -> npt.NDArray[np.unsignedinteger]:
    return (z >> 1) ^ (-(z & 1).view(_INT[elem_size])).view(_UINT[elem_size])


def forward(transform: Transform, new: U8, old: U8 | None, elem_size: int) -> U8:
    """``d`` such that ``apply_transform(transform, old, d, elem_size) == new``."""
    if transform == Transform.NONE or old is None:
        return new
    if transform == Transform.XOR:
        return np.bitwise_xor(new, old)
    if transform == Transform.SUB8 or elem_size == 1:
        return np.subtract(new, old, dtype=np.uint8)
    u = _UINT[elem_size]
    return _zigzag(new.view(u) - old.view(u), elem_size).view(np.uint8)


def apply_transform(transform: Transform, old: U8 | None, d: U8, elem_size: int) -> U8:
    """NEW's bytes from OLD's and the difference ``d`` (same length, a multiple of ``elem_size``)."""
    if transform == Transform.NONE:
        return d
    if old is None:
        raise RuntimeError(f"transform {transform.name} needs OLD's bytes")
    if transform == Transform.XOR:
        return np.bitwise_xor(old, d)
    if transform == Transform.SUB8 or elem_size == 1:
        return np.add(old, d, dtype=np.uint8)
    u = _UINT[elem_size]
    return (old.view(u) + _unzigzag(d.view(u), elem_size)).view(np.uint8)


def _entropy_bits(plane: U8) -> float:
    """Order-0 entropy of ``plane`` in bits per byte."""
    counts = np.bincount(plane, minlength=256)
    p = counts[counts > 0] / plane.size
    return float(-(p * np.log2(p)).sum())


def _candidates(d: U8, elem_size: int) -> list[tuple[int | None, list[U8]]]:
    """(nonzero count or None, planes) of the dense form of ``d`` and, when some elements are zero, the sparse."""
    dense = np.ascontiguousarray(d.reshape(-1, elem_size).T)
    mask = dense.any(axis=0) if elem_size > 1 else dense[0] != 0
    nonzero = int(np.count_nonzero(mask))
    out: list[tuple[int | None, list[U8]]] = [(None, list(dense))]
    if 0 < nonzero < mask.size:
        out.append((nonzero, [np.packbits(mask, bitorder="little"), *(p[mask] for p in dense)]))
    return out


def _store(
    length: int, elem_size: int, nonzero: int | None, planes: list[U8], zc: zstandard.ZstdCompressor
) -> tuple[PlaneSet, bytes]:
    methods, raws, packed = [], [], []
    for plane in planes:
        if not plane.any():
            methods.append(PlaneMethod.ZERO)
        elif plane.size > MEASURE_BELOW and _entropy_bits(plane) > RAW_ENTROPY_BITS:
            methods.append(PlaneMethod.RAW)
            raws.append(plane.tobytes())
        else:
            methods.append(PlaneMethod.ZSTD)
            packed.append(plane.tobytes())
    frame = b""
    if packed:
        content = b"".join(packed)
        frame = zc.compress(content)
        if len(frame) >= len(content):  # not worth it: store those planes raw
            methods = [PlaneMethod.RAW if m == PlaneMethod.ZSTD else m for m in methods]
            raws = [p.tobytes() for p, m in zip(planes, methods) if m == PlaneMethod.RAW]
            frame = b""
    plane_set = PlaneSet(length, elem_size, nonzero, tuple(methods), len(frame))
    return plane_set, b"".join(raws) + frame


def _sample(data: U8, elem_size: int) -> U8:
    """SAMPLE_WINDOWS evenly spread windows of ``data`` (whole elements), concatenated: SAMPLE_BYTES in all."""
    win = SAMPLE_BYTES // SAMPLE_WINDOWS // elem_size * elem_size
    starts = np.linspace(0, data.size - win, SAMPLE_WINDOWS).astype(np.int64) // elem_size * elem_size
    return np.concatenate([data[s : s + win] for s in starts])


def _pick_by_sample(new: U8, old: U8 | None, elem_size: int, transforms: list[Transform]) -> tuple[Transform, bool]:
    """(transform, sparse) whose planes of a sample of the op compress smallest at a fast zstd level."""
    new_s = _sample(new, elem_size)
    old_s = None if old is None else _sample(old, elem_size)
    fast = zstandard.ZstdCompressor(level=SAMPLE_LEVEL, write_content_size=False)
    scores = []
    for transform in transforms:
        for nonzero, planes in _candidates(forward(transform, new_s, old_s, elem_size), elem_size):
            size = sum(len(fast.compress(p.tobytes())) for p in planes if p.any())
            scores.append((size, transform, nonzero is not None))
    _, transform, sparse = min(scores)
    return transform, sparse


def encode_planes(new: U8, old: U8 | None, elem_size: int, zc: zstandard.ZstdCompressor) -> EncodedPlanes:
    """Encode NEW (``elem_size`` elements) against OLD, or alone when OLD is None, the cheapest way measured:
    every way for an op up to MEASURE_BELOW bytes, else the way that compresses a sample smallest."""
    transforms = [Transform.NONE]
    if old is not None:
        transforms = [Transform.SUB8, Transform.XOR, Transform.NONE]
        if elem_size > 1:
            transforms.insert(1, Transform.SUB)
    sparse: bool | None = None  # no preference: try both
    if new.size > MEASURE_BELOW:
        transform, sparse = _pick_by_sample(new, old, elem_size, transforms)
        transforms = [transform]
    best: EncodedPlanes | None = None
    for transform in transforms:
        options = _candidates(forward(transform, new, old, elem_size), elem_size)
        preferred = [o for o in options if sparse is None or (o[0] is not None) == sparse]
        for nonzero, planes in preferred or options:
            plane_set, payload = _store(new.size, elem_size, nonzero, planes, zc)
            if best is None or len(payload) < len(best.payload):
                best = EncodedPlanes(transform, plane_set, payload)
    if best is None:
        raise RuntimeError("no candidate encoding")
    return best


def planes_beat_bytes(new: U8, elem_size: int, margin: float) -> bool:
    """Whether NEW's own planes (a PLANES op) compress below ``margin`` times its bytes, measured on a sample."""
    sample = _sample(new, elem_size) if new.size > SAMPLE_BYTES else new
    fast = zstandard.ZstdCompressor(level=SAMPLE_LEVEL, write_content_size=False)
    as_bytes = len(fast.compress(sample.tobytes()))
    as_planes = min(
        sum(len(fast.compress(p.tobytes())) for p in planes if p.any())
        for _, planes in _candidates(sample, elem_size)
    )
    return as_planes < margin * as_bytes


def _frame(planes: PlaneSet, frame: bytes, dctx: zstandard.ZstdDecompressor) -> bytes:
    expected = planes.frame_content()
    try:
        params = zstandard.get_frame_parameters(frame)
        if params.content_size != expected or params.window_size > MAX_PLANE_WINDOW or params.dict_id:
            raise DeltaFormatError("plane frame does not announce its planes' size")
        dobj = dctx.decompressobj()
        out = dobj.decompress(frame)
        if len(out) != expected or not dobj.eof or dobj.unused_data:
            raise DeltaFormatError("plane frame is truncated or has trailing bytes")
        return out
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"corrupt plane frame: {exc}") from None


def decode_planes(planes: PlaneSet, payload: bytes, dctx: zstandard.ZstdDecompressor) -> U8:
    """The difference ``d`` (``planes.length`` bytes) from an op's payload. Raises DeltaFormatError."""
    raw_total = sum(planes.raw_lengths())
    unpacked = _frame(planes, payload[raw_total:], dctx) if planes.frame_length else b""
    stored: list[U8] = []
    raw_pos = frame_pos = 0
    for length, method in zip(planes.plane_lengths(), planes.methods):
        if method == PlaneMethod.ZERO:
            stored.append(np.zeros(length, dtype=np.uint8))
        elif method == PlaneMethod.RAW:
            stored.append(np.frombuffer(payload, dtype=np.uint8, count=length, offset=raw_pos))
            raw_pos += length
        else:
            stored.append(np.frombuffer(unpacked, dtype=np.uint8, count=length, offset=frame_pos))
            frame_pos += length
    k, n = planes.elem_size, planes.length // planes.elem_size
    if planes.nonzero is None:
        return np.stack(stored, axis=1).reshape(-1) if k > 1 else stored[0]
    mask = np.unpackbits(stored[0], count=n, bitorder="little").astype(bool)
    if int(np.count_nonzero(mask)) != planes.nonzero or np.unpackbits(stored[0], bitorder="little")[n:].any():
        raise DeltaFormatError("sparse op mask does not match its non-zero count")
    d = np.zeros((n, k), dtype=np.uint8)
    d[mask] = np.stack(stored[1:], axis=1)
    return d.reshape(-1)
