"""Pass ``quantize``: bring the converted model to the profile's precision.

TFLite: re-runs the TFLite converter from the float TF graph with the quantisation recipe (fp16 weights,
dynamic-range int8, or full-integer int8 calibrated on ``--calib``, per-channel by default, int8 I/O for the
Edge TPU). ONNX: fp16 with fp32 I/O, dynamic int8, or static int8 QDQ with a choice of calibration method.
Core ML: int8 linear weight quantisation (compute stays fp16). fp32 (fp16 for Core ML) is a no-op.
Raises DataError when the precision needs calibration data and none was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from converters.convert import tf_input_shapes
from converters.model_types import ModelFormat, ModelState, Precision
from converters.pass_context import PassContext
from converters.registry import make_config, register
from edgeops.errors import DataError

__all__ = ["QuantizeConfig"]


@dataclass(frozen=True)
class QuantizeConfig:
    per_channel: bool = field(default=True, metadata={"help": "per-channel weight scales (int8)"})
    int8_io: bool = field(default=False, metadata={"help": "TFLite full-integer: int8 input/output tensors"})
    calibration_method: str = field(default="minmax", metadata={"help": "ONNX static: minmax, entropy, percentile"})
    max_calib_samples: int = field(default=300, metadata={"help": "calibration samples used at most"})


def _calib(ctx: PassContext, cfg: QuantizeConfig, state: ModelState, *, tf_layout: bool) -> dict[str, np.ndarray]:
    if ctx.calib is None:
        raise DataError(
            f"profile {ctx.profile.name}: {ctx.profile.precision} needs calibration data (--calib)",
            profile=ctx.profile.name,
        )
    feeds = ctx.calib.head(cfg.max_calib_samples).feeds
    if tf_layout:
        feeds = {
            k: np.transpose(v, state.input_transpose[k]) if k in state.input_transpose else v for k, v in feeds.items()
        }
    return dict(feeds)


def _tflite(ctx: PassContext, state: ModelState, cfg: QuantizeConfig, precision: Precision) -> ModelState:
    from converters.tflite_backend import tf_to_tflite

    if state.tf_source is None or state.tf_source_fmt is None:
        raise RuntimeError("quantize: convert did not leave a TensorFlow graph")
    calib = _calib(ctx, cfg, state, tf_layout=True) if precision.needs_calibration else None
    out = ctx.workdir / f"model_{precision}.tflite"
    tf_to_tflite(
        state.tf_source,
        state.tf_source_fmt,
        out,
        precision=precision,
        calib=calib,
        per_channel=cfg.per_channel,
        int8_io=cfg.int8_io,
        input_shapes=tf_input_shapes(ctx, state),
        profile=ctx.profile.name,
    )
    return replace(state, path=out, precision=precision)


def _onnx(ctx: PassContext, state: ModelState, cfg: QuantizeConfig, precision: Precision) -> ModelState:
    from converters import onnx_backend, onnx_quantize

    out = ctx.workdir / f"model_{precision}.onnx"
    if precision is Precision.FP16:
        onnx_quantize.onnx_to_fp16(state.path, out)
    elif precision is Precision.INT8_DYNAMIC:
        onnx_quantize.onnx_quantize_dynamic(state.path, out, per_channel=cfg.per_channel)
    else:
        onnx_quantize.onnx_quantize_static(
            state.path,
            out,
            _calib(ctx, cfg, state, tf_layout=False),
            method=cfg.calibration_method,
            per_channel=cfg.per_channel,
        )
    onnx_backend.check_onnx_runnable(out, providers=("CPUExecutionProvider",), profile=ctx.profile.name)
    return replace(state, path=out, precision=precision)


def _coreml(ctx: PassContext, state: ModelState, precision: Precision) -> ModelState:
    from converters.coreml_backend import tf_to_coreml

    if state.tf_source is None or state.tf_source_fmt is None:
        raise RuntimeError("quantize: convert did not leave a TensorFlow graph")
    target = make_config("convert", ctx.profile.pass_options.get("convert", {})).minimum_deployment_target
    out = ctx.workdir / f"model_{precision}.mlpackage"
    tf_to_coreml(
        state.tf_source,
        state.tf_source_fmt,
        out,
        precision=precision,
        input_shapes=tf_input_shapes(ctx, state),
        minimum_deployment_target=target,
        profile=ctx.profile.name,
    )
    return replace(state, path=out, precision=precision)


@register("quantize", QuantizeConfig, "quantize to the profile's precision", needs="calib")
def run(ctx: PassContext, state: ModelState, cfg: QuantizeConfig) -> ModelState:
    precision = Precision(ctx.profile.precision)
    if precision is state.precision:
        return state
    if state.fmt is ModelFormat.TFLITE:
        return _tflite(ctx, state, cfg, precision)
    if state.fmt is ModelFormat.ONNX:
        return _onnx(ctx, state, cfg, precision)
    return _coreml(ctx, state, precision)
