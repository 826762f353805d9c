"""Calibration/eval DATA in its three forms, and the errors a user sees when it does not fit the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converters.model_types import TensorSpec
from edgeops.datasets import load_dataset
from edgeops.errors import DataError

NHWC = (TensorSpec("image", (None, 8, 8, 1), "float32"),)
NCHW_RGB = (TensorSpec("pixels", (None, 3, 6, 10), "float32", "NCHW"),)


def test_npz_by_x_or_by_input_name_and_npy(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((5, 8, 8, 1), dtype=np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    np.savez(tmp_path / "b.npz", image=x)
    np.save(tmp_path / "c.npy", x)
    a, b, c = (load_dataset(tmp_path / n, NHWC, role="eval") for n in ("a.npz", "b.npz", "c.npy"))
    assert a.count == 5 and a.labels is not None and list(a.labels) == [0, 1, 2, 3, 4]
    assert np.array_equal(a.feeds["image"], b.feeds["image"]) and np.array_equal(b.feeds["image"], c.feeds["image"])
    assert a.sha256 != b.sha256


def test_image_folder_is_resized_scaled_and_labelled_by_subfolder(tmp_path: Path) -> None:
    for cls, value in (("cat", 255), ("dog", 0)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), (value, value, value)).save(tmp_path / cls / f"{i}.png")
    data = load_dataset(tmp_path, NCHW_RGB, role="calibration")
    assert data.feeds["pixels"].shape == (4, 3, 6, 10)
    assert data.labels is not None and list(data.labels) == [0, 0, 1, 1]
    assert data.feeds["pixels"][0].max() == pytest.approx(1.0) and data.feeds["pixels"][3].max() == 0.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.savez(p / "d.npz", other=np.zeros((2, 8, 8, 1))), "no array for input"),
        (lambda p: np.savez(p / "d.npz", x=np.zeros((2, 8, 8))), "has shape (2, 8, 8), the model expects (N, 8, 8, 1)"),
        (lambda p: np.savez(p / "d.npz", x=np.zeros((2, 8, 8, 1)), y=np.zeros(3)), "3 labels for 2 samples"),
        (lambda p: (p / "d.npz").write_bytes(b"not a zip"), "not a readable"),
    ],
)
def test_bad_data_names_the_problem(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    make(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "d.npz", NHWC, role="calibration")
    assert message in str(err.value)
