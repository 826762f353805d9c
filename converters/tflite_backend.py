"""TensorFlow (Keras 3 ``.keras`` file or SavedModel) → TFLite flatbuffer, at one precision.

Guarantees:

- The ``.tflite`` has static shapes (batch 1 unless ``input_shapes`` says otherwise) and one signature,
  ``serving_default``, whose input and output names are the source's: Keras input names and
  ``model.output_names``; a SavedModel's ``serving_default`` argument and output keys. (The flatbuffer's tensor
  names differ, e.g. ``serving_default_image:0``; address tensors through the signature.)
- The same source and options give byte-identical files, in one process or in two.
- ``out`` is written atomically; when conversion fails nothing is left at ``out``.

How: the source is re-staged as a SavedModel whose ``serving_default`` has fixed ``TensorSpec`` inputs (Keras 3
through ``keras.export.ExportArchive``, a SavedModel by wrapping its signature in a ``tf.Module``), and that is
what ``TFLiteConverter.from_saved_model`` converts; ``from_keras_model`` would lose the output names and keep
the dynamic batch. This module does not run the model and does not check numerical agreement (the validate pass
does); models needing Select TF ops need a runtime built with Flex to run.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from converters.model_types import Feeds, ModelFormat, Precision, TensorSpec
from edgeops.atomic_file import write_bytes_atomic
from edgeops.errors import (
    BuildError,
    DataError,
    ModelLoadError,
    OutputError,
    UnsupportedOpError,
)

__all__ = ["MAX_CALIB_SAMPLES", "tf_to_tflite"]

MAX_CALIB_SAMPLES = 300  # samples fed to the int8 calibrator, taken from the start of the calibration data

_UNSUPPORTED_RE = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_NOT_QUANTIZABLE_RE = re.compile(r"[Qq]uantization not yet supported for op: '?(\w+)'?")
_STAGED = "staged"  # folder name of the static SavedModel inside the work dir


def tf_to_tflite(
    tf_source: Path,
    source_fmt: ModelFormat,
    out: Path,
    *,
    precision: Precision,
    calib: Feeds | None = None,
    per_channel: bool = True,
    int8_io: bool = False,
    allow_select_tf_ops: bool = False,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    profile: str | None = None,
) -> None:
    """Convert ``tf_source`` to a static-shape TFLite model at ``precision`` and write it to ``out``.

    ``precision``: FP32; FP16 (float16 weights, float compute fallback); INT8_DYNAMIC (int8 weights,
    dynamic-range activations); INT8 (full-integer post-training quantisation, builtin int8 kernels only,
    calibrated with up to :data:`MAX_CALIB_SAMPLES` samples of ``calib`` fed one at a time). ``int8_io`` makes
    the INT8 model's input and output tensors int8 (Edge TPU); otherwise they stay float32.
    ``per_channel=False`` quantises weights per tensor. ``input_shapes`` gives full static shapes (batch
    included) for inputs with dynamic dimensions; a dynamic batch dimension alone defaults to 1.

    Raises:
        ModelLoadError: the source is missing, corrupt, or has no usable ``serving_default`` signature.
        DataError: a dimension is dynamic and not in ``input_shapes``; ``input_shapes`` names an unknown input
            or contradicts the model; INT8 without ``calib``; calibration arrays missing or of the wrong
            per-sample shape.
        UnsupportedOpError: the model needs an op outside the TFLite builtins (or, for INT8, one without an
            int8 kernel) and ``allow_select_tf_ops`` is False.
        BuildError: any other converter failure (first line of the converter's message).
        OutputError: ``out`` cannot be written.
    """
    if int8_io and precision is not Precision.INT8:
        raise RuntimeError("int8_io=True needs precision=Precision.INT8")
    if precision not in (Precision.FP32, Precision.FP16, Precision.INT8_DYNAMIC, Precision.INT8):
        raise BuildError(f"TFLite has no precision {precision.value!r}", profile=profile)
    tf = _import_tf()
    try:
        if precision.needs_calibration and calib is None:
            raise DataError("int8 needs calibration data (--calib)", profile=profile)
        with tempfile.TemporaryDirectory(prefix="edgeops-tflite-") as work:
            staged = Path(work) / _STAGED
            specs = _stage(tf_source, source_fmt, staged, input_shapes, profile)
            samples = _calibration_samples(calib, specs, profile) if precision is Precision.INT8 else None
            converter = tf.lite.TFLiteConverter.from_saved_model(str(staged), signature_keys=["serving_default"])
            _configure(tf, converter, precision, samples, per_channel, int8_io, allow_select_tf_ops)
            data = _run_converter(converter, profile)
        if precision is Precision.INT8 and not allow_select_tf_ops:
            _require_integer_ops(data, profile)
        _write_atomic(out, data)
    except BaseException:
        _remove_stale(out)
        raise


def _import_tf() -> Any:
    """Import tensorflow with its C++ and Python logging turned down to errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import absl.logging
    import tensorflow as tf

    absl.logging.set_verbosity(absl.logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    return tf


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --- staging: any source → SavedModel with a static serving_default -------------------------------------


def _stage(
    src: Path, fmt: ModelFormat, staged: Path, input_shapes: Mapping[str, tuple[int, ...]] | None, profile: str | None
) -> list[TensorSpec]:
    """Write ``src`` as a SavedModel with a static ``serving_default``; return its (static) input specs."""
    if fmt is ModelFormat.KERAS:
        return _stage_keras(src, staged, input_shapes, profile)
    if fmt is ModelFormat.SAVEDMODEL:
        return _stage_savedmodel(src, staged, input_shapes, profile)
    raise ModelLoadError(
        f"TFLite conversion starts from a Keras or SavedModel source, not {fmt.value}", profile=profile
    )


def _stage_keras(
    src: Path, staged: Path, input_shapes: Mapping[str, tuple[int, ...]] | None, profile: str | None
) -> list[TensorSpec]:
    import keras
    import tensorflow as tf

    if not zipfile.is_zipfile(src):
        what = "does not exist" if not src.exists() else "is not a Keras 3 .keras archive"
        raise ModelLoadError(f"cannot load Keras model {src}: it {what}", profile=profile)
    try:
        model = keras.models.load_model(src, compile=False)
    except Exception as exc:  # keras raises ValueError, OSError, zipfile errors, ... for a bad file
        raise ModelLoadError(f"cannot load Keras model {src}: {_one_line(exc)}", profile=profile) from exc
    source = [TensorSpec(t.name, tuple(t.shape), str(t.dtype)) for t in model.inputs]
    specs = _static_specs(source, input_shapes, profile)
    out_names = list(model.output_names)

    def serve(*xs: Any) -> dict[str, Any]:
        y = model(xs[0] if len(xs) == 1 else list(xs), training=False)
        if isinstance(y, Mapping):
            return dict(y)
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        return dict(zip(out_names, ys, strict=True))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in specs])
    archive.write_out(str(staged), verbose=False)
    return specs


