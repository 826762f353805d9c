"""Core ML packages: structural check (:func:`check_coreml`) and canonical bytes (:func:`coreml_files`).

Guarantees:

- :func:`check_coreml` checks that the root model of an ``.mlpackage`` is an mlprogram and that every weight
  blob it references lies inside the package's weights folder and has a valid header of the right size; it
  reports the I/O, op types and weight dtypes/bytes. On Linux it is a structural check only: coremltools ships
  no Core ML runtime there and its MIL ops have no reference implementation for e.g. ``conv``/``max_pool``, so
  nothing is executed (``executed`` is False and ``note`` says so).
- :func:`coreml_files` returns a package's files with canonical bytes (path-derived manifest ids, no
  conversion date, deterministic protobufs), so equal models give equal files; it refuses symlinks and
  special files.
- Failures are :class:`edgeops.errors.ModelLoadError` with the package path in the message.

Does not: convert models (see :mod:`converters.coreml_backend`), write anything, validate accuracy, or run
predictions anywhere but macOS.

Heavy imports (coremltools, numpy for predictions) happen inside functions.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.model_types import TensorSpec
from edgeops.errors import ModelLoadError

__all__ = ["CoreMLCheck", "check_coreml", "coreml_files"]

_VOLATILE_METADATA = ("com.github.apple.coremltools.conversion_date",)  # changes with the calendar day
_BLOB_SENTINEL = 0xDEADBEEF


@dataclass(frozen=True)
class CoreMLCheck:
    """What a structural read of an .mlpackage found (nothing was run unless ``executed``)."""

    spec_version: int
    model_type: str  # "mlProgram"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: tuple[str, ...]  # sorted distinct MIL op types
    weight_dtypes: tuple[str, ...]  # dtypes of weight constants, most bytes first, e.g. ("int8", "fp16")
    weight_bytes: int  # payload bytes of weight constants (blob file and inline)
    executed: bool  # True only where a prediction ran (macOS)
    note: str


def _read_package(mlpackage: Path) -> tuple[Any, Path]:
    """The root model spec and the weights folder of a package; raises ModelLoadError."""
    from coremltools.proto import Model_pb2
    from google.protobuf.message import DecodeError

    data = mlpackage / "Data"
    try:
        manifest = json.loads((mlpackage / "Manifest.json").read_text("utf-8"))
        root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
        spec = Model_pb2.Model()
        spec.ParseFromString((data / root).read_bytes())
    except (OSError, ValueError, KeyError, TypeError, DecodeError) as exc:
        raise ModelLoadError(f"{mlpackage}: not a readable .mlpackage: {exc}") from exc
    return spec, (data / root).parent / "weights"


def _feature_spec(feature: Any) -> TensorSpec:
    from coremltools.proto import FeatureTypes_pb2

    kind = feature.type.WhichOneof("Type")
    if kind == "multiArrayType":
        array = feature.type.multiArrayType
        dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
        shape: tuple[int | None, ...] = tuple(int(d) for d in array.shape)
        if array.WhichOneof("ShapeFlexibility") is not None:
            shape = tuple(None for _ in shape)
        return TensorSpec(feature.name, shape, {"DOUBLE": "float64"}.get(dtype, dtype.lower()))
    return TensorSpec(feature.name, (), kind or "unknown")  # image/dictionary features: tf_to_coreml makes none


_WEIGHT_BITS = {
    "FLOAT64": 64, "FLOAT32": 32, "FLOAT16": 16, "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E5M2": 8,
    "INT16": 16, "UINT16": 16, "INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4, "UINT6": 6, "UINT3": 3, "UINT2": 2,
    "UINT1": 1,
}  # fmt: skip  # dtypes that hold weights; int32/int64/bool/string constants are shapes and options


def _short_dtype(name: str) -> str:
    return {"FLOAT32": "fp32", "FLOAT16": "fp16", "FLOAT64": "fp64", "BFLOAT16": "bf16"}.get(name, name.lower())


def _operations(block: Any) -> Iterator[Any]:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def _value_bytes(value: Any, bits: int, where: str, weights: Path, cache: dict[str, bytes]) -> int:
    """Payload bytes of one weight tensor; checks its blob header when it lives in a weight file."""
    count = 1
    for dim in value.type.tensorType.dimensions:
        count *= int(dim.constant.size)
    nbytes = (count * bits + 7) // 8
    if value.WhichOneof("value") != "blobFileValue":
        return nbytes
    blob = value.blobFileValue
    name = blob.fileName.removeprefix("@model_path/weights/")
    if "/" in name or name.startswith("."):
        raise ModelLoadError(f"weight file {blob.fileName!r} of {where!r} is outside the package's weights folder")
    if name not in cache:
        cache[name] = (weights / name).read_bytes()
    header = cache[name][blob.offset : blob.offset + 24]
    if len(header) < 24:
        raise ModelLoadError(f"weight blob of {where!r} lies past the end of {name}")
    sentinel, _, size, start = struct.unpack("<IIQQ", header)
    if sentinel != _BLOB_SENTINEL or size != nbytes or start + size > len(cache[name]):
        raise ModelLoadError(f"weight blob of {where!r} in {name} is malformed")
    return nbytes


def _program_summary(spec: Any, weights: Path) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(sorted op types, weight dtypes by bytes descending, weight bytes) of an mlprogram spec.

    Weights are the tensor attributes of ops: ``const`` values and the data of ``constexpr_*`` ops (which hold
    quantised weights as attributes, not inputs).
    """
    from coremltools.proto import MIL_pb2

    op_types: set[str] = set()
    by_dtype: dict[str, int] = {}
    cache: dict[str, bytes] = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in _operations(block):
                op_types.add(op.type)
                for key, value in op.attributes.items():
                    dtype = MIL_pb2.DataType.Name(value.type.tensorType.dataType)
                    if key == "name" or dtype not in _WEIGHT_BITS:
                        continue
                    size = _value_bytes(value, _WEIGHT_BITS[dtype], f"{op.type}.{key}", weights, cache)
                    by_dtype[_short_dtype(dtype)] = by_dtype.get(_short_dtype(dtype), 0) + size
    order = sorted(by_dtype, key=lambda d: (-by_dtype[d], d))
    return tuple(sorted(op_types)), tuple(order), sum(by_dtype.values())


