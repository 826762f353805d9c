"""ONNX → TensorFlow SavedModel (channel-last), the step before :mod:`converters.tflite_backend`.

Guarantees of :func:`onnx_to_saved_model`:

* every input shape is static (the caller gives the dynamic dims), so the SavedModel has one fixed
  ``serving_default`` signature that the TFLite converter takes as is;
* rank-3/4/5 inputs become channel-last (NCHW → NHWC); :attr:`OnnxToTf.input_transpose` says how to permute
  the caller's ONNX-layout array to feed the new model. Outputs keep the ONNX layout and shape: where onnx2tf
  hands back a channel-last output, a transpose back is put into the signature;
* signature keys are the ONNX input/output names (names outside TensorFlow's pattern
  ``[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*`` are sanitised; :attr:`OnnxToTf.input_names` maps them in order);
* the SavedModel agrees with onnxruntime on seeded random input (``max abs err <= _AGREE_ATOL`` relative to
  the output scale) before it is written; it is staged in ``out_dir`` and moved into place with
  ``os.replace``, so a failed conversion leaves no partial ``out_dir/saved_model`` behind;
* no network access: onnx2tf's sample-image download is replaced by seeded synthetic data, its output check
  (``-cotof``) and its automatic replacement-JSON search are off, onnxsim runs in-process;
* the same model and shapes give SavedModels that convert to byte-identical TFLite.

It does not quantise, prune or validate against user data; the caller does.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeops.errors import BuildError, DataError, ModelLoadError, OutputError, UnsupportedOpError

if TYPE_CHECKING:
    import onnx

__all__ = ["OnnxToTf", "onnx_to_saved_model"]

SAVED_MODEL_DIR = "saved_model"
_AGREE_ATOL = 1e-3  # max abs err allowed between onnxruntime and the SavedModel, scaled by max(1, |ref|max)
_CHANNEL_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}  # what onnx2tf does to inputs by rank
_TF_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")
_SEED = 20240601


@dataclass(frozen=True)
class OnnxToTf:
    """What :func:`onnx_to_saved_model` produced."""

    saved_model: Path  # TF SavedModel dir, channel-last, serving_default signature
    input_transpose: dict[str, tuple[int, ...]]  # signature input name -> permutation of the ONNX-layout array
    input_names: tuple[str, ...]  # signature input names, in ONNX graph input order
    output_names: tuple[str, ...]  # signature output keys, in ONNX graph output order


def onnx_to_saved_model(onnx_path: Path, out_dir: Path, *, input_shapes: Mapping[str, tuple[int, ...]]) -> OnnxToTf:
    """Convert an ONNX model to a channel-last TF SavedModel at ``out_dir/saved_model``.

    ``input_shapes`` gives static shapes in the ONNX model's own layout for inputs with dynamic dims (a shape
    for a static input must equal it). Raises ``ModelLoadError`` (unreadable/corrupt ONNX, or onnxruntime
    cannot run it), ``DataError`` (an input left dynamic, a shape that does not fit, an unknown input name),
    ``UnsupportedOpError`` (an op onnx2tf cannot convert, named), ``BuildError`` (the conversion ran but
    disagrees with onnxruntime) and ``OutputError`` (``out_dir`` not writable).
    """
    model = _load_onnx(Path(onnx_path))
    shapes = _static_shapes(model, input_shapes)
    fixed = _prepare_graph(model, shapes)
    _check_ops_known(fixed)
    feeds = _random_feeds(fixed, shapes)
    reference = _run_onnxruntime(fixed, feeds)
    keras_model = _run_onnx2tf(fixed)
    onnx_in = [i.name for i in fixed.graph.input]
    onnx_out = [o.name for o in fixed.graph.output]
    in_names = _signature_names(onnx_in)
    out_names = _signature_names(onnx_out)
    perms = [_input_perm(shapes[n], t.shape) for n, t in zip(onnx_in, keras_model.inputs, strict=True)]
    tf_inputs = [np.transpose(feeds[n], p) for n, p in zip(onnx_in, perms, strict=True)]
    out_perms = _match_outputs(keras_model, tf_inputs, reference, onnx_out)
    target = _save(keras_model, Path(out_dir), in_names, out_names, out_perms)
    transposes = {name: perm for name, perm in zip(in_names, perms, strict=True) if perm != tuple(range(len(perm)))}
    return OnnxToTf(target, transposes, tuple(in_names), tuple(out_names))


def _load_onnx(path: Path) -> onnx.ModelProto:
    """Read and check an ONNX file; raises ``ModelLoadError`` with the reason."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ModelLoadError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {type(exc).__name__}: {exc}") from exc
    if len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise ModelLoadError(f"{path} is not a valid ONNX model: empty graph")
    return model


