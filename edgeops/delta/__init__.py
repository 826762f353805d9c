"""Model-aware binary deltas between two versions of a file, usually edgeops artifacts (light core: stdlib,
numpy and zstandard only, so the device can apply patches).

``make_delta(old, new, out)`` writes a patch that turns OLD into NEW; ``apply_delta(old, patch, out)`` makes NEW
from OLD and the patch, streaming, and verifies NEW's sha256 before it renames the result into place.

The encoder understands models: it finds the tensors of TFLite flatbuffers, ONNX protobufs and ``.npy`` arrays,
bare or inside an artifact (:mod:`edgeops.delta.layout`), pairs each tensor of NEW with its previous version in
OLD, and stores an unchanged tensor as a COPY (a few bytes) and a changed one as byte-plane differences
(:mod:`edgeops.delta.planes`); the rest goes through zstd with OLD's other bytes as dictionary. It also makes a
plain ``zstd --patch-from``-style patch and keeps whichever is smaller — the codec is picked by measuring, per
release. docs/delta.md describes the format (:mod:`edgeops.delta.patch_format`) and its limits.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgeops.atomic_file import write_bytes_atomic
from edgeops.delta.decode import apply_delta, read_patch_header
from edgeops.delta.encode import encode_patch_from, encode_tensor_planes
from edgeops.delta.patch_format import Codec, PatchHeader

__all__ = ["Codec", "DeltaInfo", "PatchHeader", "apply_delta", "make_delta", "read_patch_header"]

PROBE_ABOVE = 8 << 20  # OLD + NEW bytes above which the generic codec is first probed at a fast level
PROBE_LEVEL = 1  # on model data within a few % of level 19 (measured: 1 % on a 53 MB fine-tune), 70x faster
PROBE_MARGIN = 1.15  # the probe is kept (not remade at the full level) when this much larger than the best


@dataclass(frozen=True)
class DeltaInfo:
    """What :func:`make_delta` made and how it chose."""

    codec: str  # the codec of the patch written
    old_sha256: str  # hex
    new_sha256: str  # hex
    old_size: int  # bytes
    new_size: int
    patch_size: int
    aligned_bytes: int  # bytes of NEW inside tensors paired with tensors of OLD
    candidates: dict[str, int]  # every codec tried -> its patch size in bytes
    seconds: float  # wall time of make_delta


def make_delta(old: Path, new: Path, out: Path, *, level: int = 19) -> DeltaInfo:
    """Write a patch turning ``old`` into ``new`` at ``out`` (atomically) and say what it chose.

    ``level`` is the zstd level (1-22) of the compressed streams. Tries the tensor-planes codec (when tensors pair
    up) and the zstd-patch-from codec and keeps the smaller; for large inputs the generic codec is first made at
    a fast level and only remade at ``level`` when it comes within PROBE_MARGIN of the best.

    Raises ValueError for a level out of range, OSError when an input cannot be read, OutputError when ``out``
    cannot be written.
    """
    if not 1 <= level <= 22:
        raise ValueError(f"zstd level must be 1..22, not {level}")
    start = time.perf_counter()
    old_bytes, new_bytes = old.read_bytes(), new.read_bytes()
    old_view, new_view = memoryview(old_bytes), memoryview(new_bytes)
    header = PatchHeader(
        Codec.TENSOR_PLANES.value,
        hashlib.sha256(old_bytes).hexdigest(),
        len(old_bytes),
        hashlib.sha256(new_bytes).hexdigest(),
        len(new_bytes),
    )
    patches: dict[str, bytes] = {}
    aligned = 0
    made = encode_tensor_planes(old_view, new_view, header, level)
    if made is not None:
        patches[Codec.TENSOR_PLANES.value], aligned = made
    generic = replace(header, codec=Codec.PATCH_FROM.value)
    if patches and len(old_bytes) + len(new_bytes) > PROBE_ABOVE and level > PROBE_LEVEL:
        probe = encode_patch_from(old_view, new_view, generic, PROBE_LEVEL)
        best = min(len(p) for p in patches.values())
        patches[Codec.PATCH_FROM.value] = probe
        if len(probe) <= PROBE_MARGIN * best:
            patches[Codec.PATCH_FROM.value] = encode_patch_from(old_view, new_view, generic, level)
    else:
        patches[Codec.PATCH_FROM.value] = encode_patch_from(old_view, new_view, generic, level)
    codec, patch = min(patches.items(), key=lambda item: (len(item[1]), item[0] != Codec.TENSOR_PLANES.value))
    write_bytes_atomic(out, patch)
    return DeltaInfo(
        codec=codec,
        old_sha256=header.old_sha256,
        new_sha256=header.new_sha256,
        old_size=header.old_size,
        new_size=header.new_size,
        patch_size=len(patch),
        aligned_bytes=aligned,
        candidates={name: len(p) for name, p in patches.items()},
        seconds=time.perf_counter() - start,
    )
