"""Property tests over every parser that reads network or file bytes: for any input, the parser returns a value
or raises its typed refusal (an UntrustedInput subclass) — never another exception, never a hang.

Each target of ``benchmarks.fuzz.targets.TARGETS`` (the registry the atheris fuzzer also runs) gets arbitrary
bytes and its seeds mangled byte-wise; the wire formats also get structure-aware inputs that pass the outer
checks and break one thing inside: a valid JSON document with one field replaced, deleted or added (signed by
the trusted key where the format is signed), a chunk frame or ustar header with consistent framing and
checksum around a bad field, a delta patch with one header field changed or a hand-made op table. The
regression tests at the end pin the inputs the fuzzers found.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz import seeds
from benchmarks.fuzz.targets import TARGETS, FuzzTarget, run_one
from device_agent.http_api import NPY_TYPE, NPZ_TYPE, decode_request
from edgeops.artifact import _header, read_unverified_manifest, verify_artifact
from edgeops.delta.patch_format import HEADER_SIZE
from edgeops.errors import ArtifactFormatError, RequestError, TelemetryRejected, UntrustedInput
from edgeops.fleet.registry import parse_state
from edgeops.manifest import Manifest
from edgeops.release import MAX_CHUNKS

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Harnesses that sign, write a file or apply a patch per input run ~1-4k inputs/s; the rest ~50k/s.
_SLOW_TARGETS = {"release-signed", "command-signed", "command-guard", "delta-apply", "artifact-unverified",
                 "artifact-verify", "artifact-manifest", "http-request"}
_DEEP = "\x00deep\x00"  # a placeholder string value that _encode replaces by JSON nested far too deep


def _check(name: str, data: bytes) -> None:
    run_one(TARGETS[name], data)


def _settings(name: str) -> settings:
    return SLOW if name in _SLOW_TARGETS else FAST


# --- the registry itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_contract(name: str) -> None:
    """Seeds fit max_len, typed errors are UntrustedInput, and some seed gets through to a parsed value."""
    target = TARGETS[name]
    assert target.expected and all(issubclass(e, UntrustedInput) for e in target.expected)
    passed = 0
    for seed in target.seeds():
        assert len(seed) <= target.max_len
        try:
            target.run(seed)
            passed += 1
        except target.expected:
            pass
    assert passed, f"no seed of {name} is accepted: the fuzzer would never get past the first check"


# --- arbitrary and mangled bytes, every target ----------------------------------------------------------------


@st.composite
def _mangled(draw: st.DrawFn, target: FuzzTarget) -> bytes:
    """A seed with a few byte edits: overwrite, insert, delete, or a splice of another seed."""
    pool = list(target.seeds())
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["set", "insert", "delete", "splice"]))
        if edit == "set" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            other = draw(st.sampled_from(pool))
            data = data[:at] + other[draw(st.integers(0, len(other))) :]
    return bytes(data[: target.max_len])


@pytest.mark.parametrize("name", list(TARGETS))
def test_arbitrary_bytes(name: str) -> None:
    @_settings(name)
    @given(st.binary(max_size=TARGETS[name].max_len))
    def check(data: bytes) -> None:
        _check(name, data)

    check()


@pytest.mark.parametrize("name", list(TARGETS))
def test_mangled_seeds(name: str) -> None:
    @_settings(name)
    @given(_mangled(TARGETS[name]))
    def check(data: bytes) -> None:
        _check(name, data)

    check()


# --- JSON documents with one field mutated -------------------------------------------------------------------

_HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**63, 2**64, 10**400, -(10**400), 1e308, -0.0, 5e-324]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", "x" * 300, "1.0.0\n", "../etc", "+", "#", "a/b", ".hidden", "\u00e9\u0660", "\x00", _DEEP]),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _encode(doc: Any) -> bytes:
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace(json.dumps(_DEEP), "[" * 5000 + "]" * 5000).encode()


@st.composite
def _one_field(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with one value replaced, one key deleted, or one key added (at any depth)."""
    doc = json.loads(json.dumps(doc))
    path = draw(st.sampled_from(_paths(doc)))
    value = draw(_HOSTILE)
    if not path:
        return value if draw(st.booleans()) else {**doc, draw(st.text(max_size=8)): value}
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    edit = draw(st.sampled_from(["replace", "delete", "add"]))
    if edit == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif edit == "add" and isinstance(parent[path[-1]], dict):
        parent[path[-1]][draw(st.text(max_size=8))] = value
    else:
        parent[path[-1]] = value
    return doc


def _json_seeds(raws: Any) -> list[Any]:
    return [json.loads(r) for r in raws if r]