def _stage_savedmodel(
    src: Path, staged: Path, input_shapes: Mapping[str, tuple[int, ...]] | None, profile: str | None
) -> list[TensorSpec]:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(src))
        sig = loaded.signatures["serving_default"]
    except KeyError as exc:
        raise ModelLoadError(f"SavedModel {src} has no 'serving_default' signature", profile=profile) from exc
    except Exception as exc:  # tf raises OSError, ValueError, DecodeError, ... for a bad directory
        raise ModelLoadError(f"cannot load SavedModel {src}: {_one_line(exc)}", profile=profile) from exc
    arg_specs: dict[str, Any] = sig.structured_input_signature[1]
    names = sorted(arg_specs)  # the signature's own (sorted) argument order
    source = [TensorSpec(n, tuple(arg_specs[n].shape.as_list()), arg_specs[n].dtype.name) for n in names]
    specs = _static_specs(source, input_shapes, profile)

    def serve(*xs: Any) -> Any:
        return sig(**dict(zip(names, xs, strict=True)))

    module = tf.Module()
    module.loaded = loaded
    fn = tf.function(serve, input_signature=[tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in specs])
    tf.saved_model.save(module, str(staged), signatures={"serving_default": fn.get_concrete_function()})
    return specs


def _static_specs(
    source: list[TensorSpec], input_shapes: Mapping[str, tuple[int, ...]] | None, profile: str | None
) -> list[TensorSpec]:
    """Fix every dimension of ``source``: ``input_shapes`` first, then batch 1; raise DataError otherwise."""
    given = dict(input_shapes or {})
    unknown = sorted(set(given) - {s.name for s in source})
    if unknown:
        raise DataError(
            f"input_shapes names unknown input(s) {unknown}; the model's inputs are {[s.name for s in source]}",
            profile=profile,
        )
    result = []
    for spec in source:
        shape = _static_shape(spec, given.get(spec.name), profile)
        result.append(TensorSpec(spec.name, shape, spec.dtype, spec.layout))
    return result


