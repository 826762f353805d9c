"""Offline models for the delta benchmark: a base model, a head-only and a full fine-tune, in three formats.

For each model (``digits``: the examples/digits CNN, 2.3 MB Keras / 0.75 MB TFLite; ``large``: a 13.4 M-parameter
conv net with VGG-style big dense layers, 53 MB fp32) this makes, from scikit-learn's bundled 8x8 digits and
nothing downloaded:

- ``base``: the trained model (digits: examples/digits/out/digits.keras as it is; large: trained here);
- ``head``: the base fine-tuned with only its last Dense layer trainable (every other weight stays bit-equal);
- ``full``: the base fine-tuned with every layer trainable at a small learning rate (every weight that gets a
  gradient moves a little: 82 % of digits' weights, 58 % of the large model's; the rest feed dead ReLUs);

both fine-tunes run on a seeded "new camera" copy of the training split (each image shifted by up to one pixel,
plus a little noise), as a real fine-tune adapts a model to new data. Each variant is written as TFLite fp32,
TFLite int8 (full-integer: int8 ops and int8 input/output, calibrated on calib.npz) and ONNX fp32 (tf2onnx,
opset 17; the names tf2onnx generates are renumbered by first use, see :func:`_canonical_onnx`).

Guarantees: seeded, with TensorFlow's op determinism on, so the same recipe on the same machine and versions gives
the same bytes (checked: two builds in separate processes give identical sha256 for all 18 files). A build
writes a folder per model under the cache with a ``manifest.json`` (recipe key, sizes, sha256, accuracies,
fraction of weights each fine-tune moved); :func:`ensure_models` reuses it while the key (the recipe, the code
that makes the files, the framework versions and, for digits, the source model's hash) still matches and rebuilds
it otherwise, in a child process so the benchmark's own process never imports TensorFlow. Does not guarantee the
same bytes across TensorFlow versions or CPUs (oneDNN kernels differ).

Run alone: ``.venv/bin/python benchmarks/delta_models.py [--models digits,large] [--cache DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMATS",
    "MODELS",
    "VARIANTS",
    "ModelSet",
    "build_models",
    "ensure_models",
    "model_key",
]

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DIGITS_DIR = REPO / "examples" / "digits" / "out"
DEFAULT_CACHE = REPO / "benchmarks" / ".cache" / "delta"
MODELS = ("digits", "large")
VARIANTS = ("base", "head", "full")
FORMATS = ("tflite-fp32", "tflite-int8", "onnx-fp32")
SUFFIX = {"tflite-fp32": "fp32.tflite", "tflite-int8": "int8.tflite", "onnx-fp32": "fp32.onnx"}
SEED = 7
MANIFEST = "manifest.json"
FRAMEWORKS = ("tensorflow", "keras", "tf2onnx", "onnx", "numpy")


@dataclass(frozen=True)
class Recipe:
    """How one model's variants are trained. Epoch counts are whole passes over the 1,437 training images."""

    name: str
    description: str
    base_epochs: int  # 0: the base is an existing model (digits)
    base_lr: float
    head_epochs: int
    head_lr: float
    full_epochs: int
    full_lr: float
    batch_size: int


RECIPES = {
    "digits": Recipe("digits", "examples/digits CNN: 3 conv (32/64/64) + dense 128 + dense 10, 8x8x1 input",
                     0, 0.0, 3, 1e-3, 3, 1e-4, 32),
    "large": Recipe("large", "conv 64/128/256 (8x8, same padding) + dense 16384->768->512->10, 8x8x1 input",
                    3, 1e-3, 3, 1e-3, 2, 5e-5, 64),
}