# target → (valid documents, how a document becomes the harness's input)
_DOCUMENTS: dict[str, tuple[list[Any], Any]] = {
    "release-signed": (_json_seeds(seeds.release_payloads()), _encode),
    "release-raw": (_json_seeds(seeds.release_envelopes()), _encode),
    "repair": (_json_seeds(seeds.repair_seeds()), _encode),
    "command-signed": (_json_seeds(seeds.command_payloads()), _encode),
    "command-raw": (_json_seeds(seeds.command_envelopes()), _encode),
    "command-guard": (_json_seeds(seeds.command_payloads()), _encode),
    "telemetry": (_json_seeds(seeds.telemetry_seeds()), _encode),
    "event": (_json_seeds(seeds.event_seeds()), _encode),
    "device-state": (_json_seeds(seeds.state_seeds()), _encode),
    "http-request": (_json_seeds(s[1:] for s in seeds.http_seeds()[:2]), lambda d: bytes([8]) + _encode(d)),
}


@pytest.mark.parametrize("name", list(_DOCUMENTS))
def test_documents_with_one_field_mutated(name: str) -> None:
    docs, encode = _DOCUMENTS[name]

    @_settings(name)
    @given(st.sampled_from(docs).flatmap(_one_field))
    def check(doc: Any) -> None:
        _check(name, encode(doc))

    check()


def _manifest_paths(doc: Any) -> list[tuple[Any, ...]]:
    return _paths(doc)


@SLOW
@given(st.data())
def test_signed_manifest_with_one_field_mutated(data: st.DataObject) -> None:
    """A manifest.json signed by the trusted key reaches Manifest.from_bytes and the file checks."""
    doc = json.loads(seeds.artifact_manifest())
    path = data.draw(st.sampled_from(_manifest_paths(doc)))
    value = data.draw(_HOSTILE)
    if path:
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    else:
        doc = value
    _check("artifact-manifest", _encode(doc))


# --- binary formats with consistent framing around a bad field -------------------------------------------------


@FAST
@given(
    rid=st.one_of(st.just(seeds.RELEASE_ID.encode()), st.binary(max_size=70)),
    declared=st.one_of(st.none(), st.integers(0, 255)),
    pid=st.binary(min_size=8, max_size=8),
    index=st.one_of(st.integers(0, 3), st.sampled_from([MAX_CHUNKS - 1, MAX_CHUNKS, 2**32 - 1])),
    data=st.binary(max_size=2100),
    good_hash=st.booleans(),
)
def test_chunk_frames(rid: bytes, declared: int | None, pid: bytes, index: int, data: bytes, good_hash: bool) -> None:
    digest = hashlib.sha256(data).digest() if good_hash else bytes(32)
    length = len(rid) % 256 if declared is None else declared
    _check("chunk", b"EOC1" + bytes([length]) + rid + struct.pack(">8sI32s", pid, index, digest) + data)