def _static_shape(spec: TensorSpec, given: tuple[int, ...] | None, profile: str | None) -> tuple[int, ...]:
    if given is not None:
        given = tuple(int(d) for d in given)
        fits = len(given) == len(spec.shape) and all(
            d > 0 and (s is None or s == d) for s, d in zip(spec.shape, given, strict=True)
        )
        if not fits:
            raise DataError(
                f"input {spec.name!r}: shape {given} does not fit the model's {_fmt(spec.shape)}", profile=profile
            )
        return given
    shape = tuple(1 if i == 0 and d is None else d for i, d in enumerate(spec.shape))
    if any(d is None for d in shape):
        raise DataError(
            f"input {spec.name!r} has dynamic dimensions {_fmt(spec.shape)}; give its full static "
            f"shape (e.g. --input-shape {spec.name}=1,...)",
            profile=profile,
        )
    return tuple(int(d) for d in shape if d is not None)


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


# --- calibration -------------------------------------------------------------------------------------------


def _calibration_samples(calib: Feeds | None, specs: list[TensorSpec], profile: str | None) -> dict[str, np.ndarray]:
    """Check ``calib`` against the static inputs; return at most MAX_CALIB_SAMPLES samples per input.

    A single-input model also accepts a single array under any key (the ``x`` of a calibration ``.npz``).
    """
    if not calib:
        raise DataError("int8 needs calibration data (--calib)", profile=profile)
    feeds = dict(calib)
    if len(specs) == 1 and len(feeds) == 1 and specs[0].name not in feeds:
        feeds = {specs[0].name: next(iter(feeds.values()))}
    chosen: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in feeds:
            raise DataError(
                f"calibration data has no array for input {spec.name!r} (it has {sorted(feeds)})", profile=profile
            )
        arr = np.asarray(feeds[spec.name])
        expected = tuple(spec.shape[1:])
        if arr.ndim < 1 or tuple(arr.shape[1:]) != expected or arr.shape[0] == 0:
            raise DataError(
                f"calibration data for input {spec.name!r}: expected samples of shape {expected}, "
                f"got array of shape {tuple(arr.shape)}",
                profile=profile,
            )
        chosen[spec.name] = arr[:MAX_CALIB_SAMPLES].astype(spec.dtype, copy=False)
    counts = {len(a) for a in chosen.values()}
    if len(counts) != 1:
        raise DataError(
            f"calibration arrays hold different numbers of samples: { {k: len(a) for k, a in chosen.items()} }",
            profile=profile,
        )
    return chosen


