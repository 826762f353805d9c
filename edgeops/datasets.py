"""Calibration / evaluation / training data for the compiler (host side).

DATA is a ``.npz`` (one array per model input by input name, or ``x`` for a single input; optional ``y``
labels), a ``.npy`` (one input), or a folder of images (``*.png``/``*.jpg``; sub-folders are classes, sorted,
as labels), resized and scaled to [0, 1] for the model's input. Every array is batch-first. :func:`load_dataset`
checks the data against the model's inputs and raises :class:`DataError` naming the input, the expected and
the given shape; it never guesses a layout it cannot see.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.model_types import TensorSpec
from edgeops.errors import DataError

__all__ = ["Dataset", "load_dataset", "sha256_path"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass(frozen=True)
class Dataset:
    feeds: dict[str, np.ndarray]  # by model input name, batch-first
    labels: np.ndarray | None
    sha256: str
    path: Path

    @property
    def count(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])

    def head(self, n: int) -> Dataset:
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.feeds.items()}, labels, self.sha256, self.path)


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's sorted (relative name, content) pairs."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_arrays(
    path: Path, inputs: Sequence[TensorSpec], role: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        if path.suffix == ".npy":
            return {inputs[0].name: np.load(path, allow_pickle=False)}, None
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{role} data {path} is not a readable .npz/.npy file ({exc})") from None
    labels = arrays.pop("y", None)
    if "x" in arrays and len(inputs) == 1 and inputs[0].name not in arrays:
        arrays = {inputs[0].name: arrays.pop("x")}
    missing = [t.name for t in inputs if t.name not in arrays]
    if missing:
        raise DataError(f"{role} data {path} has no array for input(s) {missing} (arrays: {sorted(arrays)})")
    return {t.name: arrays[t.name] for t in inputs}, labels


def _read_images(
    path: Path, inputs: Sequence[TensorSpec], role: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    from PIL import Image

    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise DataError(f"{role} data {path}: an image folder needs a model with one 4-D image input")
    spec = inputs[0]
    nchw = spec.layout == "NCHW" or (spec.shape[1] in (1, 3) and spec.shape[3] not in (1, 3))
    c, h, w = (spec.shape[1], spec.shape[2], spec.shape[3]) if nchw else (spec.shape[3], spec.shape[1], spec.shape[2])
    if None in (c, h, w):
        raise DataError(f"{role} data {path}: input {spec.name!r} has dynamic size {spec.shape}; give --input-shape")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{role} data {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    batch = []
    for f in files:
        with Image.open(f) as opened:
            img = opened.convert("L" if c == 1 else "RGB").resize((int(w), int(h)), Image.Resampling.BILINEAR)  # type: ignore[arg-type]
            arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[..., None] if arr.ndim == 2 else arr
        batch.append(arr.transpose(2, 0, 1) if nchw else arr)
    labels = np.array([classes.index(f.relative_to(path).parts[0]) for f in files]) if classes else None
    return {spec.name: np.stack(batch)}, labels


def _check_shapes(feeds: dict[str, np.ndarray], inputs: Sequence[TensorSpec], role: str) -> None:
    for spec in inputs:
        arr = feeds[spec.name]
        expected = ("N", *spec.shape[1:])
        ok = arr.ndim == len(spec.shape) and all(e is None or e == g for e, g in zip(spec.shape[1:], arr.shape[1:]))
        if not ok:
            shown = "(" + ", ".join("?" if d is None else str(d) for d in expected) + ")"
            raise DataError(
                f"{role} data for input {spec.name!r} has shape {tuple(arr.shape)}, the model expects {shown}"
            )
        if arr.shape[0] == 0:
            raise DataError(f"{role} data for input {spec.name!r} is empty")
    counts = {a.shape[0] for a in feeds.values()}
    if len(counts) != 1:
        raise DataError(f"{role} data arrays have different sample counts {sorted(counts)}")


def load_dataset(path: Path, inputs: Sequence[TensorSpec], *, role: str) -> Dataset:
    """Load ``path`` for a model with ``inputs``; ``role`` ("calibration", "eval", "train") names it in errors.

    Raises DataError when the path is missing, unreadable, lacks an input, or its shapes do not fit.
    """
    if not path.exists():
        raise DataError(f"{role} data not found: {path}")
    if path.is_dir():
        feeds, labels = _read_images(path, inputs, role)
    else:
        feeds, labels = _read_arrays(path, inputs, role)
    feeds = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    _check_shapes(feeds, inputs, role)
    if labels is not None and labels.shape[0] != next(iter(feeds.values())).shape[0]:
        raise DataError(
            f"{role} data {path}: {labels.shape[0]} labels for {next(iter(feeds.values())).shape[0]} samples"
        )
    return Dataset(feeds, labels, sha256_path(path), path)
