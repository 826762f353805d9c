"""Pruning backend for Keras 3 models (``.keras`` files), written on plain Keras 3 APIs.

TF-Model-Optimization does not support Keras 3, so this module does the two methods itself:

- ``magnitude``: unstructured. The smallest-|w| fraction of every prunable kernel (Conv1D/2D/3D,
  DepthwiseConv2D, Dense with at least :data:`MIN_PRUNABLE_WEIGHTS` weights, nested models included) is set to
  zero. With training data the zeros grow on a polynomial schedule during a short fine-tune and the masks are
  re-applied after every batch, so zeros stay zero; the saved kernels hold exactly the requested fraction.
- ``structured``: whole output channels (lowest L1 norm) of a Conv/Dense layer are removed where that is safe:
  its output reaches exactly one Conv/Dense consumer through channel-wise layers only (BatchNormalization,
  activations, pooling, padding, dropout, depthwise conv, Flatten), no layer on the way is shared, and none of
  it feeds a merge (Add, Concatenate, ...) or a model output. The model is rebuilt from its config with fewer
  filters and the kept weight slices; inputs and outputs keep their names and shapes.

Guarantees: the source file is never modified; the output is written atomically (temp file in the same
folder, fsync, ``os.replace``); two runs with the same arguments give the same weights (everything seeded).
Fine-tunes train a clone (Adam, BatchNormalization frozen) and copy the weights back, so no optimizer state is
saved. Side effect: ``keras.utils.set_random_seed`` reseeds the process's RNGs. Layers it does not prune are
logged (logger ``converters.prune_keras``, INFO) with the reason.
Not done: subclassed models (no graph to analyse) are left unpruned by ``structured``; layers inside nested
models are never removed structurally; fine-tuning needs a single-input model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.model_types import PruneResult
from edgeops.atomic_file import fsync_dir
from edgeops.errors import BuildError, DataError, ModelLoadError, OutputError

__all__ = ["FINE_TUNE_LEARNING_RATE", "METHODS", "MIN_PRUNABLE_WEIGHTS", "SEED", "prune_keras"]

METHODS = ("magnitude", "structured")
SEED = 7
MIN_PRUNABLE_WEIGHTS = 1024  # kernels smaller than this (weights) are left dense
FINE_TUNE_LEARNING_RATE = 5e-4  # Adam
_SCHEDULE_END = 0.7  # the gradual schedule reaches the target sparsity at 70 % of the fine-tune steps
_SCHEDULE_UPDATES = 10  # mask recomputations while the sparsity ramps up

_log = logging.getLogger(__name__)
Model = Any  # keras.Model; keras is imported lazily, so annotations stay loose
Layer = Any


@dataclass(frozen=True)
class _FineTune:
    x: np.ndarray
    targets: Any  # labels, or the model's own pre-pruning outputs (an array or a list of arrays)
    loss: str


def prune_keras(
    src: Path,
    out: Path,
    *,
    method: str,
    sparsity: float,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    epochs: int = 2,
    batch_size: int = 32,
) -> PruneResult:
    """Prune the Keras model at ``src`` and save it to ``out`` (a ``.keras`` path).

    ``sparsity`` is the fraction of each prunable kernel zeroed (magnitude) or of each prunable layer's
    filters removed (structured). With ``train=(x, y)`` the pruned model is fine-tuned for ``epochs``:
    against integer (or one-hot) labels when the model ends in a softmax, otherwise against its own
    pre-pruning outputs (``y`` is then not used). The result's ``sparsity`` is measured on the saved model.

    Raises BuildError (unknown method, sparsity outside (0, 1), model cannot be rebuilt), ModelLoadError
    (``src`` unreadable or not a Keras model), DataError (``train`` does not fit the model) and OutputError
    (``out`` cannot be written or does not end in ``.keras``).
    """
    if method not in METHODS:
        raise BuildError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    if not 0.0 < sparsity < 1.0:
        raise BuildError(f"pruning sparsity must be in (0, 1), got {sparsity}")
    if epochs < 0 or batch_size < 1:
        raise BuildError(f"epochs must be >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    if Path(out).suffix != ".keras":
        raise OutputError(f"pruned Keras model must be saved as a .keras file, got {out}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(SEED)
    model = _load_model(Path(src))
    tune = _fine_tune_data(model, train, batch_size) if train is not None and epochs > 0 else None
    if method == "magnitude":
        result = _prune_magnitude(model, sparsity, tune, epochs, batch_size)
    else:
        model, result = _prune_structured(model, sparsity)
        if tune is not None:
            _fine_tune(model, tune, epochs, batch_size, callbacks=lambda _work: [])
    _save_atomic(model, Path(out))
    return result


def _load_model(src: Path) -> Model:
    """Load a Keras model without its optimizer; raises ModelLoadError naming the file."""
    import keras

    if not src.is_file():
        raise ModelLoadError(f"cannot load Keras model {src}: no such file")
    try:
        model = keras.models.load_model(src, compile=False)
    except Exception as exc:  # Keras raises anything from ValueError to zipfile/h5py errors on bad files
        raise ModelLoadError(f"cannot load Keras model {src}: {exc}") from exc
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{src} holds a {type(model).__name__}, not a Keras model")
    return model


def _fine_tune_data(model: Model, train: tuple[np.ndarray, np.ndarray], batch_size: int) -> _FineTune:
    """Check ``train`` against the model and pick the loss; raises DataError naming both shapes."""
    if len(model.inputs) != 1:
        raise DataError(f"fine-tuning needs a single-input model; this one has {len(model.inputs)} inputs")
    x, y = np.asarray(train[0]), np.asarray(train[1])
    expected = tuple(model.inputs[0].shape)
    shown = "(N, " + ", ".join("?" if d is None else str(d) for d in expected[1:]) + ")"
    fits = x.ndim == len(expected) and all(e is None or e == g for e, g in zip(expected[1:], x.shape[1:], strict=True))
    if not fits or len(x) == 0:
        raise DataError(f"train x has shape {x.shape}; the model expects {shown}")
    x = x.astype(model.inputs[0].dtype, copy=False)
    loss = _label_loss(model)
    if loss is None:
        return _FineTune(x, model.predict(x, batch_size=batch_size, verbose=0), "mean_squared_error")
    classes = int(model.outputs[0].shape[-1])
    if y.shape == (len(x),) and np.issubdtype(y.dtype, np.integer) and (y.min() >= 0) and (y.max() < classes):
        return _FineTune(x, y, loss)
    if y.shape == (len(x), classes):
        return _FineTune(x, y.astype(np.float32), "categorical_crossentropy")
    raise DataError(
        f"train y has shape {y.shape} ({y.dtype}); the model expects ({len(x)},) integer labels in "
        f"[0, {classes}) or ({len(x)}, {classes}) one-hot labels"
    )


def _label_loss(model: Model) -> str | None:
    """``sparse_categorical_crossentropy`` when the single output is a softmax over >1 classes, else None."""
    if len(model.outputs) != 1 or (model.outputs[0].shape[-1] or 0) < 2:
        return None
    layer = model.outputs[0]._keras_history.operation
    activation = getattr(layer, "activation", None)
    softmax = type(layer).__name__ == "Softmax" or getattr(activation, "__name__", "") == "softmax"
    return "sparse_categorical_crossentropy" if softmax else None


def _walk(model: Model) -> Iterator[Layer]:
    """Every non-model layer, nested models included, in a fixed order (the same for a clone)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk(layer)
        else:
            yield layer