def _graph_inputs(model: onnx.ModelProto) -> list[Any]:
    """The real inputs: graph inputs that are not initializers (old exporters list weights as inputs)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _static_shapes(model: onnx.ModelProto, given: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Resolve every input to a static shape; raises ``DataError`` naming the input that does not fit."""
    inputs = _graph_inputs(model)
    unknown = sorted(set(given) - {i.name for i in inputs})
    if unknown:
        names = [i.name for i in inputs]
        raise DataError(f"input_shapes names {unknown}, but the model's inputs are {names}")
    shapes: dict[str, tuple[int, ...]] = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        shape = tuple(int(d) for d in given.get(inp.name, ()))
        if inp.name not in given:
            if not inp.type.tensor_type.HasField("shape") or None in declared:
                raise DataError(
                    f"input {inp.name!r} has dynamic dims {_show(declared)}; give a static shape in input_shapes"
                )
            shape = tuple(int(d) for d in declared if d is not None)
        elif inp.type.tensor_type.HasField("shape") and (
            len(shape) != len(declared) or any(d is not None and d != s for d, s in zip(declared, shape, strict=True))
        ):
            raise DataError(f"input {inp.name!r}: shape {shape} does not fit the model's {_show(declared)}")
        if any(s <= 0 for s in shape):
            raise DataError(f"input {inp.name!r}: shape {shape} must have positive dims")
        shapes[inp.name] = shape
    return shapes


