"""Batch-folder mode over the real digits ONNX model in onnxruntime: results next to the inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.batch import BatchSummary, run_batch
from device_agent.service import NoModelError
from edgeops.errors import StorageError
from tests.support.digits_service import DigitsService


@pytest.fixture(scope="module")
def images(digits_dir: Path) -> np.ndarray:
    return np.load(digits_dir / "eval_nchw.npz")["x"][:20]


@pytest.fixture(scope="module")
def service(digits_dir: Path) -> DigitsService:
    return DigitsService(digits_dir / "digits.onnx")


@pytest.fixture()
def folder(tmp_path: Path, images: np.ndarray) -> Path:
    np.save(tmp_path / "a.npy", images[:5])
    np.save(tmp_path / "b.npy", images[5:12])
    np.save(tmp_path / "c.npy", images[12:13])
    (tmp_path / "notes.txt").write_text("not an input")
    return tmp_path


def test_results_equal_direct_runs(folder: Path, service: DigitsService) -> None:
    seen: list[tuple[int, int]] = []
    summary = run_batch(folder, service, progress=lambda i, n: seen.append((i, n)))
    assert summary == BatchSummary(done=3, skipped=0, failed=[])
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert service.runner is not None
    for stem in ("a", "b", "c"):
        x = np.load(folder / f"{stem}.npy")
        got = np.load(folder / f"{stem}.out.npy", allow_pickle=False)
        np.testing.assert_allclose(got, service.runner.run({"image": x})["probs"], atol=1e-6)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_existing_results_are_skipped_unless_overwrite(folder: Path, service: DigitsService) -> None:
    run_batch(folder, service)
    (folder / "b.out.npy").write_bytes(b"an older result")
    calls = service.requests
    summary = run_batch(folder, service)
    assert (summary.done, summary.skipped) == (0, 3)  # *.out.npy are results, never inputs
    assert service.requests == calls
    assert (folder / "b.out.npy").read_bytes() == b"an older result"

    summary = run_batch(folder, service, overwrite=True)
    assert (summary.done, summary.skipped) == (3, 0)
    assert np.load(folder / "b.out.npy").shape == (7, 10)


def test_bad_files_are_reported_and_the_rest_still_run(
    folder: Path, service: DigitsService, images: np.ndarray
) -> None:
    (folder / "bad_corrupt.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    np.save(folder / "bad_shape.npy", images[:4].reshape(4, 64))
    np.savez(folder / "bad_archive.npy", x=images[:2])  # np.savez keeps the name: a zip called .npy
    (folder / "bad_archive.npy.npz").rename(folder / "bad_archive.npy")
    summary = run_batch(folder, service)
    assert summary.done == 3
    reasons = dict(summary.failed)
    assert sorted(reasons) == ["bad_archive.npy", "bad_corrupt.npy", "bad_shape.npy"]
    assert "not a readable .npy" in reasons["bad_corrupt.npy"]
    assert "expected (N, 1, 8, 8)" in reasons["bad_shape.npy"]
    assert "not a single-array .npy" in reasons["bad_archive.npy"]
    assert not (folder / "bad_shape.out.npy").exists() and not (folder / "bad_corrupt.out.npy").exists()
    assert (folder / "c.out.npy").exists()


def test_several_outputs_go_to_an_npz(folder: Path, digits_dir: Path) -> None:
    two = DigitsService(digits_dir / "digits.onnx", with_label=True)
    assert run_batch(folder, two).done == 3
    with np.load(folder / "b.out.npz", allow_pickle=False) as result:
        assert sorted(result.files) == ["label", "probs"]
        assert result["probs"].shape == (7, 10)
        np.testing.assert_array_equal(result["label"], np.argmax(result["probs"], axis=1))
    assert not (folder / "b.out.npy").exists()


def test_an_unusable_folder_or_no_model_stops_the_run(tmp_path: Path, folder: Path, digits_dir: Path) -> None:
    with pytest.raises(OSError):
        run_batch(tmp_path / "missing", DigitsService(digits_dir / "digits.onnx"))
    with pytest.raises(OSError):
        run_batch(folder / "a.npy", DigitsService(digits_dir / "digits.onnx"))  # a file, not a folder
    with pytest.raises(NoModelError):
        run_batch(folder, DigitsService(None))
    assert not list(folder.glob("*.out.*"))


def test_a_result_that_cannot_be_written_is_a_storage_error(folder: Path, service: DigitsService) -> None:
    (folder / "a.out.npy").mkdir()  # the result path is taken by a directory: the write cannot succeed
    with pytest.raises(StorageError, match="cannot write results"):
        run_batch(folder, service, overwrite=True)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