def _has_kernel(layer: Layer) -> bool:
    from keras import layers as kl

    kinds = (kl.Conv1D, kl.Conv2D, kl.Conv3D, kl.DepthwiseConv2D, kl.Dense)
    return isinstance(layer, kinds) and getattr(layer, "kernel", None) is not None


def _fine_tune(
    model: Model, tune: _FineTune, epochs: int, batch_size: int, callbacks: Callable[[Model], list[Any]]
) -> None:
    """Train a clone of ``model`` (BatchNorm frozen) and copy the weights back, so no optimizer is saved."""
    import keras

    try:
        work = keras.models.clone_model(model)
    except Exception as exc:  # clone_model raises ValueError/TypeError/NotImplementedError by model kind
        raise BuildError(f"cannot fine-tune {model.name}: the model cannot be cloned ({exc})") from exc
    work.set_weights(model.get_weights())
    for layer in _walk(work):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # keeps the pretrained statistics; small batches would spoil them
    work.compile(optimizer=keras.optimizers.Adam(FINE_TUNE_LEARNING_RATE), loss=tune.loss)
    work.fit(
        tune.x, tune.targets, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0, callbacks=callbacks(work)
    )
    model.set_weights(work.get_weights())


# --------------------------------------------------------------------------------------------- magnitude


