"""Model-aware binary deltas between two versions of a file, usually edgeops artifacts (light core: stdlib,
numpy and zstandard only, so the device can apply patches).

``make_delta(old, new, out)`` writes a patch that turns OLD into NEW; ``apply_delta(old, patch, out)`` makes NEW
from OLD and the patch, streaming, and verifies NEW's sha256 before it renames the result into place.

The encoder understands models: it finds the tensors of TFLite flatbuffers, ONNX protobufs and ``.npy`` arrays,
bare or inside an artifact (:mod:`edgeops.delta.layout`), pairs each tensor of NEW with its previous version in
OLD, and stores an unchanged tensor as a COPY (a few bytes) and a changed one as byte-plane differences
(:mod:`edgeops.delta.planes`); the rest goes through zstd with OLD's other bytes as dictionary. It also makes a
plain ``zstd --patch-from``-style patch and keeps whichever is smaller — the codec is picked by measuring, per
release. docs/delta.md describes the format (:mod:`edgeops.delta.patch_format`, :mod:`edgeops.delta.op_table`)
and its limits.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgeops.atomic_file import write_bytes_atomic
from edgeops.delta.decode import apply_delta, read_patch_header
from edgeops.delta.encode import encode_patch_from, encode_tensor_planes
from edgeops.delta.patch_format import Codec, PatchHeader
from edgeops.errors import DeltaFormatError, IntegrityError, OutputError, StorageError

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


def make_delta(old: Path, new: Path, out: Path, *, level: int = 19, verify: bool = True) -> DeltaInfo:
    """Write a patch turning ``old`` into ``new`` at ``out`` (atomically) and say what it chose.

    ``level`` is the zstd level (1-22) of the compressed streams. Tries the tensor-planes codec (when tensors pair
    up) and the zstd-patch-from codec and keeps the smaller; for large inputs the generic codec is first made at
    a fast level and only remade at ``level`` when it comes within PROBE_MARGIN of the best. With ``verify`` the
    patch is applied once (to a temp file beside ``out``, then removed) before this returns, so a patch that
    would not rebuild NEW never reaches a device.

    Raises ValueError for a level out of range, OSError when an input cannot be read, OutputError when ``out``
    cannot be written, RuntimeError when the verification fails (OLD changed meanwhile, or a bug).
    """
    if not 1 <= level <= 22:
        raise ValueError(f"zstd level must be 1..22, not {level}")
    start = time.perf_counter()
    old_bytes, new_bytes = old.read_bytes(), new.read_bytes()
    header = PatchHeader(
        Codec.TENSOR_PLANES.value,
        hashlib.sha256(old_bytes).hexdigest(),
        len(old_bytes),
        hashlib.sha256(new_bytes).hexdigest(),
        len(new_bytes),
    )
    patches, aligned = _candidates(memoryview(old_bytes), memoryview(new_bytes), header, level)
    codec, patch = min(patches.items(), key=lambda item: (len(item[1]), item[0] != Codec.TENSOR_PLANES.value))
    write_bytes_atomic(out, patch)
    if verify:
        _verify(old, out, header.new_sha256)
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


def _candidates(old: memoryview, new: memoryview, header: PatchHeader, level: int) -> tuple[dict[str, bytes], int]:
    """Every codec's patch by name, and the bytes of NEW the tensor-planes codec aligned."""
    patches: dict[str, bytes] = {}
    aligned = 0
    made = encode_tensor_planes(old, new, header, level)
    if made is not None:
        patches[Codec.TENSOR_PLANES.value], aligned = made
    generic = replace(header, codec=Codec.PATCH_FROM.value)
    if patches and len(old) + len(new) > PROBE_ABOVE and level > PROBE_LEVEL:
        best = min(len(p) for p in patches.values())
        patches[Codec.PATCH_FROM.value] = encode_patch_from(old, new, generic, PROBE_LEVEL)
        if len(patches[Codec.PATCH_FROM.value]) > PROBE_MARGIN * best:
            return patches, aligned
    patches[Codec.PATCH_FROM.value] = encode_patch_from(old, new, generic, level)
    return patches, aligned


def _verify(old: Path, patch: Path, new_sha256: str) -> None:
    """Apply ``patch`` to a temp file beside it; remove the patch and raise RuntimeError if that fails."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{patch.name}.", suffix=".check", dir=patch.parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {patch.parent}: {exc.strerror}") from exc
    os.close(fd)
    try:
        apply_delta(old, patch, Path(tmp), expected_sha256=new_sha256)
    except (DeltaFormatError, IntegrityError) as exc:
        patch.unlink(missing_ok=True)
        raise RuntimeError(f"the patch made from {old} does not rebuild NEW (was OLD changed?): {exc}") from exc
    except StorageError as exc:
        patch.unlink(missing_ok=True)
        raise OutputError(str(exc)) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
