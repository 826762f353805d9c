"""ONNX format backend: load/save, read I/O, convert from TensorFlow, fix input shapes, runnability check.

Guarantees:

- every function that writes a model writes it atomically (temp file in the destination folder, fsync,
  ``os.replace``); on error nothing new is left at ``out``;
- the same input gives byte-identical output: tf2onnx's counter-suffixed names are canonicalised and producer
  and doc strings are fixed;
- failures are :mod:`edgeops.errors` types with a one-line message.

It does not change precision (fp16 and int8 quantisation live in :mod:`converters.onnx_quantize`), does not
validate accuracy (the validate pass does) and does not handle models over 2 GB (protobuf limit; external-data
models are not supported here).

Heavy imports (tensorflow, tf2onnx, onnx, onnxruntime) happen inside functions.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters.model_types import ModelFormat, TensorSpec
from edgeops.errors import BuildError, DataError, ModelLoadError, OutputError, UnsupportedOpError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "check_onnx_runnable",
    "fix_onnx_input_shapes",
    "load_onnx_model",
    "read_onnx_io",
    "save_onnx_atomic",
    "tf_to_onnx",
]

_COUNTER = re.compile(r"__\d+")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(\d+\)")
_NOT_REGISTERED = re.compile(r"(?:([\w.]+):)?(\w+)\(-?\d+\) is not a registered function/op")
_NO_SCHEMA = re.compile(r"No Op registered for (\w+) with domain_version")


# --------------------------------------------------------------------------------------------- files


def load_onnx_model(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX model. Raises ModelLoadError (one line) when unreadable, corrupt or not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX model {path} does not exist or is not a file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not an ONNX model (protobuf parsing failed: {type(exc).__name__})") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read ONNX model {path}: {exc.strerror}") from exc
    if model.ir_version == 0 or not model.graph.output:
        raise ModelLoadError(f"{path} is not an ONNX model (no IR version or no graph outputs)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
        raise ModelLoadError(f"{path} is not a valid ONNX model: {first}") from exc
    return model


def _write_atomic(out: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temp file next to ``out``, fsync it and move it to ``out``."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror}") from exc
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # directory fsync is unsupported on some filesystems
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_onnx_atomic(model: onnx.ModelProto, out: Path) -> None:
    """Serialise ``model`` to ``out`` atomically. Raises BuildError if it cannot be serialised (e.g. > 2 GB)."""
    try:
        data = model.SerializeToString(deterministic=True)
    except ValueError as exc:
        raise BuildError(f"cannot serialise ONNX model for {out}: {exc}") from exc
    _write_atomic(out, lambda tmp: tmp.write_bytes(data))


# --------------------------------------------------------------------------------------------- io


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    import onnx

    if not value.type.HasField("tensor_type"):
        raise ModelLoadError(f"model input/output {value.name!r} is not a tensor; only tensor I/O is supported")
    ttype = value.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim)
    return TensorSpec(name=value.name, shape=dims, dtype=dtype)


def read_onnx_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs (initializers excluded) and outputs of an ONNX model; ``None`` marks a dynamic dimension.

    ``layout`` is left ``None``: ONNX does not record it. Raises ModelLoadError.
    """
    model = load_onnx_model(path)
    return tuple(_spec(v) for v in _real_inputs(model.graph)), tuple(_spec(v) for v in model.graph.output)


