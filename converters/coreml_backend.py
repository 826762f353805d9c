"""Core ML backend: TensorFlow (Keras 3 / SavedModel) -> Core ML mlprogram (.mlpackage), checks and canonical bytes.

Guarantees:

- :func:`tf_to_coreml` writes an ``.mlpackage`` holding an mlprogram with static input shapes (batch 1),
  fp16 compute and fp32 I/O for float tensors, optionally with int8 linear (symmetric, per-channel) weights. The
  package is built in a temporary folder next to ``out`` and moved in place at the end; on any error nothing is
  left at ``out`` (an older package there is kept) and the temporary folder is removed. The written package is
  already canonical (see :func:`coreml_files`), so two conversions of the same model give the same files.
- Input names are the source's (the Keras input names / the SavedModel ``serving_default`` argument names).
  Output names are the Keras ``output_names`` or the ``serving_default`` output keys: coremltools names them
  ``Identity``, ``Identity_1``... and they are renamed afterwards.
- :func:`check_coreml` is a structural check only on Linux: coremltools ships no Core ML runtime there and its
  MIL ops have no reference implementation for e.g. ``conv``/``max_pool``, so nothing is executed.

Does not: convert PyTorch or ONNX directly (ONNX goes through onnx2tf to a SavedModel first), choose compute
units, or run predictions on Linux.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.model_types import ModelFormat, Precision, TensorSpec
from edgeops.errors import BuildError, DataError, ModelLoadError, OutputError, UnsupportedOpError

__all__ = ["CoreMLCheck", "check_coreml", "coreml_files", "tf_to_coreml"]

_PRECISIONS = (Precision.FP16, Precision.INT8_WEIGHTS)
_VOLATILE_METADATA = ("com.github.apple.coremltools.conversion_date",)  # changes with the calendar day
_BLOB_SENTINEL = 0xDEADBEEF
_UNSUPPORTED_OP = re.compile(r"TF op '([^']+)' not implemented|Op-\((\S+)\) \S+ not implemented")


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


@dataclass(frozen=True)
class _TfGraph:
    """A concrete function with static inputs, and the names its outputs should get."""

    function: Any  # tf ConcreteFunction
    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    owner: Any  # the loaded model; keeps the variables the function reads alive


def tf_to_coreml(
    tf_source: Path,
    source_fmt: ModelFormat,
    out: Path,
    *,
    precision: Precision,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    minimum_deployment_target: str = "iOS16",
    profile: str | None = None,
) -> None:
    """Convert a Keras 3 file or SavedModel directory to a canonical Core ML mlprogram at ``out``.

    Raises: BuildError (precision other than fp16/int8-weights, unknown deployment target, conversion failure),
    ModelLoadError (unreadable/corrupt source, wrong ``source_fmt``), DataError (a dimension other than the batch
    stays dynamic, or ``input_shapes`` does not fit the model), UnsupportedOpError (an op coremltools cannot
    convert, named), OutputError (``out``'s folder cannot be written).
    """
    if precision not in _PRECISIONS:
        raise BuildError(f"Core ML supports precision fp16 or int8-weights, not {precision.value!r}", profile=profile)
    if source_fmt is ModelFormat.KERAS:
        graph = _keras_graph(Path(tf_source), input_shapes or {})
    elif source_fmt is ModelFormat.SAVEDMODEL:
        graph = _savedmodel_graph(Path(tf_source), input_shapes or {})
    else:
        raise ModelLoadError(f"Core ML conversion starts from keras or savedmodel, not {source_fmt.value!r}")
    mlmodel = _convert(graph, precision, minimum_deployment_target, profile)
    _save_atomic(mlmodel, Path(out))


def _fix_shape(name: str, shape: tuple[int | None, ...], given: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The static shape of one input: ``given[name]`` if present (must fit), else batch -> 1; raises DataError."""
    if name in given:
        fixed = tuple(int(d) for d in given[name])
        fits = len(fixed) == len(shape) and all(d is None or d == f for d, f in zip(shape, fixed, strict=True))
        if not fits or any(f < 1 for f in fixed):
            raise DataError(f"input_shapes[{name!r}] = {fixed} does not fit the model's input shape {shape}")
        return fixed
    dims = tuple(1 if (i == 0 and d is None) else d for i, d in enumerate(shape))
    dynamic = [i for i, d in enumerate(dims) if d is None]
    if dynamic:
        raise DataError(f"input {name!r} has dynamic dimensions {dynamic} (shape {shape}); give input_shapes")
    return tuple(int(d) for d in dims if d is not None)


def _static_inputs(
    found: list[tuple[str, tuple[int | None, ...], str]], given: Mapping[str, tuple[int, ...]]
) -> tuple[TensorSpec, ...]:
    unknown = sorted(set(given) - {name for name, _, _ in found})
    if unknown:
        raise DataError(f"input_shapes names inputs the model does not have: {unknown}")
    return tuple(TensorSpec(name, _fix_shape(name, shape, given), dtype) for name, shape, dtype in found)


def _keras_graph(path: Path, given: Mapping[str, tuple[int, ...]]) -> _TfGraph:
    """Load a .keras file and trace it with static input specs; raises ModelLoadError/DataError."""
    import keras
    import tensorflow as tf

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such Keras file")
    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{path}: cannot load Keras model: {exc}") from exc
    found = [(t.name, tuple(t.shape), str(t.dtype)) for t in model.inputs]
    inputs = _static_inputs(found, given)
    signature = [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in inputs]

    def call(*args: Any) -> list[Any]:
        result = model(args[0] if len(args) == 1 else list(args), training=False)
        if isinstance(result, Mapping):
            return [result[k] for k in sorted(result)]
        return list(result) if isinstance(result, list | tuple) else [result]

    function = tf.function(call, input_signature=signature).get_concrete_function()
    names = tuple(model.output_names)
    if len(names) != len(function.outputs):
        names = tuple(f"output_{i}" for i in range(len(function.outputs)))
    return _TfGraph(function, inputs, names, model)


def _savedmodel_graph(path: Path, given: Mapping[str, tuple[int, ...]]) -> _TfGraph:
    """Load a SavedModel's serving_default and trace it with static input specs; raises ModelLoadError/DataError."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    if not (path / "saved_model.pb").is_file():
        raise ModelLoadError(f"{path}: not a SavedModel directory (no saved_model.pb)")
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, TypeError, KeyError, DecodeError, tf.errors.OpError) as exc:
        raise ModelLoadError(f"{path}: cannot load SavedModel: {exc}") from exc
    if "serving_default" not in loaded.signatures:
        raise ModelLoadError(f"{path}: SavedModel has no serving_default signature")
    signature_fn = loaded.signatures["serving_default"]
    arg_specs = signature_fn.structured_input_signature[1]
    found = [(n, tuple(s.shape.as_list()), s.dtype.name) for n, s in sorted(arg_specs.items())]
    inputs = _static_inputs(found, given)
    output_names = tuple(sorted(signature_fn.structured_outputs))
    signature = [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in inputs]

    def call(*args: Any) -> list[Any]:
        result = signature_fn(**{s.name: a for s, a in zip(inputs, args, strict=True)})
        return [result[k] for k in output_names]

    function = tf.function(call, input_signature=signature).get_concrete_function()
    return _TfGraph(function, inputs, output_names, loaded)


def _convert(graph: _TfGraph, precision: Precision, target: str, profile: str | None) -> Any:
    """Run coremltools on the traced graph and rename outputs; returns an MLModel with fp32 float I/O."""
    import coremltools as ct
    import numpy as np

    deployment = getattr(ct.target, target, None)
    if deployment is None:
        raise BuildError(f"unknown Core ML deployment target {target!r}", profile=profile)

    def io_dtype(dtype: str) -> Any:
        return np.float32 if dtype.startswith(("float", "bfloat")) else np.int32 if "int" in dtype else None

    inputs = [ct.TensorType(name=s.name, shape=s.shape, dtype=io_dtype(s.dtype)) for s in graph.inputs]
    graph_outputs = [(t.name.split(":")[0], t.dtype.name) for t in graph.function.outputs]
    outputs = [ct.TensorType(name=n, dtype=io_dtype(d)) for n, d in graph_outputs]
    try:
        mlmodel = ct.convert(
            [graph.function], source="tensorflow", convert_to="mlprogram", inputs=inputs, outputs=outputs,
            compute_precision=ct.precision.FLOAT16, minimum_deployment_target=deployment,
        )  # fmt: skip
    except NotImplementedError as exc:
        match = _UNSUPPORTED_OP.search(str(exc))
        if match is None:
            raise BuildError(f"coremltools cannot convert the model: {exc}", profile=profile) from exc
        raise UnsupportedOpError(match.group(1) or match.group(2), profile=profile, detail="Core ML") from exc
    except (ValueError, TypeError, KeyError, RuntimeError, AssertionError) as exc:  # coremltools asserts inside
        raise BuildError(f"coremltools failed to convert the model: {exc}", profile=profile) from exc
    if precision is Precision.INT8_WEIGHTS:
        config = ct.optimize.coreml.OptimizationConfig(
            global_config=ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
        )
        mlmodel = ct.optimize.coreml.linear_quantize_weights(mlmodel, config=config)
    return _rename_outputs(mlmodel, [n for n, _ in graph_outputs], graph.output_names)


def _rename_outputs(mlmodel: Any, current: list[str], wanted: tuple[str, ...]) -> Any:
    import coremltools as ct

    spec = mlmodel.get_spec()
    taken = {f.name for f in spec.description.input}
    renamed = False
    for old, new in zip(current, wanted, strict=True):
        if old != new and new not in taken and new.isidentifier():
            ct.utils.rename_feature(spec, old, new)
            renamed = True
        taken.add(new)
    if not renamed:
        return mlmodel
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def _save_atomic(mlmodel: Any, out: Path) -> None:
    """Save, canonicalise, and move the package to ``out``; nothing is left behind on error."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write next to {out}: {exc}") from exc
    try:
        staged = tmp / "model.mlpackage"
        mlmodel.save(str(staged))
        _write_files(staged, coreml_files(staged))
        _replace_dir(staged, out, tmp / "previous.mlpackage")
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(staged: Path, out: Path, aside: Path) -> None:
    """Move ``staged`` to ``out``; an existing ``out`` is moved aside first and put back if the move fails."""
    if not out.exists():
        os.replace(staged, out)
        return
    os.replace(out, aside)
    try:
        os.replace(staged, out)
    except OSError:
        os.replace(aside, out)
        raise


def _write_files(root: Path, files: list[tuple[str, bytes]]) -> None:
    shutil.rmtree(root)
    for rel, data in files:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


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
