"""The delta patch container: header and sections (light core; sans-I/O: bytes in, values out).

A patch is, in this order and nothing else (integers little-endian)::

    header   HEADER_SIZE bytes   magic "EODELTA\\0", format u16 = 1, codec u8, reserved u8 = 0,
                                 old_size u64, new_size u64, old_sha256[32], new_sha256[32],
                                 table_size u32 (compressed), table_raw u32, literal_size u64 (compressed),
                                 literal_raw u64, payload_size u64
    table    table_size bytes    one zstd frame of table_raw bytes (<= MAX_TABLE_RAW): dictionary ranges, ops
    literal  literal_size bytes  one zstd frame of literal_raw bytes, compressed with the dictionary (the OLD
                                 ranges the table lists, concatenated); empty when literal_raw is 0
    payload  payload_size bytes  the plane payloads of the DIFF/PLANES ops, back to back in op order

The op table is described in :mod:`edgeops.delta.op_table`.

Guarantees: :func:`parse_header` accepts only a header whose magic, version, codec and section sizes are
consistent with each other and with the patch's size (a truncated or extended patch is refused); it raises
:class:`DeltaFormatError` for anything else and no other exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from edgeops.errors import DeltaFormatError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_TABLE_RAW",
    "Codec",
    "PatchHeader",
    "SectionSizes",
    "pack_header",
    "parse_header",
]

MAGIC = b"EODELTA\0"
FORMAT_VERSION = 1
MAX_TABLE_RAW = 16 << 20  # decompressed op table
MAX_FILE_SIZE = 1 << 40  # OLD and NEW sizes a header may claim (1 TiB)
_HEADER = struct.Struct("<8sHBBQQ32s32sIIQQQ")
HEADER_SIZE = _HEADER.size


class Codec(str, Enum):
    """How a patch was made; the value is the codec name in DeltaInfo, the CLI and release metadata."""

    TENSOR_PLANES = "tensor-planes-zstd"  # tensors paired by the layout readers, byte-plane differences
    PATCH_FROM = "zstd-patch-from"  # all of NEW in the literal stream, all of OLD as its dictionary

    def __str__(self) -> str:
        return str(self.value)


_CODEC_IDS = {Codec.TENSOR_PLANES: 1, Codec.PATCH_FROM: 2}
_CODECS = {v: k for k, v in _CODEC_IDS.items()}


@dataclass(frozen=True)
class PatchHeader:
    """What a patch turns into what: the base it applies to and the file it makes."""

    codec: str
    old_sha256: str  # hex
    old_size: int
    new_sha256: str  # hex
    new_size: int


@dataclass(frozen=True)
class SectionSizes:
    """Sizes of the sections after the header, in bytes."""

    table: int  # compressed
    table_raw: int
    literal: int  # compressed
    literal_raw: int
    payload: int

    @property
    def total(self) -> int:
        return HEADER_SIZE + self.table + self.literal + self.payload


def pack_header(header: PatchHeader, sizes: SectionSizes) -> bytes:
    """The header bytes. Raises ValueError for a codec or hash that is not valid (caller misuse)."""
    return _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        _CODEC_IDS[Codec(header.codec)],
        0,
        header.old_size,
        header.new_size,
        bytes.fromhex(header.old_sha256),
        bytes.fromhex(header.new_sha256),
        sizes.table,
        sizes.table_raw,
        sizes.literal,
        sizes.literal_raw,
        sizes.payload,
    )


def parse_header(raw: bytes, patch_size: int) -> tuple[PatchHeader, SectionSizes]:
    """Parse and check the first HEADER_SIZE bytes of a patch of ``patch_size`` bytes. Raises DeltaFormatError."""
    if len(raw) < HEADER_SIZE:
        raise DeltaFormatError("truncated delta patch (shorter than its header)")
    magic, version, codec_id, reserved, old_size, new_size, old_h, new_h, *rest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DeltaFormatError("not an edgeops delta patch (bad magic)")
    if version != FORMAT_VERSION:
        raise DeltaFormatError(f"unsupported delta format version {version} (this edgeops reads {FORMAT_VERSION})")
    if codec_id not in _CODECS or reserved != 0:
        raise DeltaFormatError(f"unknown delta codec id {codec_id}")
    sizes = SectionSizes(*rest)
    if old_size > MAX_FILE_SIZE or new_size > MAX_FILE_SIZE:
        raise DeltaFormatError("delta patch claims a file size over 1 TiB")
    if (
        sizes.table_raw > MAX_TABLE_RAW
        or sizes.literal_raw > new_size
        or not sizes.table
        or (sizes.literal == 0) != (sizes.literal_raw == 0)
    ):
        raise DeltaFormatError("delta patch section sizes out of bounds")
    if sizes.total != patch_size:
        what = "truncated" if sizes.total > patch_size else "trailing bytes after the"
        raise DeltaFormatError(f"{what} delta patch ({patch_size} bytes, its header says {sizes.total})")
    header = PatchHeader(_CODECS[codec_id].value, old_h.hex(), old_size, new_h.hex(), new_size)
    return header, sizes
