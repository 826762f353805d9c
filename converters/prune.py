"""Pass ``prune``: make the source model sparse before conversion, under the same accuracy gate.

Keras sources: magnitude (unstructured, to a target sparsity) or structured (whole filters/channels removed),
fine-tuned for a few epochs when ``--train`` data with labels is given. ONNX sources: post-training magnitude
pruning of Conv/Gemm/MatMul weights. A SavedModel cannot be pruned (no trainable graph here): BuildError.
The validate pass later compares the pruned artifact with the *unpruned* source, so the gate sees the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from converters.model_types import ModelFormat, ModelState
from converters.pass_context import PassContext
from converters.registry import register
from edgeops.errors import BuildError

__all__ = ["PruneConfig"]


@dataclass(frozen=True)
class PruneConfig:
    method: str = field(default="magnitude", metadata={"help": "magnitude (unstructured) or structured (filters)"})
    sparsity: float = field(default=0.5, metadata={"help": "target fraction of weights (or filters) removed"})
    epochs: int = field(default=2, metadata={"help": "fine-tune epochs when --train is given"})


@register("prune", PruneConfig, "prune weights (magnitude) or filters (structured)", needs="train")
def run(ctx: PassContext, state: ModelState, cfg: PruneConfig) -> ModelState:
    name = ctx.profile.name
    if cfg.method not in ("magnitude", "structured"):
        raise BuildError(f"profile {name}: unknown prune method {cfg.method!r} (magnitude, structured)", profile=name)
    if state.fmt is ModelFormat.KERAS:
        from converters.prune_keras import prune_keras

        train = None
        if ctx.train is not None and ctx.train.labels is not None:
            train = (next(iter(ctx.train.feeds.values())), ctx.train.labels)
        out = ctx.workdir / "pruned.keras"
        result = prune_keras(state.path, out, method=cfg.method, sparsity=cfg.sparsity, train=train, epochs=cfg.epochs)
        if train is None:
            state.notes.append("pruned one-shot (no --train data with labels for a fine-tune)")
    elif state.fmt is ModelFormat.ONNX:
        if cfg.method != "magnitude":
            raise BuildError(f"profile {name}: ONNX models support magnitude pruning only", profile=name)
        from converters.prune_onnx import prune_onnx_magnitude

        out = ctx.workdir / "pruned.onnx"
        result = prune_onnx_magnitude(state.path, out, sparsity=cfg.sparsity)
    else:
        raise BuildError(f"profile {name}: pruning needs a .keras or .onnx model, not a {state.fmt}", profile=name)
    ctx.outcome.sparsity = result.sparsity
    note = f"{result.method} pruning: sparsity {result.sparsity:.3f} over {len(result.layers)} layer(s)"
    return replace(state, path=out, sparsity=result.sparsity, notes=[*state.notes, note])
