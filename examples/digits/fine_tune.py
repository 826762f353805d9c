"""Fine-tune the example model offline: the "v2" of an OTA update (delta tests, benchmarks, the demo).

Loads ``--base``/digits.keras (from train.py), trains it further on the same bundled digits data and writes the
same files as train.py into ``--out``: ``digits.keras``, ``digits.onnx`` and the data ``.npz`` files (copied), so
``edgeops build`` can build it exactly like the base model.

``--head-only`` trains only the last dense layer (``probs``): most tensors stay byte-identical, the case where a
model-aware delta shines. Without it every layer moves a little (a full fine-tune). Seeded; no network access.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import SEED, export_onnx_nchw, load_digits_split

DATA_FILES = ("calib.npz", "eval.npz", "eval_nchw.npz", "train.npz")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path(__file__).parent / "out", help="train.py's output dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--head-only", action="store_true", help="train only the last layer")
    parser.add_argument("--seed", type=int, default=SEED + 1)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = keras.models.load_model(args.base / "digits.keras")
    if args.head_only:
        for layer in model.layers:
            layer.trainable = layer.name == "probs"
    x_tr, y_tr, x_ev, y_ev = load_digits_split()
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_tr, y_tr, epochs=args.epochs, batch_size=32, verbose=0, shuffle=True)
    _, acc = model.evaluate(x_ev, y_ev, verbose=0)
    model.save(out / "digits.keras")
    export_onnx_nchw(model, out / "digits.onnx")
    for name in DATA_FILES:
        shutil.copyfile(args.base / name, out / name)
    kind = "head-only" if args.head_only else "full"
    print(f"digits CNN {kind} fine-tune: eval accuracy {acc:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