# --------------------------------------------------------------------------------------------- tf -> onnx


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _canonicalise(model: onnx.ModelProto, producer: str) -> None:
    """Make names and metadata independent of converter counters, so equal inputs give equal bytes.

    Graph input/output names are kept (minus a TensorFlow ``:0`` suffix); other names lose ``__<n>`` counters
    and are made unique in graph order (a constant is named after its first consumer); dynamic I/O dims are
    renamed by :func:`_canonical_dims`.
    """
    model.producer_name, model.producer_version, model.doc_string = "edgeops", producer, ""
    main = model.graph
    main.name, main.doc_string = "main", ""
    del main.value_info[:]
    names: dict[str, str] = {v.name: v.name.removesuffix(":0") for v in (*main.input, *main.output)}
    used = set(names.values())
    if len(used) != len(names):
        raise BuildError("model input/output names collide once ':0' suffixes are removed")

    def canon(name: str, base: str, table: dict[str, str], taken: set[str]) -> str:
        if not name or name in table:
            return table.get(name, name)
        base = _COUNTER.sub("", base) or "t"
        new, k = base, 0
        while new in taken:
            k += 1
            new = f"{base}__{k}"
        table[name] = new
        taken.add(new)
        return new

    graphs = list(_graphs(main))
    inits = {t.name for g in graphs for t in g.initializer}
    node_names: dict[str, str] = {}
    node_used: set[str] = set()
    for graph in graphs:  # nodes first; a constant is named after its first consumer (tf2onnx dedups them)
        for i, node in enumerate(graph.node):
            node.doc_string = ""
            node.name = canon(node.name or f"{node.op_type}_{i}", node.name or node.op_type, node_names, node_used)
            for idx, name in enumerate(node.input):
                if name in inits:
                    canon(name, f"{node.name}/in{idx}", names, used)
    for graph in graphs:
        for t in graph.initializer:
            t.name = canon(t.name, t.name, names, used)
        graph.initializer.sort(key=lambda t: t.name)
        for v in (*graph.input, *graph.output, *graph.value_info):
            v.name = canon(v.name, v.name, names, used)
        for node in graph.node:
            node.input[:] = [canon(n, n, names, used) for n in node.input]
            node.output[:] = [canon(n, n, names, used) for n in node.output]
    _canonical_dims(main)


