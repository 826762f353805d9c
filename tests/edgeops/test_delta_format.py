"""The delta patch format: ops and planes round-trip exactly, and any malformed, truncated or hostile patch is
refused with DeltaFormatError (or IntegrityError when its output is wrong) — never another exception, never a
file left behind."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeops.delta import apply_delta, make_delta, read_patch_header
from edgeops.delta.op_table import (
    Copy,
    Diff,
    Literal,
    Op,
    PlaneMethod,
    Planes,
    PlaneSet,
    TableWriter,
    Transform,
    iter_dict_ranges,
    iter_ops,
)
from edgeops.delta.patch_format import HEADER_SIZE, PatchHeader, SectionSizes, pack_header, parse_header
from edgeops.delta.planes import apply_transform, decode_planes, encode_planes
from edgeops.errors import DeltaFormatError, IntegrityError

ZC = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
DCTX = zstandard.ZstdDecompressor()
OLD = bytes(range(256)) * 16  # 4 KiB


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _patch(
    old: bytes,
    new: bytes,
    ops: list[Op],
    *,
    literal: bytes = b"",
    payload: bytes = b"",
    dict_ranges: list[tuple[int, int]] | None = None,
) -> bytes:
    """A patch assembled by hand (header sizes always consistent with what is given)."""
    writer = TableWriter(dict_ranges or [])
    for op in ops:
        writer.op(op)
    table = writer.getvalue()
    table_z = ZC.compress(table)
    literal_z = ZC.compress(literal) if literal else b""
    header = PatchHeader("tensor-planes-zstd", _sha(old), len(old), _sha(new), len(new))
    sizes = SectionSizes(len(table_z), len(table), len(literal_z), len(literal), len(payload))
    return pack_header(header, sizes) + table_z + literal_z + payload


def _apply(tmp_path: Path, old: bytes, patch: bytes) -> bytes:
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "p").write_bytes(patch)
    out = tmp_path / "out" / "new"
    out.parent.mkdir(exist_ok=True)
    try:
        apply_delta(tmp_path / "old", tmp_path / "p", out)
    except (DeltaFormatError, IntegrityError):
        assert list(out.parent.iterdir()) == []  # neither the output nor a temp file
        raise
    data = out.read_bytes()
    out.unlink()
    return data


def test_hand_made_patch_with_every_op_applies(tmp_path: Path) -> None:
    new_tensor = np.frombuffer(OLD[1024:2048], dtype="<f4") + np.float32(1e-3)
    enc = encode_planes(new_tensor.view(np.uint8), np.frombuffer(OLD[1024:2048], np.uint8), 4, ZC)
    fresh = np.arange(64, dtype="<i4").view(np.uint8)
    planes_enc = encode_planes(fresh, None, 4, ZC)
    new = OLD[3000:3100] + b"hello" + new_tensor.tobytes() + fresh.tobytes() + OLD[0:10]
    ops: list[Op] = [
        Copy(3000, 100),
        Literal(5),
        Diff(1024, enc.transform, enc.planes),
        Planes(planes_enc.planes),
        Copy(0, 10),  # a negative delta from the cursor
    ]
    patch = _patch(OLD, new, ops, literal=b"hello", payload=enc.payload + planes_enc.payload)
    assert _apply(tmp_path, OLD, patch) == new
    assert read_patch_header(tmp_path / "p").new_sha256 == _sha(new)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XX" + b[2:], "bad magic"),
        (lambda b: b[:8] + b"\x09\x00" + b[10:], "format version"),
        (lambda b: b[:10] + b"\x07" + b[11:], "codec"),
        (lambda b: b[:11] + b"\x01" + b[12:], "codec"),
        (lambda b: b[:50], "truncated"),
        (lambda b: b + b"x", "trailing"),
        (lambda b: b[:HEADER_SIZE - 1], "truncated"),
    ],
)
def test_header_defects_are_refused(tmp_path: Path, mutate: object, message: str) -> None:
    good = _patch(OLD, OLD[:100], [Copy(0, 100)])
    assert callable(mutate)
    with pytest.raises(DeltaFormatError, match=message):
        _apply(tmp_path, OLD, mutate(good))


def test_header_size_fields_are_checked() -> None:
    header = PatchHeader("zstd-patch-from", "00" * 32, 10, "11" * 32, 5)
    raw = pack_header(header, SectionSizes(1, 1, 0, 6, 0))  # more literal bytes than NEW has
    with pytest.raises(DeltaFormatError, match="out of bounds"):
        parse_header(raw, len(raw) + 1)
    raw = pack_header(header, SectionSizes(1, 1 << 30, 0, 5, 0))  # a huge table
    with pytest.raises(DeltaFormatError, match="out of bounds"):
        parse_header(raw, len(raw) + 1)
    raw = pack_header(header, SectionSizes(1, 1, 0, 5, 0))  # literal bytes announced, no literal frame
    with pytest.raises(DeltaFormatError, match="out of bounds"):
        parse_header(raw, len(raw) + 1)
    raw = pack_header(header, SectionSizes(1, 1, 3, 5, 0))
    assert parse_header(raw, len(raw) + 4) == (header, SectionSizes(1, 1, 3, 5, 0))


def _plane_set(length: int = 8, elem: int = 4, nonzero: int | None = None, methods: tuple[int, ...] = ()) -> PlaneSet:
    ms = tuple(PlaneMethod(m) for m in methods) or (PlaneMethod.RAW,) * (elem + (nonzero is not None))
    frame = 9 if PlaneMethod.ZSTD in ms else 0
    return PlaneSet(length, elem, nonzero, ms, frame)


@pytest.mark.parametrize(
    ("ops", "new_size", "message"),
    [
        ([Copy(4000, 200)], 200, "outside"),
        ([Copy(0, 10)], 20, "add up"),
        ([Copy(0, 10), Copy(0, 20)], 20, "more bytes"),
        ([Literal(5)], 5, "more bytes"),  # the header announces no literal bytes
        ([Diff(4090, Transform.SUB, _plane_set())], 8, "outside"),
        ([Planes(_plane_set(nonzero=0, methods=(1, 1, 1, 1, 1)))], 8, "non-zero count"),
        ([Planes(_plane_set(nonzero=3, methods=(1, 1, 1, 1, 1)))], 8, "non-zero count"),
        ([Planes(_plane_set(nonzero=1, methods=(0, 1, 1, 1, 1)))], 8, "empty mask"),
    ],
)
def test_op_table_defects_are_refused(ops: list[Op], new_size: int, message: str) -> None:
    writer = TableWriter([])
    for op in ops:
        writer.op(op)
    table = writer.getvalue()
    header = PatchHeader("tensor-planes-zstd", "00" * 32, len(OLD), "11" * 32, new_size)
    sizes = SectionSizes(1, len(table), 0, 0, sum(o.planes.payload_length for o in ops if isinstance(o, Diff | Planes)))
    with pytest.raises(DeltaFormatError, match=message):
        list(iter_ops(table, header, sizes))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (b"\x00\x09", "unknown delta op"),
        (b"\x00\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "overlong varint"),
        (b"\x00\x01\x00", "truncated"),
        (b"\x00\x02\x00", "empty LIT"),
        (b"\x00\x03\x00\x08\x00", "transform"),  # DIFF with transform NONE
        (b"\x00\x03\x00\x08\x02\x03\x00", "out of bounds"),  # element size 3
        (b"\x00\x03\x00\x07\x02\x04\x00", "out of bounds"),  # 7 bytes of 4-byte elements
        (b"\x00\x03\x00\x08\x02\x04\x02", "out of bounds"),  # unknown flag
        (b"\x00\x03\x00\x08\x02\x04\x00\x01\x01\x01\x07", "plane method"),
        (b"\x00\x03\x00\x08\x02\x04\x00\x02\x01\x01\x01\x00", "empty plane frame"),
        (b"\x00\x04\x00\x04\x00", "0 bytes"),  # an empty PLANES op
        (b"\x00\x04\x81\x80\x80\x80\x01\x01\x00\x01", "out of bounds"),  # over MAX_DIFF_BYTES
        (b"\xff\xff\x03", "dictionary count"),
    ],
)
def test_malformed_tables_are_refused(table: bytes, message: str) -> None:
    header = PatchHeader("tensor-planes-zstd", "00" * 32, len(OLD), "11" * 32, 8)
    with pytest.raises(DeltaFormatError, match=message):
        list(iter_ops(table, header, SectionSizes(1, len(table), 0, 0, 0)))


def test_dictionary_ranges_must_lie_in_old() -> None:
    table = TableWriter([(0, 10), (100, 50)]).getvalue()
    assert list(iter_dict_ranges(table, 150)) == [(0, 10), (100, 50)]
    with pytest.raises(DeltaFormatError, match="outside the base"):
        list(iter_dict_ranges(table, 149))


@settings(max_examples=60, deadline=None)
@given(
    elem=st.sampled_from([1, 2, 4, 8]),
    count=st.integers(1, 3000),
    changed=st.floats(0.0, 1.0),
    magnitude=st.sampled_from([1, 255, 1 << 20, 1 << 62]),
    seed=st.integers(0, 2**32 - 1),
    with_old=st.booleans(),
)
def test_planes_round_trip_exactly(
    elem: int, count: int, changed: float, magnitude: int, seed: int, with_old: bool
) -> None:
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, count * elem, dtype=np.uint8)
    dtype = np.dtype(f"<u{elem}")
    delta = rng.integers(0, min(magnitude, np.iinfo(dtype).max), count, dtype=dtype) * (rng.random(count) < changed)
    new = (old.view(dtype) + delta.astype(dtype)).view(np.uint8)
    enc = encode_planes(new, old if with_old else None, elem, ZC)
    assert enc.transform == Transform.NONE or with_old
    assert len(enc.payload) == enc.planes.payload_length
    d = decode_planes(enc.planes, enc.payload, DCTX)
    assert np.array_equal(apply_transform(enc.transform, old, d, elem), new)


def test_sparse_planes_store_only_what_changed() -> None:
    old = np.random.default_rng(0).normal(size=100_000).astype("<f4")
    new = old.copy()
    new[::100] += np.float32(0.01)  # 1 % of the weights move
    enc = encode_planes(new.view(np.uint8), old.view(np.uint8), 4, ZC)
    assert enc.planes.nonzero == 1000
    assert len(enc.payload) < 0.05 * new.nbytes


def test_plane_frames_are_checked_against_their_op() -> None:
    content = bytes(range(8))
    frame = ZC.compress(content)
    ok = PlaneSet(8, 1, None, (PlaneMethod.ZSTD,), len(frame))
    assert decode_planes(ok, frame, DCTX).tobytes() == content
    for bad in (frame + b"\0", frame[:-1], ZC.compress(content + b"x"), b"\0" * len(frame)):
        with pytest.raises(DeltaFormatError):
            decode_planes(PlaneSet(8, 1, None, (PlaneMethod.ZSTD,), len(bad)), bad, DCTX)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(content)
    with pytest.raises(DeltaFormatError, match="announce"):
        decode_planes(PlaneSet(8, 1, None, (PlaneMethod.ZSTD,), len(no_size)), no_size, DCTX)
    mask_with_stray_bit = PlaneSet(5, 1, 1, (PlaneMethod.RAW, PlaneMethod.RAW), 0)  # 5 elements: bits 5-7 unused
    with pytest.raises(DeltaFormatError, match="mask"):
        decode_planes(mask_with_stray_bit, bytes([0b1000_0001, 7]), DCTX)


def test_files_that_are_not_models_use_the_generic_codec(tmp_path: Path) -> None:
    old, new = tmp_path / "a.txt", tmp_path / "b.txt"
    old.write_bytes(b"edgeops delta " * 500)
    new.write_bytes(b"edgeops delta! " * 520)
    info = make_delta(old, new, tmp_path / "p")
    assert (info.codec, info.aligned_bytes, set(info.candidates)) == ("zstd-patch-from", 0, {"zstd-patch-from"})
    assert info.patch_size < 300
    assert _apply(tmp_path, old.read_bytes(), (tmp_path / "p").read_bytes()) == new.read_bytes()


@pytest.mark.parametrize(("old", "new"), [(b"", b""), (b"", b"abc"), (b"abc", b""), (b"x" * 10, b"x" * 10)])
def test_empty_and_identical_files_round_trip(tmp_path: Path, old: bytes, new: bytes) -> None:
    (tmp_path / "o").write_bytes(old)
    (tmp_path / "n").write_bytes(new)
    make_delta(tmp_path / "o", tmp_path / "n", tmp_path / "p")
    assert _apply(tmp_path, old, (tmp_path / "p").read_bytes()) == new


def test_level_out_of_range_is_a_caller_error(tmp_path: Path) -> None:
    (tmp_path / "o").write_bytes(b"x")
    with pytest.raises(ValueError, match="level"):
        make_delta(tmp_path / "o", tmp_path / "o", tmp_path / "p", level=23)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_as_patches(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(DeltaFormatError):
        _apply(tmp_path, OLD, raw)


def _small_model_pair() -> tuple[bytes, bytes]:
    """An .npy array and a slightly changed copy (a one-tensor "model" the layout readers understand)."""
    import io

    rng = np.random.default_rng(1)
    w = rng.normal(size=3000).astype(np.float32)
    w2 = w.copy()
    w2[::7] += np.float32(0.001)
    out = []
    for arr in (w, w2):
        buf = io.BytesIO()
        np.save(buf, arr)
        out.append(buf.getvalue())
    return out[0], out[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_patches_are_refused_or_still_exact(tmp_path: Path, data: st.DataObject) -> None:
    old, new = _small_model_pair()
    (tmp_path / "o").write_bytes(old)
    (tmp_path / "n").write_bytes(new)
    if not (tmp_path / "good").exists():
        info = make_delta(tmp_path / "o", tmp_path / "n", tmp_path / "good")
        assert info.codec == "tensor-planes-zstd"
    good = (tmp_path / "good").read_bytes()
    patch = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(patch) - 1))
        patch[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del patch[data.draw(st.integers(0, len(patch) - 1)) :]
    with contextlib.suppress(DeltaFormatError, IntegrityError):  # refused, or (a byte zstd ignores) exact
        assert _apply(tmp_path, old, bytes(patch)) == new


def test_make_delta_never_hands_out_a_patch_that_does_not_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgeops.delta as delta

    real = delta._candidates

    def corrupted(*args: object, **kwargs: object) -> tuple[dict[str, bytes], int]:
        patches, aligned = real(*args, **kwargs)  # type: ignore[arg-type]
        return {name: p[:-1] + bytes([p[-1] ^ 1]) for name, p in patches.items()}, aligned

    monkeypatch.setattr(delta, "_candidates", corrupted)
    (tmp_path / "o").write_bytes(b"old " * 1000)
    (tmp_path / "n").write_bytes(b"new " * 1000)
    with pytest.raises(RuntimeError, match="does not rebuild NEW"):
        make_delta(tmp_path / "o", tmp_path / "n", tmp_path / "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n", "o"]


def test_public_api_is_the_contract_others_code_against() -> None:
    import dataclasses

    import edgeops.delta as delta

    assert sorted(delta.__all__) == [
        "Codec", "DeltaInfo", "PatchHeader", "apply_delta", "make_delta", "read_patch_header",
    ]  # fmt: skip
    assert [f.name for f in dataclasses.fields(delta.DeltaInfo)] == [
        "codec", "old_sha256", "new_sha256", "old_size", "new_size", "patch_size", "aligned_bytes", "candidates",
        "seconds",
    ]  # fmt: skip
    assert [f.name for f in dataclasses.fields(delta.PatchHeader)] == [
        "codec", "old_sha256", "old_size", "new_sha256", "new_size",
    ]  # fmt: skip
    assert {c.value for c in delta.Codec} == {"tensor-planes-zstd", "zstd-patch-from"}


def test_delta_is_light_core() -> None:
    import json
    import subprocess
    import sys

    code = "import sys, json, edgeops.delta, edgeops.cli.delta_cmd; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout))
    heavy = {"tensorflow", "keras", "onnx", "onnxruntime", "converters", "ai_edge_litert", "cffi"}
    assert not {m.split(".")[0] for m in loaded} & heavy
    assert "zstandard.backend_cffi" not in loaded  # only make_delta's prefix compression loads it, lazily
