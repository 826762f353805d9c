"""ONNX precision changes: fp16 conversion and int8 (dynamic or static QDQ) quantisation via onnxruntime.

Guarantees:

- every function writes its result atomically (through :func:`converters.onnx_backend.save_onnx_atomic`); on
  error nothing new is left at ``out``;
- every result is checked to open in CPU onnxruntime before it is written; an fp16 op without a CPU kernel is
  kept in fp32 (logged and recorded in the model metadata as ``edgeops.fp16_blocked_ops``);
- the same input gives byte-identical output: onnxruntime's quantiser temp and calibration files stay in a
  private temporary folder and never reach the output, and quantiser chatter goes to stderr, not stdout;
- failures are :mod:`edgeops.errors` types with a one-line message.

It does not validate accuracy (the validate pass does), does not convert or reshape models (see
:mod:`converters.onnx_backend`), and does not handle models over 2 GB.

Heavy imports (onnx, onnxruntime) happen inside functions.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.model_types import Feeds
from converters.onnx_backend import _open_session, _real_inputs, _spec, load_onnx_model, save_onnx_atomic
from edgeops.errors import BuildError, DataError, UnsupportedOpError

if TYPE_CHECKING:
    import onnx

__all__ = ["onnx_quantize_dynamic", "onnx_quantize_static", "onnx_to_fp16"]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
MAX_CALIB_BATCH = 64  # samples per calibration run (the largest divisor of N up to this)
_FP16_MAX_RETRIES = 16  # ops blocked one by one before giving up


# --------------------------------------------------------------------------------------------- fp16


def onnx_to_fp16(src: Path, out: Path) -> None:
    """Write an fp16 version of ``src`` (fp16 weights and compute, fp32 inputs/outputs) that CPU onnxruntime runs.

    Uses ``onnxruntime.transformers.float16``. If CPU onnxruntime has no fp16 kernel for an op, that op type is
    added to the block list (kept in fp32 behind Casts), logged, and recorded in the model's metadata as
    ``edgeops.fp16_blocked_ops``. Raises ModelLoadError, UnsupportedOpError, BuildError, OutputError.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = load_onnx_model(src)
    _open_session(model.SerializeToString(), ("CPUExecutionProvider",), None)  # fp32 must run first
    blocked: list[str] = []
    for _ in range(_FP16_MAX_RETRIES):
        half = convert_float_to_float16(
            copy.deepcopy(model), keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *blocked]
        )
        try:
            _open_session(half.SerializeToString(), ("CPUExecutionProvider",), None)
            break
        except UnsupportedOpError as exc:
            if exc.op in blocked:
                raise
            log.warning("fp16: CPU onnxruntime has no fp16 kernel for %s; keeping it in fp32", exc.op)
            blocked.append(exc.op)
    else:
        raise BuildError(f"fp16 conversion of {src}: still not runnable after blocking {blocked}")
    OnnxModel(half).topological_sort()  # the converter appends the input Casts last; ONNX wants graph order
    if blocked:
        entry = half.metadata_props.add()
        entry.key, entry.value = "edgeops.fp16_blocked_ops", ",".join(sorted(blocked))
    save_onnx_atomic(half, out)


# --------------------------------------------------------------------------------------------- int8


def onnx_quantize_dynamic(src: Path, out: Path, *, per_channel: bool = False) -> None:
    """Write a dynamically quantised ``src``: int8 (QInt8) weights, activations quantised at run time.

    The result is checked to run on CPU onnxruntime. Raises ModelLoadError, UnsupportedOpError, BuildError,
    OutputError.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    load_onnx_model(src)
    with tempfile.TemporaryDirectory(prefix="edgeops-qdyn-") as tmp:
        qpath = Path(tmp) / "q.onnx"
        try:
            with contextlib.redirect_stdout(sys.stderr):
                quantize_dynamic(str(src), str(qpath), per_channel=per_channel, weight_type=QuantType.QInt8)
        except Exception as exc:  # the quantizer raises many types; all mean "could not quantise"
            raise BuildError(f"dynamic int8 quantisation of {src} failed: {str(exc).splitlines()[0][:200]}") from exc
        model = onnx.load(str(qpath))
    _open_session(model.SerializeToString(), ("CPUExecutionProvider",), None)
    save_onnx_atomic(model, out)


class _CalibReader:
    """onnxruntime CalibrationDataReader (duck-typed): equal-sized batches, so histogram calibrators work."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int) -> None:
        self._feeds, self._batch, self._pos = feeds, batch, 0
        self._n = len(next(iter(feeds.values())))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._n:
            return None
        start, self._pos = self._pos, self._pos + self._batch
        return {k: v[start : self._pos] for k, v in self._feeds.items()}

    def rewind(self) -> None:
        self._pos = 0

    def __len__(self) -> int:
        return self._n // self._batch