def check_coreml(mlpackage: Path) -> CoreMLCheck:
    """Read an .mlpackage without running it (on Linux) and describe it.

    Checks that the root model is an mlprogram and that every weight blob it references exists and has a valid
    header of the right size. Raises ModelLoadError for a missing, malformed or non-mlprogram package, or one
    whose weights are truncated.
    """
    mlpackage = Path(mlpackage)
    spec, weights = _read_package(mlpackage)
    model_type = spec.WhichOneof("Type") or "none"
    if model_type != "mlProgram":
        raise ModelLoadError(f"{mlpackage}: Core ML model is a {model_type}, not an mlProgram")
    try:
        ops, dtypes, nbytes = _program_summary(spec, weights)
    except OSError as exc:
        raise ModelLoadError(f"{mlpackage}: cannot read weights: {exc}") from exc
    inputs = tuple(_feature_spec(f) for f in spec.description.input)
    outputs = tuple(_feature_spec(f) for f in spec.description.output)
    executed, note = _try_predict(mlpackage, inputs)
    return CoreMLCheck(spec.specificationVersion, model_type, inputs, outputs, ops, dtypes, nbytes, executed, note)


def _try_predict(mlpackage: Path, inputs: tuple[TensorSpec, ...]) -> tuple[bool, str]:
    """On macOS, run one prediction on zeros; elsewhere report that nothing ran. Untested off macOS."""
    if sys.platform != "darwin":
        return False, "structural check only: Core ML predictions need macOS"
    import coremltools as ct
    import numpy as np

    model = ct.models.MLModel(str(mlpackage))
    feed = {s.name: np.zeros([d or 1 for d in s.shape], dtype=s.dtype) for s in inputs}
    model.predict(feed)
    return True, "ran one prediction on zeros with Core ML"


def _canonical_uuid(item_path: str) -> str:
    digest = hashlib.sha256(f"edgeops.coreml:{item_path}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def _canonical_manifest(raw: bytes) -> bytes:
    """Manifest.json with item ids derived from the item paths, keys sorted, fixed layout."""
    manifest = json.loads(raw)
    entries = manifest["itemInfoEntries"]
    renamed = {old: _canonical_uuid(entry["path"]) for old, entry in entries.items()}
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in entries.items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    return (json.dumps(manifest, indent=4, sort_keys=True) + "\n").encode()


def _canonical_spec(raw: bytes) -> bytes:
    """The model spec without the conversion date, serialised deterministically (map fields sorted)."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(raw)
    for key in _VOLATILE_METADATA:
        if key in spec.description.metadata.userDefined:
            del spec.description.metadata.userDefined[key]
    data: bytes = spec.SerializeToString(deterministic=True)
    return data


def coreml_files(mlpackage: Path) -> list[tuple[str, bytes]]:
    """The package's files as sorted (relative posix path, canonical bytes).

    Canonical: Manifest.json item ids are derived from item paths (coremltools makes random UUIDs), the
    ``conversion_date`` metadata is dropped, and protobufs are serialised deterministically; weight files are
    kept as written (coremltools lays them out in program order, which is stable). Writing the result to a new
    folder gives a package coremltools loads. Raises ModelLoadError for a malformed package or one that holds a
    symlink or a special file.
    """
    from google.protobuf.message import DecodeError

    root = Path(mlpackage)
    if not (root / "Manifest.json").is_file():
        raise ModelLoadError(f"{root}: not an .mlpackage (no Manifest.json)")
    rewrite: dict[str, Callable[[bytes], bytes]] = {"Manifest.json": _canonical_manifest}
    files: list[tuple[str, bytes]] = []
    try:
        manifest = json.loads((root / "Manifest.json").read_bytes())
        for entry in manifest["itemInfoEntries"].values():
            if entry["path"].endswith(".mlmodel"):
                rewrite[f"Data/{entry['path']}"] = _canonical_spec
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ModelLoadError(f"{root}: {rel} is not a plain file")
            if path.is_file():
                data = path.read_bytes()
                files.append((rel, rewrite.get(rel, _same)(data)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DecodeError) as exc:
        raise ModelLoadError(f"{root}: malformed .mlpackage: {exc}") from exc
    return sorted(files)


def _same(data: bytes) -> bytes:
    return data
