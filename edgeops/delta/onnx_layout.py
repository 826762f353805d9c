"""Tensor data regions of an ONNX model, read from the protobuf wire format without the onnx package
(light core: stdlib only).

The reader walks only what the delta encoder needs from ``onnx.proto``::

    ModelProto  { ...; graph: GraphProto = 7; ... }
    GraphProto  { ...; initializer: repeated TensorProto = 5; ... }
    TensorProto { data_type: int32 = 2; float_data: packed float = 4; name: string = 8; raw_data: bytes = 9;
                  double_data: packed double = 10; data_location = 14 (1 = EXTERNAL); ... }

Each initializer's ``raw_data`` (or packed ``float_data``/``double_data``) becomes one :class:`Region` keyed by
the initializer's name, with the element size of its ``data_type``. Initializers with external data hold no
bytes in the file and are skipped; so are tensors inside node attributes (subgraphs of If/Loop).

Guarantees: each field is parsed once, left to right, with every length checked against the bytes left, so
parsing is linear in the input and allocates only the region list. Input that is not well-formed protobuf, or
has no ``graph`` field, raises :class:`LayoutError`; no other exception escapes.
"""

from __future__ import annotations

from collections.abc import Iterator

from edgeops.delta.regions import LayoutError, Region

__all__ = ["onnx_regions"]

MAX_NAME_BYTES = 512  # a longer initializer name is cut (only used as a pairing key)

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA, _TENSOR_NAME, _TENSOR_RAW_DATA = 2, 4, 8, 9
_TENSOR_DOUBLE_DATA, _TENSOR_DATA_LOCATION = 10, 14
_EXTERNAL = 1

# TensorProto.DataType -> element size in bytes (sub-byte and float8 types count as 1).
_ELEM_SIZE = {
    1: 4,  # FLOAT
    2: 1,  # UINT8
    3: 1,  # INT8
    4: 2,  # UINT16
    5: 2,  # INT16
    6: 4,  # INT32
    7: 8,  # INT64
    9: 1,  # BOOL
    10: 2,  # FLOAT16
    11: 8,  # DOUBLE
    12: 4,  # UINT32
    13: 8,  # UINT64
    14: 4,  # COMPLEX64
    15: 8,  # COMPLEX128
    16: 2,  # BFLOAT16
}


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise LayoutError("truncated or overlong protobuf varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value, end of field) for each field in ``buf[start:end]``.

    ``value`` is the integer of a varint field, and the start of the payload of any other field.
    """
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise LayoutError("protobuf field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
            continue
        if wire == _LEN:
            length, pos = _varint(buf, pos, end)
            value, nxt = pos, pos + length
        elif wire == _FIXED64:
            value, nxt = pos, pos + 8
        elif wire == _FIXED32:
            value, nxt = pos, pos + 4
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise LayoutError(f"protobuf wire type {wire} is not supported")
        if nxt > end:
            raise LayoutError("protobuf field runs past its message")
        yield number, wire, value, nxt
        pos = nxt


def _initializer(buf: memoryview, start: int, end: int, base: int, prefix: str, index: int) -> Region | None:
    data_type, name = 0, ""
    span: tuple[int, int, int] | None = None  # start, end, element size forced by the field (0: from data_type)
    external = False
    for number, wire, value, nxt in _fields(buf, start, end):
        if number == _TENSOR_DATA_TYPE and wire == _VARINT:
            data_type = value
        elif number == _TENSOR_NAME and wire == _LEN:
            name = bytes(buf[value : min(nxt, value + MAX_NAME_BYTES)]).decode("utf-8", "replace")
        elif number == _TENSOR_RAW_DATA and wire == _LEN:
            span = (value, nxt, 0)
        elif number in (_TENSOR_FLOAT_DATA, _TENSOR_DOUBLE_DATA) and wire == _LEN and span is None:
            span = (value, nxt, 4 if number == _TENSOR_FLOAT_DATA else 8)
        elif number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = value == _EXTERNAL
    if span is None or external or span[1] == span[0]:
        return None
    elem = span[2] or _ELEM_SIZE.get(data_type, 1)
    return Region(base + span[0], span[1] - span[0], elem, f"{prefix}{name or f'initializer#{index}'}")


def onnx_regions(data: memoryview, base: int = 0, prefix: str = "") -> list[Region]:
    """Regions of every initializer with data in the ONNX model ``data``; offsets are ``base`` + file offset.

    Raises LayoutError when ``data`` is not a well-formed protobuf with a graph.
    """
    graph: tuple[int, int] | None = None
    for number, wire, value, nxt in _fields(data, 0, len(data)):
        if number == _MODEL_GRAPH and wire == _LEN:
            if graph is not None:
                raise LayoutError("not an ONNX model (two graph fields)")
            graph = (value, nxt)
    if graph is None:
        raise LayoutError("not an ONNX model (no graph field)")
    start, end = graph
    regions: list[Region] = []
    for number, wire, value, nxt in _fields(data, start, end):
        if number == _GRAPH_INITIALIZER and wire == _LEN:
            region = _initializer(data, value, nxt, base, prefix, len(regions))
            if region is not None:
                regions.append(region)
    return regions
