"""Value types shared by the passes and the format backends.

Pure data: no heavy import, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

__all__ = ["Feeds", "ModelFormat", "ModelState", "Precision", "PruneResult", "TensorSpec"]

Feeds = Mapping[str, np.ndarray]
"""Model inputs by input name; every array is batch-first (N samples)."""


class _StrEnum(str, Enum):
    """``enum.StrEnum`` for Python 3.10: str() and format() give the value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ModelFormat(_StrEnum):
    KERAS = "keras"  # a .keras file (Keras 3)
    SAVEDMODEL = "savedmodel"  # a TensorFlow SavedModel directory
    ONNX = "onnx"
    TFLITE = "tflite"
    COREML = "coreml"  # an .mlpackage directory (mlprogram)


class Precision(_StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"  # fp16 weights (TFLite), fp16 graph with fp32 I/O (ONNX), fp16 compute (Core ML)
    INT8_DYNAMIC = "int8-dynamic"  # int8 weights, activations quantised at run time
    INT8 = "int8"  # full-integer / static QDQ: int8 weights and activations, needs calibration data
    INT8_WEIGHTS = "int8-weights"  # int8 weights only, compute in fp16 (Core ML)

    @property
    def needs_calibration(self) -> bool:
        return self is Precision.INT8


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``None`` in ``shape`` is a dynamic dimension."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str  # numpy dtype name, e.g. "float32"
    layout: str | None = None  # "NCHW" / "NHWC" for 4-D image tensors when known

    @property
    def is_static(self) -> bool:
        return all(d is not None for d in self.shape)


@dataclass
class ModelState:
    """What flows from pass to pass while one profile is built.

    ``path`` is the current model in ``fmt``. ``tf_source`` is the float TensorFlow model (a .keras file or a
    SavedModel directory) that the TFLite and Core ML converters start from; for an ONNX source it is the
    onnx2tf output. ``input_transpose`` maps an input name to the permutation the artifact's caller data must
    go through (NCHW data into an NHWC model), recorded in the manifest as preprocessing.
    """

    fmt: ModelFormat
    path: Path
    precision: Precision = Precision.FP32
    tf_source: Path | None = None
    tf_source_fmt: ModelFormat | None = None
    input_transpose: dict[str, tuple[int, ...]] = field(default_factory=dict)
    sparsity: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PruneResult:
    """What a pruning backend did: the fraction of prunable weights now zero (or removed), and where."""

    sparsity: float  # 0..1 over the weights the method considers prunable
    method: str  # "magnitude" / "structured"
    layers: tuple[str, ...]  # names of the layers / initializers that were pruned
    removed_params: int = 0  # parameters removed outright (structured pruning), 0 for masking
