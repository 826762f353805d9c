"""Post-training magnitude pruning of an ONNX model's weight initializers.

Guarantees: only float weight initializers that feed a Conv / Gemm / MatMul directly (the weight operand, never
a bias) and hold at least ``min_params`` values are touched; in each, exactly ``round(sparsity * size)`` values
are zero afterwards (more if it already had more zeros), the ones with the smallest magnitude, ties broken by
position so the output is deterministic; the output is written atomically.

It does not fine-tune (accuracy loss is the validate pass's to measure), does not remove parameters (the
zeros make the model compress better, not run faster), and does not follow weights through
DequantizeLinear / Identity / Transpose nodes (prune before quantising).

Heavy imports (onnx) happen inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.model_types import PruneResult
from converters.onnx_backend import load_onnx_model, save_onnx_atomic
from edgeops.errors import BuildError

if TYPE_CHECKING:
    import onnx

__all__ = ["PRUNABLE_OPS", "prune_onnx_magnitude"]

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")


def _weight_names(model: onnx.ModelProto) -> list[str]:
    """Initializer names used as the weight operand of a prunable op, in graph order, without repeats."""
    inits = {t.name for t in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in PRUNABLE_OPS or len(node.input) < 2:
            continue
        # Conv W / Gemm B are input 1; a MatMul's constant operand may be either side.
        candidates = node.input[:2] if node.op_type == "MatMul" else node.input[1:2]
        names.extend(n for n in candidates if n in inits and n not in names)
    return names


def _prune_array(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the ``round(sparsity * size)`` smallest-magnitude values (stable order for ties)."""
    flat = weights.reshape(-1).copy()
    k = round(sparsity * flat.size)
    if k > int(np.count_nonzero(flat == 0)):
        order = np.argsort(np.abs(flat.astype(np.float64)), kind="stable")
        flat[order[:k]] = 0
    return flat.reshape(weights.shape)


def prune_onnx_magnitude(src: Path, out: Path, *, sparsity: float, min_params: int = 1024) -> PruneResult:
    """Zero the smallest-|w| ``sparsity`` fraction of each prunable weight of ``src``; write it to ``out``.

    Returns the measured zero fraction over the pruned tensors and their (initializer) names.
    Raises BuildError (``sparsity`` outside (0, 1), or no weight of at least ``min_params`` values to prune),
    ModelLoadError (``src`` unreadable), OutputError.
    """
    from onnx import numpy_helper

    if not 0.0 < sparsity < 1.0:
        raise BuildError(f"pruning sparsity must be between 0 and 1 (exclusive), got {sparsity}")
    model = load_onnx_model(src)
    wanted = set(_weight_names(model))
    pruned: list[str] = []
    zeros = total = 0
    for tensor in model.graph.initializer:
        if tensor.name not in wanted:
            continue
        weights = numpy_helper.to_array(tensor)
        if weights.dtype.kind != "f" or weights.size < min_params:
            continue
        new = _prune_array(weights, sparsity)
        tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
        pruned.append(tensor.name)
        zeros += int(np.count_nonzero(new == 0))
        total += new.size
    if not pruned:
        raise BuildError(
            f"nothing to prune in {src}: no float Conv/Gemm/MatMul weight initializer has {min_params}+ values"
        )
    save_onnx_atomic(model, out)
    return PruneResult(sparsity=zeros / total, method="magnitude", layers=tuple(pruned))