@dataclass(frozen=True)
class ModelSet:
    """One model's files: ``path(variant, fmt)``; sizes, hashes and accuracies as the build recorded them."""

    name: str
    description: str
    folder: Path
    params: int
    files: dict[str, dict[str, Any]]  # "variant/fmt" -> {"file", "size", "sha256"}
    accuracy: dict[str, float]  # variant -> Keras eval accuracy (360 held-out images)
    changed_fraction: dict[str, float]  # variant -> fraction of weights differing from the base
    build_seconds: float

    def path(self, variant: str, fmt: str) -> Path:
        return self.folder / self.files[f"{variant}/{fmt}"]["file"]

    @classmethod
    def load(cls, folder: Path) -> ModelSet:
        """Read ``folder/manifest.json``; raises OSError, ValueError (bad JSON) or KeyError (a missing field)."""
        doc = json.loads((folder / MANIFEST).read_text())
        return cls(doc["name"], doc["description"], folder, int(doc["params"]), doc["files"], doc["accuracy"],
                   doc["changed_fraction"], float(doc["build_seconds"]))


# ---------------------------------------------------------------- cache


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for pkg in FRAMEWORKS:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return found


def model_key(name: str) -> str:
    """The cache key of one model: its recipe, the code that makes the files, the framework versions and (digits)
    the source model's hash. Editing anything else in this file keeps the cache."""
    import inspect

    makers = (_load_data, _shifted, _large_network, _seed, _fit, _variants, _tflite, _onnx, _canonical_onnx, _convert)
    digest = hashlib.sha256("".join(inspect.getsource(f) for f in makers).encode())
    digest.update(json.dumps([repr(RECIPES[name]), _versions()]).encode())
    if name == "digits" and (DIGITS_DIR / "digits.keras").is_file():
        digest.update(_sha256(DIGITS_DIR / "digits.keras").encode())
    return digest.hexdigest()[:16]


def _cached(name: str, cache: Path) -> ModelSet | None:
    folder = cache / name
    try:
        doc = json.loads((folder / MANIFEST).read_text())
        if doc.get("key") != model_key(name):
            return None
        models = ModelSet.load(folder)
    except (OSError, ValueError, KeyError):
        return None
    complete = all((folder / f["file"]).is_file() and (folder / f["file"]).stat().st_size == f["size"]
                   for f in models.files.values())
    return models if complete else None


def _ignore_cache(cache: Path) -> None:
    """A ``.gitignore`` of ``*`` at the cache root, as pytest does for its cache: model files never reach git."""
    cache.mkdir(parents=True, exist_ok=True)
    marker = cache / ".gitignore"
    if not marker.exists():
        marker.write_text("# made by benchmarks/delta_models.py: model files are never committed\n*\n")


def ensure_models(names: list[str], cache: Path = DEFAULT_CACHE, *, force: bool = False,
                  log: Callable[[str], None] | None = None) -> list[ModelSet]:
    """The model sets ``names``, from the cache or built in a child process (TensorFlow stays out of the caller).

    Raises ValueError for an unknown name and subprocess.CalledProcessError when the build fails.
    """
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {list(RECIPES)}")
    missing = names if force else [n for n in names if _cached(n, cache) is None]
    if missing:
        _build_in_child(missing, cache, force=force, log=log or (lambda _: None))
    found = {n: _cached(n, cache) for n in names}
    broken = [n for n, m in found.items() if m is None]
    if broken:
        raise RuntimeError(f"model build left no complete cache for {broken} under {cache}")
    return [m for m in found.values() if m is not None]


def _build_in_child(names: list[str], cache: Path, *, force: bool, log: Callable[[str], None]) -> None:
    """Run this file as a child; its progress lines go to ``log``, everything it prints to ``cache/build.log``."""
    log(f"building models {','.join(names)} into {cache} in a child process (digits ~20 s, large ~3 min)")
    _ignore_cache(cache)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--models", ",".join(names), "--cache", str(cache)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    with (cache / "build.log").open("w") as keep, subprocess.Popen(
        [*cmd, *(["--force"] if force else [])], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as child:
        for line in child.stdout or ():
            keep.write(line)
            if line.startswith(tuple(f"{n}: " for n in names)):
                log(line.rstrip())
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, cmd, output=(cache / "build.log").read_text()[-4000:])


# ---------------------------------------------------------------- data and networks


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_tune: np.ndarray  # the fine-tune set: shifted + noisy copy of the training split
    y_tune: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    calib: np.ndarray


