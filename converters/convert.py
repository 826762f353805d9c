"""Pass ``convert``: the source model in the profile's format at fp32 (fp16 for Core ML).

TFLite and Core ML start from a TensorFlow graph: the .keras / SavedModel source itself, or for an ONNX source
the SavedModel onnx2tf makes (NCHW → NHWC; the permutation is kept in ``state.input_transpose`` and lands in
the manifest, so callers keep sending NCHW data). ONNX targets take the ONNX source as is (dynamic dims other
than batch fixed from ``--input-shape``/calibration) or tf2onnx's export of a TF source.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace

from converters.model_types import ModelFormat, ModelState, Precision
from converters.pass_context import PassContext
from converters.registry import register

__all__ = ["ConvertConfig"]


@dataclass(frozen=True)
class ConvertConfig:
    opset: int = field(default=17, metadata={"help": "ONNX opset for TensorFlow → ONNX"})
    allow_select_tf_ops: bool = field(default=False, metadata={"help": "let TFLite fall back to TF (Flex) ops"})
    minimum_deployment_target: str = field(default="iOS16", metadata={"help": "Core ML deployment target"})


def _tf_graph(ctx: PassContext, state: ModelState) -> ModelState:
    """Make sure ``state.tf_source`` holds a float TF graph (onnx2tf for ONNX sources)."""
    if state.fmt in (ModelFormat.KERAS, ModelFormat.SAVEDMODEL):
        return replace(state, tf_source=state.path, tf_source_fmt=state.fmt)
    from converters.onnx2tf_backend import onnx_to_saved_model

    result = onnx_to_saved_model(state.path, ctx.workdir / "onnx2tf", input_shapes=ctx.input_shapes)
    note = ""
    if result.input_transpose:
        note = "ONNX NCHW inputs converted to NHWC; the manifest's transpose keeps NCHW callers working"
    return replace(
        state,
        tf_source=result.saved_model,
        tf_source_fmt=ModelFormat.SAVEDMODEL,
        input_transpose=dict(result.input_transpose),
        notes=[*state.notes, note] if note else state.notes,
    )


def tf_input_shapes(ctx: PassContext, state: ModelState) -> dict[str, tuple[int, ...]]:
    """Static input shapes in the TF graph's layout (source shapes permuted by ``input_transpose``)."""
    return {
        name: tuple(shape[p] for p in state.input_transpose[name]) if name in state.input_transpose else shape
        for name, shape in ctx.input_shapes.items()
    }


def _to_onnx(ctx: PassContext, state: ModelState, cfg: ConvertConfig) -> ModelState:
    from converters import onnx_backend

    out = ctx.workdir / "model_fp32.onnx"
    if state.fmt is ModelFormat.ONNX:
        dynamic_inner = any(None in spec.shape[1:] for spec in ctx.source.inputs)
        if dynamic_inner:
            onnx_backend.fix_onnx_input_shapes(state.path, out, ctx.input_shapes)
        else:
            shutil.copyfile(state.path, out)
    else:
        onnx_backend.tf_to_onnx(state.path, state.fmt, out, opset=cfg.opset)
    onnx_backend.check_onnx_runnable(out, providers=("CPUExecutionProvider",), profile=ctx.profile.name)
    return replace(state, fmt=ModelFormat.ONNX, path=out, precision=Precision.FP32)


@register("convert", ConvertConfig, "convert the source model to the profile's format")
def run(ctx: PassContext, state: ModelState, cfg: ConvertConfig) -> ModelState:
    target = ModelFormat(ctx.profile.format)
    if target is ModelFormat.ONNX:
        return _to_onnx(ctx, state, cfg)
    state = _tf_graph(ctx, state)
    if state.tf_source is None or state.tf_source_fmt is None:
        raise RuntimeError("convert: no TensorFlow graph to convert from")
    shapes = tf_input_shapes(ctx, state)
    if target is ModelFormat.TFLITE:
        from converters.tflite_backend import tf_to_tflite

        out = ctx.workdir / "model_fp32.tflite"
        tf_to_tflite(
            state.tf_source,
            state.tf_source_fmt,
            out,
            precision=Precision.FP32,
            input_shapes=shapes,
            allow_select_tf_ops=cfg.allow_select_tf_ops,
            profile=ctx.profile.name,
        )
        return replace(state, fmt=ModelFormat.TFLITE, path=out, precision=Precision.FP32)
    from converters.coreml_backend import tf_to_coreml

    out = ctx.workdir / "model_fp16.mlpackage"
    tf_to_coreml(
        state.tf_source,
        state.tf_source_fmt,
        out,
        precision=Precision.FP16,
        input_shapes=shapes,
        minimum_deployment_target=cfg.minimum_deployment_target,
        profile=ctx.profile.name,
    )
    return replace(state, fmt=ModelFormat.COREML, path=out, precision=Precision.FP16)
