"""Run a built model with its real runtime: LiteRT for .tflite, onnxruntime for .onnx (light core).

The host's validation gate and the device agent use the same code, so what the build measured is what the
device runs. A :class:`ModelRunner` takes caller data (batch-first, caller layout, float) and applies the
manifest's preprocessing: the input ``transpose``, int8 quantisation of inputs, dequantisation of outputs,
and splitting a batch into single samples for batch-1 models.

Runtimes are imported inside functions: LiteRT as ``ai_edge_litert`` first, then ``tflite_runtime`` (old
devices); onnxruntime with the requested execution providers when available, else CPU (``providers_used``
says which ran). Core ML cannot run off macOS: :func:`open_model` raises :class:`RuntimeUnavailable`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeops.errors import EdgeopsError

__all__ = ["Backend", "ModelRunner", "RuntimeUnavailable", "TensorDetail", "open_model"]

ORT_BATCH = 64


class RuntimeUnavailable(EdgeopsError):
    """The model's runtime is not installed or cannot run on this platform."""


@dataclass(frozen=True)
class TensorDetail:
    name: str
    shape: tuple[int, ...]  # -1 for a dynamic dim
    dtype: str
    scale: float | None = None
    zero_point: int | None = None


class Backend(Protocol):
    """One loaded model: runs one batch of model-level tensors (model dtype, model layout)."""

    inputs: tuple[TensorDetail, ...]
    outputs: tuple[TensorDetail, ...]
    providers_used: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _litert_interpreter(model: bytes, threads: int) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            raise RuntimeUnavailable("no TFLite runtime: pip install ai-edge-litert") from None
    try:
        return Interpreter(model_content=model, num_threads=threads)
    except (ValueError, RuntimeError) as exc:
        raise RuntimeUnavailable(f"LiteRT cannot load the model: {exc}") from None


def _litert_detail(d: Mapping[str, Any], name: str) -> TensorDetail:
    scale, zp = d.get("quantization", (0.0, 0))
    quantized = np.dtype(d["dtype"]).kind in "iu" and scale != 0.0
    return TensorDetail(
        name=name,
        shape=tuple(int(x) for x in d.get("shape_signature", d["shape"])),
        dtype=np.dtype(d["dtype"]).name,
        scale=float(scale) if quantized else None,
        zero_point=int(zp) if quantized else None,
    )


class LiteRTBackend:
    """A .tflite model in LiteRT, driven through its (first) signature when it has one."""

    def __init__(self, model: bytes, *, threads: int) -> None:
        self._interp = _litert_interpreter(model, threads)
        self.providers_used: tuple[str, ...] = ("litert-cpu",)
        sigs = self._interp.get_signature_list()
        if sigs:
            self._runner = self._interp.get_signature_runner(next(iter(sigs)))
            ins, outs = self._runner.get_input_details(), self._runner.get_output_details()
            self.inputs = tuple(_litert_detail(d, n) for n, d in ins.items())
            self.outputs = tuple(_litert_detail(d, n) for n, d in outs.items())
        else:
            self._runner = None
            self._interp.allocate_tensors()
            self.inputs = tuple(_litert_detail(d, d["name"]) for d in self._interp.get_input_details())
            self.outputs = tuple(_litert_detail(d, d["name"]) for d in self._interp.get_output_details())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is not None:
            return {k: np.asarray(v) for k, v in self._runner(**feeds).items()}
        for i, d in enumerate(self._interp.get_input_details()):
            self._interp.set_tensor(d["index"], feeds[self.inputs[i].name])
        self._interp.invoke()
        return {
            o.name: self._interp.get_tensor(d["index"]) for o, d in zip(self.outputs, self._interp.get_output_details())
        }


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class OrtBackend:
    """An .onnx model in onnxruntime with the first available of the requested execution providers."""

    def __init__(self, model: bytes, *, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailable("onnxruntime is not installed: pip install onnxruntime") from None
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(model, sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeUnavailable(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
        self.providers_used = tuple(self._sess.get_providers())
        self.inputs = tuple(self._detail(i) for i in self._sess.get_inputs())
        self.outputs = tuple(self._detail(o) for o in self._sess.get_outputs())

    @staticmethod
    def _detail(arg: Any) -> TensorDetail:
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        return TensorDetail(name=arg.name, shape=shape, dtype=_ORT_TYPES.get(arg.type, arg.type))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._sess.run([o.name for o in self.outputs], dict(feeds))
        return {o.name: np.asarray(v) for o, v in zip(self.outputs, values)}


def open_model(
    model: bytes | Path, fmt: str, *, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> Backend:
    """Load ``model`` (bytes or a file) with the runtime for ``fmt`` ("tflite", "onnx").

    Raises RuntimeUnavailable when the runtime is missing, cannot load the model, or (Core ML) cannot run here.
    """
    data = model.read_bytes() if isinstance(model, Path) else model
    if fmt == "tflite":
        return LiteRTBackend(data, threads=threads)
    if fmt == "onnx":
        return OrtBackend(data, threads=threads, providers=providers)
    if fmt == "coreml":
        raise RuntimeUnavailable("Core ML models run only on Apple platforms (macOS/iOS); not executed here")
    raise RuntimeUnavailable(f"no runtime for model format {fmt!r}")


def _quantize(x: np.ndarray, d: TensorDetail) -> np.ndarray:
    if d.scale is None or d.zero_point is None:
        return x.astype(d.dtype, copy=False)
    info = np.iinfo(np.dtype(d.dtype))
    q = np.round(x.astype(np.float32) / d.scale) + d.zero_point
    return np.clip(q, info.min, info.max).astype(d.dtype)


def _dequantize(y: np.ndarray, d: TensorDetail) -> np.ndarray:
    if d.scale is None or d.zero_point is None:
        return y
    return (y.astype(np.float32) - d.zero_point) * np.float32(d.scale)


class ModelRunner:
    """Caller-level inference over a :class:`Backend`: batch-first float data in, float outputs out."""

    def __init__(self, backend: Backend, *, transpose: Mapping[str, Sequence[int]] | None = None) -> None:
        self.backend = backend
        self.transpose = {k: tuple(v) for k, v in (transpose or {}).items()}

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for d in self.backend.inputs:
            if d.name not in feeds:
                if len(self.backend.inputs) == 1 and len(feeds) == 1:
                    x = next(iter(feeds.values()))
                else:
                    raise KeyError(f"missing input {d.name!r}")
            else:
                x = feeds[d.name]
            if d.name in self.transpose:
                x = np.transpose(x, self.transpose[d.name])
            out[d.name] = _quantize(np.asarray(x), d)
        return out

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch (first dim N on every input); returns float outputs, batch-first, by output name."""
        prepared = self._prepare(feeds)
        n = next(iter(prepared.values())).shape[0]
        batch_one = any(d.shape and d.shape[0] == 1 for d in self.backend.inputs)
        step = 1 if batch_one else ORT_BATCH
        parts: dict[str, list[np.ndarray]] = {o.name: [] for o in self.backend.outputs}
        for start in range(0, n, step):
            result = self.backend.run({k: v[start : start + step] for k, v in prepared.items()})
            for o in self.backend.outputs:
                parts[o.name].append(_dequantize(result[o.name], o))
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
