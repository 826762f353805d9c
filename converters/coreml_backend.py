"""Core ML backend: TensorFlow (Keras 3 / SavedModel) -> Core ML mlprogram (.mlpackage), written canonically.

Guarantees:

- :func:`tf_to_coreml` writes an ``.mlpackage`` holding an mlprogram with static input shapes (batch 1),
  fp16 compute and fp32 I/O for float tensors, optionally with int8 linear (symmetric, per-channel) weights. The
  package is built in a temporary folder next to ``out`` and moved in place at the end; on any error nothing is
  left at ``out`` (an older package there is kept) and the temporary folder is removed. The written package is
  already canonical (see :func:`converters.coreml_package.coreml_files`), so two conversions of the same model
  give the same files.
- Input names are the source's (the Keras input names / the SavedModel ``serving_default`` argument names).
  Output names are the Keras ``output_names`` or the ``serving_default`` output keys: coremltools names them
  ``Identity``, ``Identity_1``... and they are renamed afterwards.

Does not: read or check an existing package (see :mod:`converters.coreml_package`), convert PyTorch or ONNX
directly (ONNX goes through onnx2tf to a SavedModel first), choose compute units, or run predictions.

Heavy imports (tensorflow, keras, coremltools) happen inside functions.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.coreml_package import coreml_files
from converters.model_types import ModelFormat, Precision, TensorSpec
from edgeops.errors import BuildError, DataError, ModelLoadError, OutputError, UnsupportedOpError

__all__ = ["tf_to_coreml"]

_PRECISIONS = (Precision.FP16, Precision.INT8_WEIGHTS)
_UNSUPPORTED_OP = re.compile(r"TF op '([^']+)' not implemented|Op-\((\S+)\) \S+ not implemented")


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