def _show(dims: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _prepare_graph(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Fix the input shapes, drop weights listed as inputs, simplify, and name every node.

    onnxsim folds the shape arithmetic that PyTorch exports around Flatten/Reshape, which onnx2tf needs to
    see as constants. Raises ``DataError`` when the fixed shapes do not propagate through the graph and
    ``ModelLoadError`` when onnxsim fails.
    """
    import onnx
    import onnxsim
    from sng4onnx import generate as name_nodes

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    weights = {t.name for t in fixed.graph.initializer}
    kept = [i for i in fixed.graph.input if i.name not in weights]
    del fixed.graph.input[:]
    fixed.graph.input.extend(kept)
    for inp in fixed.graph.input:
        dims = inp.type.tensor_type.shape
        dims.ClearField("dim")
        for size in shapes[inp.name]:
            dims.dim.add().dim_value = size
    del fixed.graph.value_info[:]
    try:
        fixed = onnx.shape_inference.infer_shapes(fixed, strict_mode=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise DataError(f"the ONNX graph does not accept the input shapes {dict(shapes)}: {exc}") from exc
    try:
        simplified, ok = onnxsim.simplify(fixed)
    except Exception as exc:  # onnxsim surfaces onnxruntime's and its own untyped errors
        raise ModelLoadError(f"onnxsim cannot simplify the model: {type(exc).__name__}: {exc}") from exc
    if ok:
        fixed = simplified
    named: onnx.ModelProto = name_nodes(onnx_graph=fixed, non_verbose=True)
    return named


def _check_ops_known(model: onnx.ModelProto) -> None:
    """Raise ``UnsupportedOpError`` for the first op onnx2tf has no converter for."""
    from importlib.util import find_spec

    for node in model.graph.node:
        if find_spec(f"onnx2tf.ops.{node.op_type}") is None:
            raise UnsupportedOpError(node.op_type, detail=f"onnx2tf has no converter (node {node.name!r})")


@contextmanager
def _offline_onnx2tf() -> Iterator[None]:
    """Make onnx2tf use seeded synthetic images instead of downloading its sample data, and undo its
    process-wide ``CUDA_VISIBLE_DEVICES=-1`` afterwards."""
    import onnx2tf.onnx2tf as o2t_main

    def synthetic_images() -> np.ndarray:
        return np.random.default_rng(_SEED).random((20, 128, 128, 3), dtype=np.float32)

    original = o2t_main.download_test_image_data
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    o2t_main.download_test_image_data = synthetic_images
    try:
        yield
    finally:
        o2t_main.download_test_image_data = original
        if cuda is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda


def _run_onnx2tf(model: onnx.ModelProto) -> Any:
    """Build the tf_keras model with onnx2tf, quietly, writing nothing; raise ``UnsupportedOpError`` naming
    the op whose conversion failed.

    tf_keras's layer-name counters are reset first: the names end up in the TFLite file, so without the reset
    a second conversion in the same process would give different bytes (``model_1/...``).
    """
    import onnx2tf
    import tf_keras

    tf_keras.backend.reset_uids()

    with _offline_onnx2tf(), tempfile.TemporaryDirectory(prefix="edgeops-onnx2tf-") as scratch:
        try:
            return onnx2tf.convert(
                onnx_graph=model,
                output_folder_path=scratch,
                output_signaturedefs=True,  # renames PyTorch's "/layer/Conv" scopes, which SavedModel rejects
                not_use_onnxsim=True,
                not_use_opname_auto_generate=True,
                disable_model_save=True,
                check_onnx_tf_outputs_elementwise_close=False,
                check_onnx_tf_outputs_elementwise_close_full=False,
                auto_generate_json=False,
                auto_generate_json_on_error=False,
                non_verbose=True,
                verbosity="error",
            )
        except SystemExit as exc:  # onnx2tf calls sys.exit(1) on some unsupported settings
            raise BuildError(f"onnx2tf gave up (exit {exc.code}); see the lines it logged above") from exc
        except Exception as exc:  # onnx2tf raises whatever the failing op's TF call raised
            op = _failing_op(model, exc)
            if op is None:
                raise BuildError(f"onnx2tf failed outside any op: {type(exc).__name__}: {exc}") from exc
            raise UnsupportedOpError(op, detail=f"onnx2tf failed: {type(exc).__name__}: {exc}") from exc


def _failing_op(model: onnx.ModelProto, exc: BaseException) -> str | None:
    """The op type of the node onnx2tf was converting when ``exc`` was raised (it tags ``onnx_op_name``)."""
    name = getattr(exc, "onnx_op_name", None)
    for node in model.graph.node:
        if name is not None and node.name.replace(":", "__") == name:
            return str(node.op_type)
    return None


def _input_perm(onnx_shape: tuple[int, ...], tf_shape: Any) -> tuple[int, ...]:
    """The permutation onnx2tf applied to an input (channel-last for rank 3-5 unless it kept the layout);
    ``BuildError`` if the TF input fits neither."""
    identity = tuple(range(len(onnx_shape)))
    got = tuple(tf_shape)
    channel_last = _CHANNEL_LAST.get(len(onnx_shape))
    if channel_last is not None and got == tuple(onnx_shape[i] for i in channel_last):
        return channel_last
    if got == onnx_shape:
        return identity
    raise BuildError(f"onnx2tf made an input of shape {got} from ONNX shape {onnx_shape}")


def _signature_names(names: Sequence[str]) -> list[str]:
    """TF-valid, unique names, keeping each ONNX name that is already valid."""
    out: list[str] = []
    for name in names:
        clean = name if _TF_NAME.match(name) else re.sub(r"[^A-Za-z0-9_.\\/>-]", "_", name)
        if not _TF_NAME.match(clean):
            clean = f"t{clean}"
        base, n = clean, 1
        while clean in out:
            clean, n = f"{base}_{n}", n + 1
        out.append(clean)
    return out


_NP_TYPES: dict[int, type[np.generic]] = {  # onnx.TensorProto element type -> numpy
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
}


def _random_feeds(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Seeded inputs in [0, 1) (floats) or {0, 1} (ints) for the agreement check."""
    rng = np.random.default_rng(_SEED)
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        dtype = _NP_TYPES.get(inp.type.tensor_type.elem_type)
        if dtype is None:
            raise BuildError(f"input {inp.name!r} has ONNX element type {inp.type.tensor_type.elem_type}, not fed")
        feeds[inp.name] = (
            rng.random(shapes[inp.name]).astype(dtype)
            if np.dtype(dtype).kind == "f"
            else (rng.integers(0, 2, shapes[inp.name]).astype(dtype))
        )
    return feeds


def _run_onnxruntime(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Reference outputs from onnxruntime (CPU): ``ModelLoadError`` when it cannot load the model,
    ``DataError`` when the model fails on inputs of the given shapes (e.g. a Reshape that no longer fits)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from exc
    try:
        return [np.asarray(o) for o in session.run(None, dict(feeds))]
    except Exception as exc:  # onnxruntime's RuntimeException/Fail carry the failing node in the text
        shapes = {name: value.shape for name, value in feeds.items()}
        raise DataError(f"the model fails on inputs of shape {shapes}: {exc}") from exc


def _match_outputs(
    keras_model: Any, tf_inputs: list[np.ndarray], reference: list[np.ndarray], names: Sequence[str]
) -> list[tuple[int, ...] | None]:
    """For each output, the transpose (or ``None``) that turns the TF output into the ONNX one.

    Tries the identity first, then the inverse channel-last permutation; raises ``BuildError`` naming the
    output when neither agrees with onnxruntime.
    """
    got = keras_model(tf_inputs if len(tf_inputs) > 1 else tf_inputs[0])
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    perms: list[tuple[int, ...] | None] = []
    for name, ref, tf_out in zip(names, reference, got, strict=True):
        arr = np.asarray(tf_out)
        tol = _AGREE_ATOL * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        err = _try_layouts(arr, ref, tol, perms)
        if err is not None:
            raise BuildError(f"onnx2tf's conversion of output {name!r} disagrees with onnxruntime: {err}")
    return perms


def _try_layouts(arr: np.ndarray, ref: np.ndarray, tol: float, perms: list[tuple[int, ...] | None]) -> str | None:
    """Append the layout fix for ``arr`` to ``perms``; return why none fits, or ``None`` on success."""
    candidates: list[tuple[int, ...] | None] = [None]
    channel_last = _CHANNEL_LAST.get(arr.ndim)
    if channel_last is not None:
        candidates.append(tuple(int(i) for i in np.argsort(channel_last)))
    best = float("inf")
    for perm in candidates:
        view = arr if perm is None else np.transpose(arr, perm)
        if view.shape != ref.shape:
            continue
        err = float(np.max(np.abs(view.astype(np.float64) - ref))) if ref.size else 0.0
        if err <= tol:
            perms.append(perm)
            return None
        best = min(best, err)
    if best == float("inf"):
        return f"shape {arr.shape} vs {ref.shape}"
    return f"max abs err {best:.3g} > {tol:.3g}"


def _save(
    keras_model: Any,
    out_dir: Path,
    in_names: Sequence[str],
    out_names: Sequence[str],
    out_perms: Sequence[tuple[int, ...] | None],
) -> Path:
    """Write the ``serving_default`` SavedModel atomically to ``out_dir/saved_model``; ``OutputError`` if
    ``out_dir`` cannot be written."""
    import tensorflow as tf

    specs = [tf.TensorSpec(t.shape, t.dtype, name) for t, name in zip(keras_model.inputs, in_names, strict=True)]
    serve = tf.function(_serving_fn(keras_model, out_names, out_perms), input_signature=specs)
    module = tf.Module()
    module.model = keras_model
    target = out_dir / SAVED_MODEL_DIR
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".saved_model-", dir=out_dir))
    except OSError as exc:
        raise OutputError(f"cannot write to {out_dir}: {exc}") from exc
    try:
        tf.saved_model.save(module, str(staging), signatures={"serving_default": serve.get_concrete_function()})
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as exc:
        raise OutputError(f"cannot write the SavedModel to {target}: {exc}") from exc
    except (ValueError, TypeError) as exc:  # tracing/saving the onnx2tf graph failed
        raise BuildError(f"cannot save the converted model as a SavedModel: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _serving_fn(
    keras_model: Any, out_names: Sequence[str], out_perms: Sequence[tuple[int, ...] | None]
) -> Callable[..., dict[str, Any]]:
    import tensorflow as tf

    def serve(*inputs: Any) -> dict[str, Any]:
        got = keras_model(list(inputs) if len(inputs) > 1 else inputs[0])
        outs = list(got) if isinstance(got, (list, tuple)) else [got]
        return {
            name: (out if perm is None else tf.transpose(out, perm))
            for name, out, perm in zip(out_names, outs, out_perms, strict=True)
        }

    return serve