def _calib_feeds(model: onnx.ModelProto, calib: Feeds) -> tuple[dict[str, np.ndarray], int]:
    """Check ``calib`` against the model inputs; return the cast arrays and the calibration batch size."""
    specs = {s.name: s for s in (_spec(v) for v in _real_inputs(model.graph))}
    if sorted(calib) != sorted(specs):
        raise DataError(f"calibration data has arrays {sorted(calib)}; the model's inputs are {sorted(specs)}")
    feeds: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        arr = np.asarray(calib[name])
        expected = "(" + ", ".join("N" if d is None else str(d) for d in spec.shape) + ")"
        if arr.ndim != len(spec.shape) or any(
            d is not None and d != a for d, a in zip(spec.shape[1:], arr.shape[1:], strict=True)
        ):
            raise DataError(f"calibration data for input {name!r}: expected shape {expected}, given {arr.shape}")
        if not np.can_cast(arr.dtype, np.dtype(spec.dtype), casting="same_kind") or len(arr) == 0:
            raise DataError(
                f"calibration data for input {name!r}: {len(arr)} samples of {arr.dtype}, expected {spec.dtype}"
            )
        feeds[name] = np.ascontiguousarray(arr, dtype=np.dtype(spec.dtype))
    counts = {len(a) for a in feeds.values()}
    if len(counts) != 1:
        raise DataError(f"calibration arrays have different sample counts: {sorted(counts)}")
    n = counts.pop()
    static = {s.shape[0] for s in specs.values() if s.shape and s.shape[0] is not None}
    if static:
        batch = static.pop()
        if n % batch:
            raise DataError(f"the model's batch size is {batch}; {n} calibration samples is not a multiple")
        return feeds, batch
    return feeds, max(b for b in range(1, min(n, MAX_CALIB_BATCH) + 1) if n % b == 0)


def _pre_process(src: Path, tmp: Path) -> Path:
    """onnxruntime's quant_pre_process (shape inference + fusions); falls back to ``src`` if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    try:
        quant_pre_process(str(src), str(pre))
    except Exception as exc:  # symbolic shape inference fails on some graphs; quantising without it still works
        log.warning("quant_pre_process failed (%s); quantising the model as given", str(exc).splitlines()[0][:200])
        return Path(src)
    return pre


def onnx_quantize_static(
    src: Path, out: Path, calib: Feeds, *, method: str = "minmax", per_channel: bool = True
) -> None:
    """Write a static QDQ int8 version of ``src``: QInt8 weights (per channel by default) and QInt8 activations.

    ``calib``: arrays keyed by ONNX input name, batch-first. Raises BuildError (unknown ``method``), DataError
    (no calibration data, wrong names/shapes/dtypes), ModelLoadError, UnsupportedOpError, OutputError.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise BuildError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if not calib:
        raise DataError("int8 needs calibration data (--calib)")
    feeds, batch = _calib_feeds(load_onnx_model(src), calib)
    with tempfile.TemporaryDirectory(prefix="edgeops-qstatic-") as tmpdir:
        tmp = Path(tmpdir)
        qpath = tmp / "q.onnx"
        try:
            with contextlib.redirect_stdout(sys.stderr):
                quantize_static(
                    str(_pre_process(Path(src), tmp)),
                    str(qpath),
                    _CalibReader(feeds, batch),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=per_channel,
                    calibrate_method=methods[method],
                )
        except Exception as exc:  # the quantizer raises many types; all mean "could not quantise"
            raise BuildError(f"static int8 quantisation of {src} failed: {str(exc).splitlines()[0][:200]}") from exc
        model = onnx.load(str(qpath))
    _open_session(model.SerializeToString(), ("CPUExecutionProvider",), None)
    save_onnx_atomic(model, out)