def _representative(samples: dict[str, np.ndarray]) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    count = len(next(iter(samples.values())))

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for i in range(count):
            yield {name: arr[i : i + 1] for name, arr in samples.items()}

    return gen


# --- conversion --------------------------------------------------------------------------------------------


def _configure(
    tf: Any,
    converter: Any,
    precision: Precision,
    samples: dict[str, np.ndarray] | None,
    per_channel: bool,
    int8_io: bool,
    allow_select_tf_ops: bool,
) -> None:
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS
    if precision is not Precision.FP32:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision is Precision.FP16:
        converter.target_spec.supported_types = [tf.float16]
    if precision is Precision.INT8:
        if samples is None:
            raise RuntimeError("INT8 conversion without checked calibration samples")
        converter.representative_dataset = _representative(samples)
        builtins = tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    if not per_channel:
        converter._experimental_disable_per_channel = True
    ops = [builtins, tf.lite.OpsSet.SELECT_TF_OPS] if allow_select_tf_ops else [builtins]
    converter.target_spec.supported_ops = ops


def _run_converter(converter: Any, profile: str | None) -> bytes:
    """Run ``converter``; translate its failures into the edgeops error tree."""
    from tensorflow.lite.python.convert_phase import ConverterError

    try:
        with _quiet_native_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the calibrator's tf.lite.Interpreter deprecation notice
            return bytes(converter.convert())
    except ConverterError as exc:
        text = str(exc)
        match = _UNSUPPORTED_RE.search(text)
        if match:
            raise UnsupportedOpError(
                match.group(1), profile=profile, detail="not a TFLite builtin; Select TF ops are not allowed"
            ) from exc
        raise BuildError(f"TFLite converter failed: {_converter_summary(text)}", profile=profile) from exc
    except RuntimeError as exc:  # the quantiser and calibrator raise RuntimeError
        match = _NOT_QUANTIZABLE_RE.search(str(exc))
        if match:
            raise UnsupportedOpError(match.group(1), profile=profile, detail="no int8 kernel") from exc
        raise BuildError(f"TFLite converter failed: {_one_line(exc)}", profile=profile) from exc


def _require_integer_ops(data: bytes, profile: str | None) -> None:
    """Raise UnsupportedOpError for the first op of a full-integer model that still computes in float.

    ``TFLITE_BUILTINS_INT8`` does not stop the converter from leaving an op without an int8 kernel in float
    (e.g. FLOOR, SIN); only QUANTIZE (float in) and DEQUANTIZE (float out) may touch a float tensor.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    floats = {schema.TensorType.FLOAT32, schema.TensorType.FLOAT16}
    for graph in model.subgraphs:
        for op in graph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
            name = custom or op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "UNKNOWN")
            used = [i for i in op.inputs if i >= 0] if name != "QUANTIZE" else []
            used += list(op.outputs) if name != "DEQUANTIZE" else []
            if any(graph.tensors[i].type in floats for i in used):
                raise UnsupportedOpError(name, profile=profile, detail="no int8 kernel, it would run in float")


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to a scratch file while the converter's C++ code prints progress lines.

    Converter failures arrive as exceptions with their own message, so nothing a user needs is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _converter_summary(text: str) -> str:
    """The first ``error:`` clause of an MLIR converter message, without its location noise."""
    for line in text.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].split(": ", 1)[-1].strip()[:300]
    return text.splitlines()[0][:300] if text else "unknown error"


# --- output ------------------------------------------------------------------------------------------------


def _write_atomic(out: Path, data: bytes) -> None:
    """Write ``data`` to ``out`` atomically (creating its folder). Raises OutputError."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    write_bytes_atomic(out, data)


def _remove_stale(out: Path) -> None:
    """After a failed conversion, leave nothing at ``out`` (not even an older file) that looks like a result."""
    try:
        if out.is_file() or out.is_symlink():
            out.unlink()
    except OSError:
        return  # the original error is what the caller needs to see; an undeletable file is reported by it