def _magnitude_mask(kernel: np.ndarray, fraction: float) -> np.ndarray:
    """A 0/1 mask (kernel dtype) zeroing exactly round(fraction * size) smallest-|w| entries."""
    count = round(fraction * kernel.size)
    mask = np.ones(kernel.size, dtype=kernel.dtype)
    if count > 0:
        mask[np.argpartition(np.abs(kernel).ravel(), count - 1)[:count]] = 0
    return mask.reshape(kernel.shape)


def _apply_masks(layers: list[Layer], fraction: float) -> None:
    for layer in layers:
        kernel = layer.kernel.numpy()
        layer.kernel.assign(kernel * _magnitude_mask(kernel, fraction))


def _prunable_kernels(model: Model) -> list[Layer]:
    chosen = []
    for layer in _walk(model):
        if not _has_kernel(layer):
            continue
        if int(np.prod(layer.kernel.shape)) < MIN_PRUNABLE_WEIGHTS:
            _log.info("magnitude: skipped %s: fewer than %d weights", layer.name, MIN_PRUNABLE_WEIGHTS)
        else:
            chosen.append(layer)
    return chosen


def _gradual_masks(model: Model, positions: list[int], final: float, steps: int) -> Any:
    """A callback raising each kernel's sparsity as final * (1 - (1 - t/end)^3), masking after every batch.

    ``positions`` index the layers to mask in :func:`_walk` order (the same in a clone).
    """
    import keras

    walked = list(_walk(model))
    layers = [walked[i] for i in positions]
    end = max(1, int(steps * _SCHEDULE_END))
    every = max(1, end // _SCHEDULE_UPDATES)

    class GradualMasks(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.masks = [_magnitude_mask(layer.kernel.numpy(), 0.0) for layer in layers]  # all ones

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.step += 1
            if self.step <= end and (self.step % every == 0 or self.step == end):
                target = final * (1.0 - (1.0 - self.step / end) ** 3)
                self.masks = [_magnitude_mask(layer.kernel.numpy(), target) for layer in layers]
            for layer, mask in zip(layers, self.masks, strict=True):
                layer.kernel.assign(keras.ops.multiply(layer.kernel, mask))

    return GradualMasks()


def _prune_magnitude(
    model: Model, sparsity: float, tune: _FineTune | None, epochs: int, batch_size: int
) -> PruneResult:
    layers = _prunable_kernels(model)
    if tune is not None and layers:
        steps = epochs * -(-len(tune.x) // batch_size)
        positions = [i for i, layer in enumerate(_walk(model)) if any(layer is p for p in layers)]
        _fine_tune(
            model, tune, epochs, batch_size, callbacks=lambda work: [_gradual_masks(work, positions, sparsity, steps)]
        )
    _apply_masks(layers, sparsity)  # exact final fraction, whatever the schedule reached
    total = sum(int(np.prod(layer.kernel.shape)) for layer in layers)
    zeros = sum(int(np.count_nonzero(layer.kernel.numpy() == 0)) for layer in layers)
    return PruneResult(
        sparsity=zeros / total if total else 0.0,
        method="magnitude",
        layers=tuple(layer.name for layer in layers),
    )


# -------------------------------------------------------------------------------------------- structured

_ELEMENTWISE = ("Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "GaussianNoise", "GaussianDropout", "Identity")
_SPATIAL = ("SpatialDropout", "MaxPooling", "AveragePooling", "GlobalAveragePooling", "GlobalMaxPooling")
_CHANNELWISE = frozenset(
    [*_ELEMENTWISE, "AlphaDropout"]
    + [f"{kind}{rank}D" for kind in (*_SPATIAL, "ZeroPadding", "Cropping", "UpSampling") for rank in (1, 2, 3)]
)  # single-input layers that act on each channel alone and carry no per-channel weights


@dataclass
class _Plan:
    """Kept output channels of pruned producers, and kept input indices of the layers downstream of them."""

    keep_out: dict[str, np.ndarray] = field(default_factory=dict)
    keep_in: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class _Graph:
    consumers: dict[str, list[str]]  # by name: the operations that take this one's output
    calls: Counter[str]  # how often each operation is called inside the model (> 1: shared)
    outputs: frozenset[str]  # operations producing a model output
    ops: dict[str, Any]  # layers and bare ops (``x + y`` on symbolic tensors) by name


def _graph(model: Model) -> _Graph | None:
    """Who consumes whom inside ``model`` (Functional or Sequential); None for a subclassed model."""
    graph = getattr(model, "_functional", None) or model  # a Sequential keeps its graph in ``_functional``
    by_depth = getattr(graph, "_nodes_by_depth", None)
    if by_depth is None:
        return None
    consumers: dict[str, list[str]] = defaultdict(list)
    calls: Counter[str] = Counter()
    ops: dict[str, Any] = {}
    for nodes in by_depth.values():
        for node in nodes:
            calls[node.operation.name] += 1
            ops[node.operation.name] = node.operation
            for parent in node.parent_nodes:
                consumers[parent.operation.name].append(node.operation.name)
    outputs = frozenset(t._keras_history.operation.name for t in graph.outputs)
    return _Graph(dict(consumers), calls, outputs, ops)


def _channels_last(layer: Layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _per_channel_weights(layer: Layer) -> bool:
    """A BatchNormalization over the last axis, or a depthwise conv with one filter per channel."""
    from keras import layers as kl

    if isinstance(layer, kl.BatchNormalization):
        rank = len(layer.input.shape)
        return isinstance(layer.axis, int) and layer.axis % rank == rank - 1
    return isinstance(layer, kl.DepthwiseConv2D) and layer.depth_multiplier == 1 and _channels_last(layer)


def _is_producer(layer: Layer) -> bool:
    from keras import layers as kl

    conv = isinstance(layer, (kl.Conv1D, kl.Conv2D, kl.Conv3D)) and not isinstance(layer, kl.DepthwiseConv2D)
    return (conv and layer.groups == 1 and _channels_last(layer)) or isinstance(layer, kl.Dense)


def _trace(graph: _Graph, start: Layer, keep: np.ndarray) -> dict[str, np.ndarray] | str:
    """Kept input indices for every weighted layer from ``start`` to its single consumer, or why not safe."""
    from keras import layers as kl

    keep_in: dict[str, np.ndarray] = {}
    name, index = start.name, keep
    while True:
        if name in graph.outputs:
            return f"{name} is a model output"
        nxt = graph.consumers.get(name, [])
        if len(nxt) != 1:
            return f"{name} feeds {len(nxt)} layers"
        layer = graph.ops[nxt[0]]
        kind = type(layer).__name__
        if graph.calls[layer.name] != 1:
            return f"{layer.name} is shared"
        if _is_producer(layer):
            keep_in[layer.name] = index
            return keep_in
        if _per_channel_weights(layer):
            keep_in[layer.name] = index
        elif isinstance(layer, kl.Flatten) and _channels_last(layer):
            shape = layer.input.shape
            spatial, channels = int(np.prod(shape[1:-1])), int(shape[-1])
            index = (np.arange(spatial)[:, None] * channels + index[None, :]).ravel()
        elif kind not in _CHANNELWISE or not _channels_last(layer):
            return f"{name} feeds {kind} {layer.name}, whose channels cannot be cut"
        name = layer.name


def _plan(model: Model, sparsity: float) -> _Plan:
    plan = _Plan()
    graph = _graph(model)
    if graph is None:
        _log.info("structured: %s is not a Functional/Sequential model; nothing pruned", model.name)
        return plan
    for layer in model.layers:
        if not _is_producer(layer) or len(layer.get_weights()) != 1 + int(layer.use_bias):
            continue
        kernel = layer.kernel.numpy()
        if kernel.size < MIN_PRUNABLE_WEIGHTS:
            _log.info("structured: skipped %s: fewer than %d weights", layer.name, MIN_PRUNABLE_WEIGHTS)
            continue
        filters = kernel.shape[-1]
        norms = np.abs(kernel).reshape(-1, filters).sum(axis=0)
        keep = np.sort(np.argsort(-norms, kind="stable")[: max(1, filters - round(sparsity * filters))])
        downstream = _trace(graph, layer, keep)
        if isinstance(downstream, str):
            _log.info("structured: skipped %s: %s", layer.name, downstream)
            continue
        plan.keep_out[layer.name] = keep
        plan.keep_in.update(downstream)
    return plan


def _slice(layer: Layer, weights: list[np.ndarray], plan: _Plan) -> list[np.ndarray]:
    """``layer``'s weights cut to the plan: kernel input axis -2, output axis -1, per-channel vectors."""
    from keras import layers as kl

    keep_in, keep_out = plan.keep_in.get(layer.name), plan.keep_out.get(layer.name)
    if isinstance(layer, kl.BatchNormalization) and keep_in is not None:
        return [w[keep_in] for w in weights]
    if isinstance(layer, kl.DepthwiseConv2D) and keep_in is not None:  # kernel (h, w, channels, 1)
        return [np.take(weights[0], keep_in, axis=-2), *(w[keep_in] for w in weights[1:])]
    if keep_in is not None:
        weights = [np.take(weights[0], keep_in, axis=-2), *weights[1:]]
    if keep_out is not None:
        weights = [weights[0][..., keep_out], *(w[keep_out] for w in weights[1:])]
    return weights


def _prunable_params(model: Model) -> int:
    return sum(layer.count_params() for layer in _walk(model) if _has_kernel(layer))


def _prune_structured(model: Model, sparsity: float) -> tuple[Model, PruneResult]:
    """Rebuild ``model`` with the planned channels removed; returns the new model and what it removed."""
    plan = _plan(model, sparsity)
    if not plan.keep_out:
        return model, PruneResult(sparsity=0.0, method="structured", layers=())
    config = model.get_config()
    for entry in config["layers"]:
        entry.pop("build_config", None)  # stale input shapes; layers are rebuilt when called
        name = entry["config"]["name"]
        if name in plan.keep_out:
            key = "units" if "units" in entry["config"] else "filters"
            entry["config"][key] = len(plan.keep_out[name])
    try:
        smaller = type(model).from_config(config)
        for layer in model.layers:
            smaller.get_layer(layer.name).set_weights(_slice(layer, layer.get_weights(), plan))
    except (ValueError, TypeError, KeyError) as exc:
        raise BuildError(f"cannot rebuild {model.name} with fewer channels: {exc}") from exc
    before, after = _prunable_params(model), _prunable_params(smaller)
    result = PruneResult(
        sparsity=(before - after) / before if before else 0.0,
        method="structured",
        layers=tuple(plan.keep_out),
        removed_params=model.count_params() - smaller.count_params(),
    )
    return smaller, result


def _save_atomic(model: Model, out: Path) -> None:
    """Write ``model`` to ``out`` via a temp file in the same folder and ``os.replace``; raises OutputError."""
    tmp: str | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".keras", dir=out.parent)
        os.close(fd)
        model.save(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
        tmp = None
        fsync_dir(out.parent)
    except OSError as exc:
        raise OutputError(f"cannot write pruned model {out}: {exc}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
