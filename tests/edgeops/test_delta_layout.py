"""The layout readers: tensor regions of TFLite models (built here with TensorFlow's own schema code), ONNX
models, .npy arrays and tar artifacts — and, for any bytes at all, a well-formed answer in bounded time."""

from __future__ import annotations

import importlib.util
import io
import struct
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeops.artifact import pack_artifact
from edgeops.delta.layout import find_regions
from edgeops.delta.regions import LayoutError, Region
from edgeops.delta.tflite_layout import tflite_regions


def _schema() -> ModuleType:
    """tensorflow/lite/python/schema_py_generated.py loaded by path (flatbuffers only, no TensorFlow import)."""
    spec = importlib.util.find_spec("tensorflow")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "lite" / "python" / "schema_py_generated.py"
    module_spec = importlib.util.spec_from_file_location("tflite_schema_for_layout_tests", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


SCHEMA = _schema()
W = np.arange(100, dtype="<f4")
Q = np.arange(-50, 50, dtype=np.int8)
H = np.linspace(0, 1, 64).astype("<f2")
BIG = np.arange(256, dtype="<i8")  # stored after the flatbuffer, as models over 2 GB do


def _tflite(external_offset: int = 2) -> bytes:
    import flatbuffers

    s = SCHEMA
    model = s.ModelT()
    model.version = 3
    buffers = [s.BufferT() for _ in range(6)]
    for buf, array in zip(buffers[1:4], (W, Q, H)):
        buf.data = array.view(np.uint8)
    buffers[4].offset, buffers[4].size = external_offset, BIG.nbytes
    buffers[5].data = np.frombuffer(b"1.5.0\0", dtype=np.uint8)  # metadata: no tensor uses it
    model.buffers = buffers

    def tensor(name: str, type_: int, buffer: int) -> object:
        t = s.TensorT()
        t.name, t.type, t.buffer, t.shape = name, type_, buffer, [1]
        return t

    first, second = s.SubGraphT(), s.SubGraphT()
    first.tensors = [tensor("input", 0, 0), tensor("dense/w", 0, 1), tensor("dense/q", 9, 2)]
    second.tensors = [tensor("half", 1, 3), tensor("half_again", 1, 3), tensor("big", 4, 4)]
    model.subgraphs = [first, second]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tflite_with_external_data() -> bytes:
    size = len(_tflite())  # the same size whatever the (non-default) offset value
    offset = size + (-size % 64)
    flat = _tflite(offset)
    assert len(flat) == size
    return flat + b"\0" * (offset - size) + BIG.tobytes()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _check_invariants(regions: tuple[Region, ...], size: int) -> None:
    end = 0
    for r in regions:
        assert r.offset >= end and r.length > 0 and r.offset + r.length <= size
        assert r.elem_size in (1, 2, 4, 8) and r.length % r.elem_size == 0
        end = r.offset + r.length
    assert len({r.key for r in regions}) == len(regions)


def test_tflite_buffers_are_found_with_names_and_element_sizes() -> None:
    data = _tflite_with_external_data()
    regions = {r.key: r for r in find_regions(data)}
    expected = {"dense/w": (W, 4), "dense/q": (Q, 1), "half": (H, 2), "big": (BIG, 8)}
    for key, (array, elem) in expected.items():
        r = regions.pop(key)
        assert data[r.offset : r.offset + r.length] == array.tobytes() and r.elem_size == elem, key
    assert list(regions) == ["buffer#5"]  # the metadata buffer, keyed by index
    assert data[regions["buffer#5"].offset :][:6] == b"1.5.0\0"


def test_tflite_reader_agrees_with_the_generated_schema_reader() -> None:
    data = _tflite_with_external_data()
    model = SCHEMA.Model.GetRootAsModel(data, 0)
    ours = sorted((r.offset, r.length) for r in find_regions(data))
    base = np.frombuffer(data, dtype=np.uint8).__array_interface__["data"][0]
    theirs = []
    for i in range(model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength():  # DataAsNumpy is a view into ``data``: its address gives the offset
            theirs.append((buf.DataAsNumpy().__array_interface__["data"][0] - base, buf.DataLength()))
        elif buf.Offset() > 1:
            theirs.append((buf.Offset(), buf.Size()))
    assert ours == sorted(theirs)


def test_artifact_members_are_read_at_absolute_offsets() -> None:
    tflite, golden = _tflite(), np.linspace(-1, 1, 10).astype("<f4")
    files = {"model.tflite": tflite, "golden/output_0.npy": _npy(golden), "notes.txt": b"not a model"}
    artifact = pack_artifact(b"{}", b"{}", files)
    regions = {r.key: r for r in find_regions(artifact)}
    assert set(regions) == {
        "golden/output_0.npy:npy",
        "model.tflite:dense/w",
        "model.tflite:dense/q",
        "model.tflite:half",
        "model.tflite:buffer#5",
    }  # "big" lives past the end of this truncated model: dropped, not trusted
    npy = regions["golden/output_0.npy:npy"]
    assert artifact[npy.offset : npy.offset + npy.length] == golden.tobytes() and npy.elem_size == 4
    w = regions["model.tflite:dense/w"]
    assert artifact[w.offset : w.offset + w.length] == W.tobytes()


def test_onnx_initializers_are_found_with_names_and_element_sizes() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.arange(12, dtype=np.float32), "w"),
        numpy_helper.from_array(np.arange(5, dtype=np.int64), "shape"),
        numpy_helper.from_array(np.arange(7, dtype=np.float16), "h"),
        helper.make_tensor("packed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),  # float_data, not raw_data
        helper.make_tensor("ints", TensorProto.INT32, [2], [1, 2]),  # varints: no fixed-width bytes
    ]
    graph = helper.make_graph([], "g", [], [], initializer=inits)
    data = helper.make_model(graph).SerializeToString()
    regions = {r.key: r for r in find_regions(data)}
    assert set(regions) == {"w", "shape", "h", "packed"}
    for init in onnx.load_from_string(data).graph.initializer:
        if init.name in regions:
            r, array = regions[init.name], numpy_helper.to_array(init)
            assert data[r.offset : r.offset + r.length] == array.tobytes() and r.elem_size == array.dtype.itemsize


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"TFL3",
        b"\0\0\0\0TFL3" + b"\xff" * 64,
        b"\x93NUMPY\x01\x00\xff\xff",
        b"\x3a\x05abc",  # protobuf field 7 running past the end
        b"\x0b\x00",  # a protobuf group
        b"ustar" * 200,
    ],
)
def test_unparseable_input_has_no_regions(data: bytes) -> None:
    assert find_regions(data) == ()


