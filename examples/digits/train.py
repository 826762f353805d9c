"""Train the example model offline: a small Keras CNN on scikit-learn's bundled 8x8 digits.

Writes, into ``--out`` (default ``examples/digits/out``):

- ``digits.keras``      the Keras 3 model, input ``image`` (N, 8, 8, 1) float32 in [0, 1], output 10 softmax
- ``digits.onnx``       the same network exported to ONNX the way a PyTorch user's model looks: NCHW input
                        ``image`` (N, 1, 8, 8) with a dynamic batch dimension
- ``calib.npz``         300 training images (``x``, NHWC) for quantisation calibration
- ``eval.npz``          the 360-image held-out split, ``x`` (NHWC) and ``y`` labels
- ``eval_nchw.npz``     the same, NCHW, for the ONNX model
- ``train.npz``         the training split (``x``, ``y``) for pruning fine-tunes

Everything is seeded; no network access. Runs in well under a minute on two cores.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

SEED = 7


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_eval, y_eval); x is (N, 8, 8, 1) float32 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int64)
    x_tr, x_ev, y_tr, y_ev = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    return x_tr, y_tr, x_ev, y_ev


def build_model():  # type: ignore[no-untyped-def]
    import keras
    from keras import layers

    inputs = keras.Input(shape=(8, 8, 1), name="image")
    h = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(h)
    h = layers.MaxPooling2D(2, name="pool")(h)
    h = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.Dense(128, activation="relu", name="fc1")(h)
    outputs = layers.Dense(10, activation="softmax", name="probs")(h)
    return keras.Model(inputs, outputs, name="digits_cnn")


def export_onnx_nchw(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Export ``model`` to ONNX with an NCHW input, as torch.onnx.export would produce it."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def serve(image):  # type: ignore[no-untyped-def]
        return {"probs": model(image, training=False)}

    tf2onnx.convert.from_function(
        serve, input_signature=spec, opset=17, inputs_as_nchw=["image:0"], output_path=str(path)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(SEED)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_ev, y_ev = load_digits_split()
    model = build_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_tr, y_tr, epochs=args.epochs, batch_size=32, verbose=0, validation_split=0.0)
    _, acc = model.evaluate(x_ev, y_ev, verbose=0)
    model.save(out / "digits.keras")
    export_onnx_nchw(model, out / "digits.onnx")
    rng = np.random.default_rng(SEED)
    calib_idx = rng.choice(len(x_tr), size=300, replace=False)
    np.savez(out / "calib.npz", x=x_tr[calib_idx])
    np.savez(out / "eval.npz", x=x_ev, y=y_ev)
    np.savez(out / "eval_nchw.npz", x=x_ev.transpose(0, 3, 1, 2), y=y_ev)
    np.savez(out / "train.npz", x=x_tr, y=y_tr)
    print(f"digits CNN: eval accuracy {acc:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
