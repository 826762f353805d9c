"""Offline models for the benchmarks: the digits example CNN and a larger, compute-bound conv net.

Guarantees: everything is made from scikit-learn's bundled 8x8 digits, seeded, with no network access. Each
:class:`BenchModel` names a Keras 3 ``.keras`` file, a calibration ``.npz`` (``x``) and an eval ``.npz`` (``x``,
``y``), in NHWC float32 in [0, 1]. Does not guarantee bit-identical weights across TensorFlow versions or CPUs
(oneDNN kernels differ), only the same recipe and seeds.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["BenchModel", "conv32_model", "digits_model"]

REPO = Path(__file__).resolve().parent.parent
DIGITS_TRAIN = REPO / "examples" / "digits" / "train.py"
SEED = 7
CALIB_SAMPLES = 300


@dataclass(frozen=True)
class BenchModel:
    name: str
    description: str
    keras: Path
    calib: Path
    eval: Path
    train_seconds: float  # 0.0 when the files already existed


def _digits_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgeops_digits_train", DIGITS_TRAIN)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {DIGITS_TRAIN}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_model(out_dir: Path) -> BenchModel:
    """The example digits CNN (8x8x1 input); trains it with examples/digits/train.py if ``out_dir`` lacks it."""
    import time

    files = [out_dir / n for n in ("digits.keras", "calib.npz", "eval.npz")]
    t0 = time.perf_counter()
    trained = not all(f.is_file() for f in files)
    if trained:
        _digits_module().main(["--out", str(out_dir)])
    return BenchModel(
        "digits",
        "examples/digits CNN, 8x8x1 input, 3 conv + 2 dense (overhead-bound)",
        files[0],
        files[1],
        files[2],
        round(time.perf_counter() - t0, 1) if trained else 0.0,
    )


def upsample(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, 8, 8, 1) images to (N, size, size, 1), float32 in [0, 1]."""
    from scipy.ndimage import zoom

    factor = size / x.shape[1]
    out = zoom(x[..., 0], (1, factor, factor), order=1, mode="nearest", grid_mode=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)[..., None]


def _conv32_network(size: int) -> Any:
    import keras
    from keras import layers

    inputs = keras.Input(shape=(size, size, 1), name="image")
    h = inputs
    for stage, width in enumerate((32, 64, 128)):
        for i in range(2):
            h = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{stage}_{i}")(h)
            h = layers.BatchNormalization(momentum=0.9, name=f"bn{stage}_{i}")(h)
            h = layers.ReLU(name=f"relu{stage}_{i}")(h)
        if stage < 2:
            h = layers.MaxPooling2D(2, name=f"pool{stage}")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = layers.Dense(10, activation="softmax", name="probs")(h)
    return keras.Model(inputs, outputs, name=f"conv{size}_cnn")


def conv32_model(out_dir: Path, *, size: int = 32, epochs: int = 4) -> BenchModel:
    """A VGG-style 6-conv net (32/64/128 channels, BatchNorm) on digits upsampled to ``size`` x ``size``.

    About 38 M multiply-adds per image at 32x32, so inference is compute-bound, unlike the 8x8 example.
    Trained ``epochs`` epochs with Adam, seeded; reuses the files when they exist.
    """
    import time

    keras_path, calib_path, eval_path = (out_dir / f"conv{size}.keras", out_dir / "calib.npz", out_dir / "eval.npz")
    description = f"VGG-style 6-conv CNN + BatchNorm on digits upsampled to {size}x{size} (compute-bound)"
    if keras_path.is_file() and calib_path.is_file() and eval_path.is_file():
        return BenchModel(f"conv{size}", description, keras_path, calib_path, eval_path, 0.0)
    t0 = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    x_tr, y_tr, x_ev, y_ev = _digits_module().load_digits_split()
    x_tr, x_ev = upsample(x_tr, size), upsample(x_ev, size)
    keras.utils.set_random_seed(SEED)
    model = _conv32_network(size)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_tr, y_tr, epochs=epochs, batch_size=32, verbose=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(keras_path)
    idx = np.random.default_rng(SEED).choice(len(x_tr), size=CALIB_SAMPLES, replace=False)
    np.savez(calib_path, x=x_tr[idx])
    np.savez(eval_path, x=x_ev, y=y_ev)
    return BenchModel(f"conv{size}", description, keras_path, calib_path, eval_path, round(time.perf_counter() - t0, 1))