def test_flatbuffer_that_revisits_its_tables_ends_quickly() -> None:
    """A model whose subgraph vector points at one subgraph a hundred thousand times, each with as many tensors:
    10^10 visits if followed naively; the reader's budget stops it."""
    n = 100_000
    out = bytearray(struct.pack("<I", 0) + b"TFL3")  # root offset, patched below
    vtable = len(out)
    out += struct.pack("<HHHHH", 10, 8, 0, 0, 4)  # a vtable with field 2 (Model.subgraphs) at +4
    sub_vtable = len(out)
    out += struct.pack("<HHH", 6, 8, 4)  # a vtable with field 0 (SubGraph.tensors) at +4
    model = len(out)
    out += struct.pack("<iI", model - vtable, 0)
    subgraphs = len(out)  # n entries, all pointing at the one subgraph table after them
    subgraph = subgraphs + 4 + 4 * n
    out += struct.pack("<I", n) + b"".join(struct.pack("<I", subgraph - (subgraphs + 4 + 4 * i)) for i in range(n))
    out += struct.pack("<iI", subgraph - sub_vtable, 0)
    tensors = len(out)  # n entries, all pointing at the one tensor table after them
    tensor = tensors + 4 + 4 * n
    out += struct.pack("<I", n) + b"".join(struct.pack("<I", tensor - (tensors + 4 + 4 * i)) for i in range(n))
    out += struct.pack("<iI", tensor - vtable, 0)
    struct.pack_into("<I", out, 0, model)
    struct.pack_into("<I", out, model + 4, subgraphs - (model + 4))
    struct.pack_into("<I", out, subgraph + 4, tensors - (subgraph + 4))
    start = time.perf_counter()
    with pytest.raises(LayoutError, match="visits more tables"):
        tflite_regions(memoryview(bytes(out)))
    assert find_regions(bytes(out)) == ()
    assert time.perf_counter() - start < 10.0  # about 0.5 s on one core; naively, hours


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_give_well_formed_regions(data: bytes) -> None:
    _check_invariants(find_regions(data), len(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_behind_a_tflite_identifier_give_well_formed_regions(tail: bytes) -> None:
    data = tail[:4].ljust(4, b"\0") + b"TFL3" + tail[4:]
    _check_invariants(find_regions(data), len(data))


_MODELS = {"tflite": _tflite_with_external_data()}


def _onnx_model() -> bytes:
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.arange(n, dtype=np.float32), f"w{n}") for n in (4, 16, 64)]
    return helper.make_model(helper.make_graph([], "g", [], [], initializer=inits)).SerializeToString()


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["tflite", "onnx", "artifact"]), data=st.data())
def test_mutated_models_give_well_formed_regions(kind: str, data: st.DataObject) -> None:
    if kind not in _MODELS:
        _MODELS["onnx"] = _onnx_model()
        _MODELS["artifact"] = pack_artifact(b"{}", b"{}", {"model.onnx": _MODELS["onnx"], "x.npy": _npy(W)})
    model = bytearray(_MODELS[kind])
    for _ in range(data.draw(st.integers(1, 8))):
        model[data.draw(st.integers(0, len(model) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del model[data.draw(st.integers(0, len(model))) :]
    _check_invariants(find_regions(bytes(model)), len(model))