@FAST
@given(st.data())
def test_bitmaps_of_the_announced_length(data: st.DataObject) -> None:
    count = data.draw(st.integers(0, MAX_CHUNKS))
    size = data.draw(st.sampled_from([(count + 7) // 8, max(0, (count + 7) // 8 - 1), (count + 7) // 8 + 1]))
    bits = data.draw(st.binary(min_size=min(size, 64), max_size=min(size, 64))) + bytes(max(0, size - 64))
    _check("bitmap", count.to_bytes(3, "little") + bits)


_HEADER_FIELDS = struct.Struct("<8sHBBQQ32s32sIIQQQ")
_FIELD_MAX = [None, 2**16 - 1, 255, 255, 2**64 - 1, 2**64 - 1, None, None, 2**32 - 1, 2**32 - 1, 2**64 - 1,
              2**64 - 1, 2**64 - 1]


@SLOW
@given(st.data())
def test_delta_patches_with_one_header_field_changed(data: st.DataObject) -> None:
    patch = bytearray(data.draw(st.sampled_from(seeds.delta_patches())))
    fields = list(_HEADER_FIELDS.unpack_from(patch))
    i = data.draw(st.integers(0, len(fields) - 1))
    top = _FIELD_MAX[i]
    if top is None:
        fields[i] = data.draw(st.binary(min_size=len(fields[i]), max_size=len(fields[i])))
    else:
        fields[i] = data.draw(st.one_of(st.integers(0, top), st.sampled_from([0, 1, top, fields[i] + 1,
                                                                                max(0, fields[i] - 1)])))
    patch[:HEADER_SIZE] = _HEADER_FIELDS.pack(*fields)
    if data.draw(st.booleans()) and len(patch) > HEADER_SIZE:  # and one byte of a section
        at = data.draw(st.integers(HEADER_SIZE, len(patch) - 1))
        patch[at] ^= data.draw(st.integers(1, 255))
    _check("delta-header", bytes(patch))
    _check("delta-apply", bytes(patch))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_VALUES = st.one_of(st.integers(0, 5000), st.sampled_from([0, 1, 2**21, 2**32, 2**63 - 1, 2**64 - 1, 2**70]))


@FAST
@given(
    sizes=st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1)),
    ranges=st.lists(st.tuples(_VALUES, _VALUES), max_size=3),
    ops=st.lists(st.tuples(st.integers(0, 6), st.lists(_VALUES, max_size=4), st.binary(max_size=6)), max_size=8),
)
def test_delta_op_tables(sizes: tuple[int, int, int], ranges: list[tuple[int, int]],
                         ops: list[tuple[int, list[int], bytes]]) -> None:
    """Hand-made tables: any opcode, any varints (overlong ones too), any plane bytes."""
    table = _varint(len(ranges)) + b"".join(_varint(g) + _varint(n) for g, n in ranges)
    table += b"".join(bytes([code]) + b"".join(map(_varint, values)) + tail for code, values, tail in ops)
    _check("delta-op-table", struct.pack("<HHH", *sizes) + table)


def _member_header(name: bytes, size_field: bytes, mode: bytes = b"0000644\0", flag: bytes = b"0") -> bytes:
    """A ustar header with these fields and a correct checksum (so the reader looks past the checksum)."""
    h = bytearray(_header("manifest.json", 0))
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = mode[:8].ljust(8, b"\0")
    h[124:136] = size_field[:12].ljust(12, b"\0")
    h[156:157] = flag[:1] or b"\0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


@SLOW
@given(
    member=st.integers(0, 4),
    name=st.one_of(st.sampled_from([b"manifest.json", b"manifest.sig", b"model.onnx", b"../x", b"a//b", b""]),
                   st.binary(max_size=100)),
    size=st.one_of(st.integers(-(8**10) + 1, 8**11 - 1).map(lambda n: b"%011o\0" % n),
                   st.binary(min_size=12, max_size=12)),
    flag=st.sampled_from([b"0", b"5", b"2", b"\0", b"L"]),
)
def test_artifacts_with_one_member_header_changed(member: int, name: bytes, size: bytes, flag: bytes) -> None:
    art = bytearray(seeds.artifact_seeds()[0])
    offsets = [0]  # header offsets, walked with the real sizes
    while offsets[-1] + 512 <= len(art) and art[offsets[-1] : offsets[-1] + 512] != bytes(512):
        n = int(art[offsets[-1] + 124 : offsets[-1] + 135], 8)
        offsets.append(offsets[-1] + 512 + n + (-n % 512))
    at = offsets[min(member, len(offsets) - 1)]
    art[at : at + 512] = _member_header(name, size, flag=flag)
    _check("artifact-unverified", bytes(art))
    _check("artifact-verify", bytes(art))


@SLOW
@given(
    header=st.fixed_dictionaries(
        {},
        optional={
            "descr": st.one_of(st.sampled_from(["<f4", ">i2", "|b1", "O", "<U3", "<c8", "V8", "[('a','<f4')]", ""]),
                               st.text(max_size=8)),
            "fortran_order": st.one_of(st.booleans(), st.integers(-1, 2)),
            "shape": st.one_of(st.lists(st.integers(-3, 2**62), max_size=4).map(tuple), st.text(max_size=4)),
        },
    ),
    raw=st.one_of(st.none(), st.text(max_size=64)),
    body=st.binary(max_size=64),
    version=st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x00\x00"]),
)
def test_npy_headers(header: dict[str, Any], raw: str | None, body: bytes, version: bytes) -> None:
    """.npy bodies with well-framed headers holding any field values (or any text)."""
    text = (repr(header) if raw is None else raw).encode("utf-8", "replace")
    length = struct.pack("<H" if version in (b"\x01\x00", b"\x00\x00") else "<I", len(text) + 1)
    npy = b"\x93NUMPY" + version + length + text + b"\n" + body
    with contextlib.suppress(RequestError):
        decode_request(NPY_TYPE, npy, None, max_bytes=1 << 16)


@SLOW
@given(
    members=st.lists(st.tuples(st.text(st.characters(exclude_characters="\x00"), min_size=1, max_size=12),
                               st.binary(max_size=40)), max_size=3),
    deflate=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=3),
)
def test_npz_archives(members: list[tuple[str, bytes]], deflate: bool, flips: list[tuple[int, int]]) -> None:
    """.npz bodies: any member names and bytes, then a few bytes of the zip structure flipped."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, data)
    body = bytearray(buf.getvalue())
    for at, xor in flips:
        if body:
            body[at % len(body)] ^= xor
    with contextlib.suppress(RequestError):
        decode_request(NPZ_TYPE, bytes(body), None, max_bytes=1 << 16)


@FAST
@given(st.text(max_size=80))
def test_ingest_topics(suffix: str) -> None:
    _check("ingest-topic", suffix.encode("utf-8", "surrogatepass"))


# --- regressions: inputs the fuzzers found ----------------------------------------------------------------------


def _artifact(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "a.edgeops"
    path.write_bytes(raw)
    return path


def test_member_with_a_negative_size_is_refused(tmp_path: Path) -> None:
    """'-0000050000' in the size field round-trips through the canonical header; it used to seek before 0."""
    art = seeds.artifact_seeds()[0]
    path = _artifact(tmp_path, _header("manifest.json", -512 * 40) + art[512:])
    with pytest.raises(ArtifactFormatError):
        read_unverified_manifest(path)
    with pytest.raises(ArtifactFormatError):
        verify_artifact(path, [seeds.PUBLIC])


def test_deeply_nested_manifest_sig_is_refused(tmp_path: Path) -> None:
    from edgeops.artifact import pack_artifact

    manifest = seeds.artifact_manifest()
    sig = b'{"signatures": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    with pytest.raises(ArtifactFormatError):
        verify_artifact(_artifact(tmp_path, pack_artifact(manifest, sig, seeds.artifact_files())), [seeds.PUBLIC])


def test_deeply_nested_manifest_is_refused() -> None:
    with pytest.raises(ArtifactFormatError):
        Manifest.from_bytes(b"[" * 100_000)


def test_deeply_nested_state_is_refused() -> None:
    with pytest.raises(TelemetryRejected):
        parse_state(seeds.DEVICE, b"[" * 3000, received_at=0.0)


def _npy_with_header(text: bytes) -> bytes:
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


@pytest.mark.parametrize(
    "body",
    [
        # numpy's Python-2 header fallback runs the tokenizer on the header text (TokenError)
        _npy_with_header(b"{'descr': '<f4', 'fortran_order': False, 'shape':j(1, 4),# }   \n"),
        # bytes and str keys in the header dict (TypeError while sorting them)
        _npy_with_header(b"{b'descr': '>i2', 'fortran_order': True, 'shape': (2, 3), }   \n"),
    ],
    ids=["tokenize-error", "mixed-keys"],
)
def test_npy_header_findings_are_request_errors(body: bytes) -> None:
    with pytest.raises(RequestError):
        decode_request(NPY_TYPE, body, None, max_bytes=1 << 16)


def _npz_with(directory_shift: int = 0, version: int | None = None, utf8_name: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY")
    raw = bytearray(buf.getvalue())
    central = raw.rindex(b"PK\x01\x02")
    if directory_shift:  # the end record puts the directory later than it is: member offsets go negative
        end = raw.rindex(b"PK\x05\x06")
        struct.pack_into("<I", raw, end + 16, struct.unpack_from("<I", raw, end + 16)[0] + directory_shift)
    if version is not None:  # an "extract version" zipfile does not implement: NotImplementedError
        struct.pack_into("<B", raw, central + 6, version)
    if utf8_name:  # the UTF-8 flag on a name that is not UTF-8: UnicodeDecodeError while reading the member
        struct.pack_into("<H", raw, 6, 0x800)
        raw[30:35] = b"\xdf\xff.np"
    return bytes(raw)


@pytest.mark.parametrize("body", [_npz_with(directory_shift=8), _npz_with(version=70),
                                  _npz_with(utf8_name=True)], ids=["negative-seek", "zip-version", "utf8-name"])
def test_npz_findings_are_request_errors(body: bytes) -> None:
    with pytest.raises(RequestError):
        decode_request(NPZ_TYPE, body, None, max_bytes=1 << 16)


# --- open findings (left for the owner of edgeops/manifest.py) ----------------------------------------------------


def _manifest_doc(**changes: Any) -> bytes:
    doc = json.loads(seeds.artifact_manifest())
    doc["inputs"][0].update(changes.pop("input", {}))
    doc["golden"].update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "raw",
    [_manifest_doc(input={"transpose": 5}), _manifest_doc(input={"transpose": [1, "a"]}), _manifest_doc(atol=10**400)],
    ids=["transpose-int", "transpose-mixed", "atol-huge"],
)
def test_manifest_findings_are_refused_as_format_errors(raw: bytes) -> None:
    with pytest.raises(ArtifactFormatError):
        Manifest.from_bytes(raw)