def _load_data() -> Data:
    if not all((DIGITS_DIR / f).is_file() for f in ("digits.keras", "train.npz", "calib.npz", "eval.npz")):
        subprocess.run([sys.executable, str(REPO / "examples/digits/train.py"), "--out", str(DIGITS_DIR)], check=True)
    train, ev = np.load(DIGITS_DIR / "train.npz"), np.load(DIGITS_DIR / "eval.npz")
    x_tune = _shifted(train["x"], np.random.default_rng(SEED + 100))
    calib = np.load(DIGITS_DIR / "calib.npz")["x"].astype(np.float32)
    return Data(train["x"], train["y"], x_tune, train["y"], ev["x"], ev["y"], calib)


def _shifted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by (-1..1, -1..1) pixels with zero fill, plus N(0, 0.03) noise, clipped to [0, 1]."""
    out = np.zeros_like(x)
    shifts = rng.integers(-1, 2, size=(len(x), 2))
    for i, (dy, dx) in enumerate(shifts):
        src = x[i, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
        out[i, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    out += rng.normal(0.0, 0.03, size=x.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _large_network() -> Any:
    import keras
    from keras import layers

    inputs = keras.Input(shape=(8, 8, 1), name="image")
    h = inputs
    for i, width in enumerate((64, 128, 256)):
        h = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{i + 1}")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.Dense(768, activation="relu", name="fc1")(h)
    h = layers.Dense(512, activation="relu", name="fc2")(h)
    outputs = layers.Dense(10, activation="softmax", name="probs")(h)
    return keras.Model(inputs, outputs, name="large_cnn")


def _seed(offset: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED + offset)
    tf.config.experimental.enable_op_determinism()


def _fit(model: Any, x: np.ndarray, y: np.ndarray, *, lr: float, epochs: int, batch: int) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=batch, verbose=0, shuffle=True)


def _accuracy(model: Any, data: Data) -> float:
    probs = model.predict(data.x_eval, batch_size=256, verbose=0)
    return round(float(np.mean(np.argmax(probs, axis=1) == data.y_eval)), 4)


def _changed_fraction(model: Any, base: Any) -> float:
    changed = total = 0
    for w, w0 in zip(model.get_weights(), base.get_weights()):
        changed += int(np.count_nonzero(w != w0))
        total += w.size
    return round(changed / total, 6)


def _variants(recipe: Recipe, data: Data, folder: Path, log: Callable[[str], None]) -> Iterator[tuple[str, Any]]:
    """Yield (variant, Keras model) for base, head and full, training as the recipe says (seeded per stage)."""
    import keras

    if recipe.base_epochs == 0:
        base_path = DIGITS_DIR / "digits.keras"
    else:
        _seed(0)
        base = _large_network()
        t0 = time.perf_counter()
        _fit(base, data.x_train, data.y_train, lr=recipe.base_lr, epochs=recipe.base_epochs, batch=recipe.batch_size)
        log(f"{recipe.name}: base trained in {time.perf_counter() - t0:.1f} s")
        base_path = folder / "base.keras"
        base.save(base_path)
    yield "base", keras.models.load_model(base_path)
    for variant, epochs, lr, offset in (("head", recipe.head_epochs, recipe.head_lr, 1),
                                        ("full", recipe.full_epochs, recipe.full_lr, 2)):
        _seed(offset)
        model = keras.models.load_model(base_path, compile=False)
        if variant == "head":
            for layer in model.layers[:-1]:
                layer.trainable = False
        t0 = time.perf_counter()
        _fit(model, data.x_tune, data.y_tune, lr=lr, epochs=epochs, batch=recipe.batch_size)
        log(f"{recipe.name}: {variant} fine-tune in {time.perf_counter() - t0:.1f} s")
        yield variant, model


# ---------------------------------------------------------------- converters


def _tflite(model: Any, calib: np.ndarray | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if calib is not None:

        def representative() -> Iterator[list[np.ndarray]]:
            for i in range(len(calib)):
                yield [calib[i : i + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def _onnx(model: Any, path: Path) -> None:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def serve(image: Any) -> dict[str, Any]:
        return {"probs": model(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=17)
    path.write_bytes(_canonical_onnx(proto).SerializeToString())


def _canonical_onnx(model: Any) -> Any:
    """Rename tf2onnx's generated names (``prefix__N``) by first use, and order initializers by first use.

    tf2onnx numbers the names it makes from a process-wide counter and, when it merges equal constants, keeps
    one of them by an order that changes between processes: the same graph comes out with other names. Renaming
    generated initializers ``const__K`` and other generated names ``prefix__K`` (K = rank of first use, walking
    the nodes in order) makes equal graphs equal bytes; names taken from the Keras layers are kept.
    """
    import re

    graph = model.graph
    order: dict[str, int] = {}
    for name in [i.name for i in graph.input] + [n for node in graph.node for n in (*node.input, *node.output)] + [
        t.name for t in graph.initializer
    ] + [node.name for node in graph.node]:
        order.setdefault(name, len(order))
    generated = re.compile(r"^(.*?)__\d+(:\d+)?$")
    initializers = {t.name for t in graph.initializer}
    rename: dict[str, str] = {}
    for name in sorted(order, key=order.__getitem__):
        match = generated.match(name)
        if match and name:
            prefix = "const" if name in initializers else match.group(1)
            rename[name] = f"{prefix}__{len(rename)}{match.group(2) or ''}"
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
        node.name = rename.get(node.name, node.name)
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = rename.get(value.name, value.name)
    ranked = sorted(graph.initializer, key=lambda t: order[t.name])
    tensors = [type(t)() for t in ranked]
    for copy, tensor in zip(tensors, ranked):
        copy.CopyFrom(tensor)
        copy.name = rename.get(tensor.name, tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(tensors)
    return model


def _convert(model: Any, variant: str, data: Data, folder: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for fmt in FORMATS:
        path = folder / f"{variant}.{SUFFIX[fmt]}"
        if fmt == "onnx-fp32":
            _onnx(model, path)
        else:
            path.write_bytes(_tflite(model, data.calib if fmt == "tflite-int8" else None))
        files[f"{variant}/{fmt}"] = {"file": path.name, "size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def build_model(name: str, cache: Path, log: Callable[[str], None]) -> ModelSet:
    """Train and convert one model's variants into ``cache/name`` (replacing it); write its manifest last."""
    recipe = RECIPES[name]
    folder = cache / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    data = _load_data()
    files: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, float] = {}
    changed: dict[str, float] = {}
    base: Any = None
    params = 0
    for variant, model in _variants(recipe, data, folder, log):
        if base is None:
            base, params = model, int(model.count_params())
        accuracy[variant] = _accuracy(model, data)
        changed[variant] = _changed_fraction(model, base)
        t1 = time.perf_counter()
        files.update(_convert(model, variant, data, folder))
        log(f"{name}: {variant} converted to {len(FORMATS)} formats in {time.perf_counter() - t1:.1f} s")
    doc = {"name": name, "description": recipe.description, "key": model_key(name), "recipe": recipe.__dict__,
           "versions": _versions(), "params": params, "files": files, "accuracy": accuracy,
           "changed_fraction": changed, "build_seconds": round(time.perf_counter() - t0, 1)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return ModelSet.load(folder)


def build_models(names: list[str], cache: Path = DEFAULT_CACHE, *, force: bool = False,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> list[ModelSet]:
    """Build (in this process: it imports TensorFlow) the model sets not already cached, or all with ``force``."""
    _ignore_cache(cache)
    out = []
    for name in names:
        found = None if force else _cached(name, cache)
        out.append(found if found is not None else build_model(name, cache, log))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="default: benchmarks/.cache/delta")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache matches")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {','.join(MODELS)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for models in build_models(names, args.cache, force=args.force):
        sizes = ", ".join(f"{k} {v['size'] / 1e6:.2f} MB" for k, v in models.files.items() if k.startswith("base/"))
        print(f"{models.name}: {models.params:,} params; {sizes}; accuracy {models.accuracy}; "
              f"changed {models.changed_fraction}; {models.build_seconds} s -> {models.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
