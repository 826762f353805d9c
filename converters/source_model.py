"""The source model: detect its format, read its inputs/outputs, run it with its own framework.

The validation gate compares every artifact with the source model as Keras / TensorFlow / onnxruntime runs it.
Guarantees: :func:`load_source` raises :class:`ModelLoadError` (one line) for a missing, corrupt or unknown
file and never returns a half-read model; :func:`resolve_shapes` gives every input a static shape (batch 1)
or raises :class:`DataError` naming the input.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from converters.model_types import Feeds, ModelFormat, TensorSpec
from edgeops.datasets import sha256_path
from edgeops.errors import DataError, ModelLoadError

__all__ = ["SourceModel", "detect_format", "load_source", "resolve_shapes"]

BATCH = 64


def detect_format(path: Path) -> ModelFormat:
    """Tell the model format from the path. Raises ModelLoadError for anything else."""
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return ModelFormat.SAVEDMODEL
        raise ModelLoadError(f"{path} is a directory but not a TensorFlow SavedModel (no saved_model.pb)")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return ModelFormat.KERAS
    if suffix == ".onnx":
        return ModelFormat.ONNX
    raise ModelLoadError(
        f"unknown model format {suffix or path.name!r}: expected .keras, .onnx or a SavedModel directory"
    )


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@dataclass
class SourceModel:
    path: Path
    fmt: ModelFormat
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    handle: Any  # keras.Model / SavedModel signature / onnxruntime session

    @cached_property
    def sha256(self) -> str:
        return sha256_path(self.path)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Outputs of the source model on batch-first ``feeds``, by output name (in ``outputs`` order)."""
        n = next(iter(feeds.values())).shape[0]
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n, BATCH):
            parts.append(self._run_batch({k: v[start : start + BATCH] for k, v in feeds.items()}))
        return {o.name: np.concatenate([p[o.name] for p in parts]) for o in self.outputs}

    def _run_batch(self, feeds: Feeds) -> dict[str, np.ndarray]:
        if self.fmt is ModelFormat.ONNX:
            values = self.handle.run([o.name for o in self.outputs], dict(feeds))
            return {o.name: np.asarray(v) for o, v in zip(self.outputs, values)}
        if self.fmt is ModelFormat.KERAS:
            out = self.handle(
                [feeds[i.name] for i in self.inputs] if len(self.inputs) > 1 else feeds[self.inputs[0].name],
                training=False,
            )
            outs = out if isinstance(out, (list, tuple)) else [out]
            return {o.name: np.asarray(v) for o, v in zip(self.outputs, outs)}
        import tensorflow as tf

        result = self.handle(**{k: tf.constant(v) for k, v in feeds.items()})
        return {o.name: np.asarray(result[o.name]) for o in self.outputs}


def _dims(shape: Any) -> tuple[int | None, ...]:
    return tuple(None if d is None or (isinstance(d, int) and d < 0) else int(d) for d in shape)


def _load_keras(path: Path) -> SourceModel:
    _quiet_tf()
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except (ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"cannot load Keras model {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    inputs = tuple(TensorSpec(t.name, _dims(t.shape), str(t.dtype)) for t in model.inputs)
    names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(model.outputs))])
    outputs = tuple(TensorSpec(n, _dims(t.shape), str(t.dtype)) for n, t in zip(names, model.outputs))
    return SourceModel(path, ModelFormat.KERAS, inputs, outputs, model)


def _load_savedmodel(path: Path) -> SourceModel:
    _quiet_tf()
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        fn = loaded.signatures["serving_default"]
    except (OSError, ValueError, KeyError, tf.errors.OpError) as exc:
        raise ModelLoadError(f"cannot load SavedModel {path} (serving_default): {str(exc).splitlines()[0]}") from None
    _, kwargs = fn.structured_input_signature
    inputs = tuple(TensorSpec(k, _dims(v.shape), v.dtype.name) for k, v in sorted(kwargs.items()))
    outputs = tuple(TensorSpec(k, _dims(v.shape), v.dtype.name) for k, v in sorted(fn.structured_outputs.items()))
    fn._edgeops_keepalive = loaded  # the signature needs its SavedModel object alive
    return SourceModel(path, ModelFormat.SAVEDMODEL, inputs, outputs, fn)


_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(double)": "float64",
}


def _load_onnx(path: Path) -> SourceModel:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises untyped errors for corrupt models
        raise ModelLoadError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0][:200]}") from None

    def spec(a: Any) -> TensorSpec:
        layout = "NCHW" if len(a.shape) == 4 and a.shape[1] in (1, 3) else None
        return TensorSpec(
            a.name, tuple(d if isinstance(d, int) else None for d in a.shape), _ORT_DTYPES.get(a.type, a.type), layout
        )

    return SourceModel(
        path, ModelFormat.ONNX, tuple(map(spec, sess.get_inputs())), tuple(map(spec, sess.get_outputs())), sess
    )


def load_source(path: Path) -> SourceModel:
    """Load the model at ``path`` with its own framework. Raises ModelLoadError."""
    fmt = detect_format(path)
    loader = {ModelFormat.KERAS: _load_keras, ModelFormat.SAVEDMODEL: _load_savedmodel, ModelFormat.ONNX: _load_onnx}
    return loader[fmt](path)


def resolve_shapes(
    inputs: tuple[TensorSpec, ...], given: Mapping[str, tuple[int, ...]], calib: Feeds | None
) -> dict[str, tuple[int, ...]]:
    """Static shapes (batch 1) for every input: ``given`` first, else the calibration data's sample shape.

    Raises DataError for an unknown input name, a rank or fixed-dim mismatch, or a dim that stays dynamic.
    """
    unknown = sorted(set(given) - {i.name for i in inputs})
    if unknown:
        raise DataError(f"--input-shape names unknown input(s) {unknown} (inputs: {[i.name for i in inputs]})")
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in inputs:
        shape = given.get(spec.name)
        if shape is None and calib is not None and spec.name in calib:
            shape = (1, *calib[spec.name].shape[1:])
        if shape is None:
            shape = tuple(1 if i == 0 and d is None else d for i, d in enumerate(spec.shape))  # type: ignore[misc]
        if len(shape) != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape[1:], shape[1:])):
            raise DataError(f"input {spec.name!r}: shape {shape} does not fit the model's {spec.shape}")
        if any(d is None for d in shape):
            raise DataError(f"input {spec.name!r} has dynamic dims {spec.shape}: give --input-shape {spec.name}=...")
        shapes[spec.name] = (1, *shape[1:])
    return shapes