def _canonical_dims(graph: onnx.GraphProto) -> None:
    """Rename dynamic I/O dims by position (``batch``, ``batch_1``, ``d``, ``d_1``...); equal symbols stay equal."""
    symbols: dict[str, str] = {}
    for v in (*graph.input, *graph.output):
        for idx, dim in enumerate(v.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") or not dim.HasField("dim_value"):
                key = dim.dim_param or f"?{v.name}{idx}"
                if key not in symbols:  # distinct source symbols stay distinct: batch, batch_1, d2, ...
                    stem = "batch" if idx == 0 else "d"
                    count = sum(1 for s in symbols.values() if s.startswith(stem))
                    symbols[key] = f"{stem}_{count}" if count else stem
                dim.dim_param = symbols[key]


def _keras_function(path: Path) -> tuple[Any, tuple[Any, ...], Any]:
    import keras
    import tensorflow as tf

    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # keras raises many types for a bad file; all mean "cannot load"
        raise ModelLoadError(f"cannot load Keras model {path}: {str(exc).splitlines()[0][:200]}") from exc
    names = [t.name for t in model.inputs]
    spec = tuple(
        tf.TensorSpec((None, *t.shape[1:]) if len(t.shape) else (), t.dtype, name=n)
        for t, n in zip(model.inputs, names, strict=True)
    )
    out_names = list(model.output_names)

    @tf.function(input_signature=spec)
    def serve(*args: Any) -> dict[str, Any]:
        result = model(args[0] if len(args) == 1 else list(args), training=False)
        if isinstance(result, dict):
            return dict(result)
        outs = result if isinstance(result, list | tuple) else [result]
        return dict(zip(out_names, outs, strict=True))

    return serve, spec, model


def _savedmodel_function(path: Path) -> tuple[Any, tuple[Any, ...], Any]:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise ModelLoadError(f"cannot load SavedModel {path}: {str(exc).splitlines()[0][:200]}") from exc
    sig = loaded.signatures.get("serving_default")
    if sig is None:
        raise ModelLoadError(f"SavedModel {path} has no 'serving_default' signature")
    kwargs = sig.structured_input_signature[1]
    names = sorted(kwargs)
    spec = tuple(
        tf.TensorSpec((None, *kwargs[n].shape[1:]) if kwargs[n].shape.rank else (), kwargs[n].dtype, name=n)
        for n in names
    )

    @tf.function(input_signature=spec)
    def serve(*args: Any) -> dict[str, Any]:
        return dict(sig(**dict(zip(names, args, strict=True))))

    return serve, spec, loaded


def tf_to_onnx(tf_source: Path, source_fmt: ModelFormat, out: Path, *, opset: int = 17) -> None:
    """Convert a Keras 3 ``.keras`` file or a SavedModel (``serving_default``) to fp32 ONNX at ``out``.

    Keeps the source's input/output names (no ``:0``), makes dim 0 dynamic, keeps the layout (NHWC stays
    NHWC). Raises ModelLoadError (source unreadable), BuildError (tf2onnx failed), OutputError.
    """
    import tf2onnx

    if source_fmt is ModelFormat.KERAS:
        serve, spec, keep_alive = _keras_function(Path(tf_source))
    elif source_fmt is ModelFormat.SAVEDMODEL:
        serve, spec, keep_alive = _savedmodel_function(Path(tf_source))
    else:
        raise RuntimeError(f"tf_to_onnx takes a Keras or SavedModel source, not {source_fmt}")
    try:
        model, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    except Exception as exc:  # tf2onnx raises anything from ValueError to KeyError on unsupported graphs
        raise BuildError(f"tf2onnx could not convert {tf_source}: {str(exc).splitlines()[0][:200]}") from exc
    del keep_alive
    _canonicalise(model, f"tf2onnx {tf2onnx.__version__}")
    save_onnx_atomic(model, out)


def fix_onnx_input_shapes(src: Path, out: Path, input_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Write ``src`` with the named inputs made static and shapes re-inferred.

    Raises DataError (unknown input name, wrong rank, a size that conflicts with a static dim, size < 1),
    ModelLoadError, OutputError.
    """
    import onnx

    model = load_onnx_model(src)
    inputs = {v.name: v for v in _real_inputs(model.graph)}
    for name, shape in input_shapes.items():
        if name not in inputs:
            raise DataError(f"unknown input {name!r}; the model's inputs are {sorted(inputs)}")
        dims = inputs[name].type.tensor_type.shape.dim
        given = tuple(int(s) for s in shape)
        current = _spec(inputs[name]).shape
        if len(given) != len(dims) or any(s < 1 for s in given):
            raise DataError(f"input {name!r}: shape {given} does not fit the model's {current}")
        if any(c is not None and c != s for c, s in zip(current, given, strict=True)):
            raise DataError(f"input {name!r}: shape {given} conflicts with the model's static {current}")
        for dim, size in zip(dims, given, strict=True):
            dim.dim_value = size
    del model.graph.value_info[:]
    before = [copy.deepcopy(v.type) for v in model.graph.output]
    for value in model.graph.output:  # let inference fill output shapes from the new input shapes
        value.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    for value, old in zip(model.graph.output, before, strict=True):
        if not value.type.tensor_type.HasField("shape"):  # inference could not tell: keep what the model said
            value.type.CopyFrom(old)
    save_onnx_atomic(model, out)


# --------------------------------------------------------------------------------------------- runnability


def _classify_ort_error(exc: Exception, profile: str | None, providers: Sequence[str]) -> BuildError:
    text = str(exc)
    where = ", ".join(providers)
    if m := _NO_KERNEL.search(text):
        return UnsupportedOpError(m.group(1), profile=profile, detail=f"no kernel in {where}")
    if m := _NOT_REGISTERED.search(text):
        domain = m.group(1) or "ai.onnx"
        return UnsupportedOpError(m.group(2), profile=profile, detail=f"domain {domain}, not registered in {where}")
    if m := _NO_SCHEMA.search(text):
        return UnsupportedOpError(m.group(1), profile=profile, detail="not an ONNX op of the model's opset")
    first = text.replace("\n", " ")[:300]
    return ModelLoadError(f"onnxruntime cannot load the model: {first}", profile=profile)


def _open_session(model: str | bytes, providers: Sequence[str], profile: str | None) -> Any:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    usable = [p for p in providers if p in available]
    if not usable:
        raise BuildError(
            f"none of the execution providers {list(providers)} is available in this onnxruntime build "
            f"(available: {sorted(available)})",
            profile=profile,
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, sess_options=options, providers=usable)
    except Exception as exc:  # onnxruntime's pybind errors share no useful base class below Exception
        raise _classify_ort_error(exc, profile, usable) from exc


def check_onnx_runnable(
    path: Path, *, providers: Sequence[str] = ("CPUExecutionProvider",), profile: str | None = None
) -> None:
    """Create an onnxruntime session for ``path`` on ``providers`` (those available in this build).

    Raises UnsupportedOpError naming the op when a node has no kernel / is not registered, ModelLoadError for an
    invalid model, BuildError when none of ``providers`` exists in this onnxruntime build.
    """
    if not Path(path).is_file():
        raise ModelLoadError(f"ONNX model {path} does not exist or is not a file", profile=profile)
    _open_session(str(path), providers, profile)
