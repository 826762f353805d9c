"""converters.onnx_quantize (fp16, dynamic and static int8) against real onnxruntime on the digits example."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from converters import onnx_backend as ob
from converters import onnx_quantize as oq
from edgeops.errors import BuildError, DataError


@pytest.fixture(scope="session")
def eval_nchw(digits_dir: Path) -> np.ndarray:
    return np.load(digits_dir / "eval_nchw.npz")["x"].astype(np.float32)


@pytest.fixture(scope="session")
def calib_nchw(digits_dir: Path) -> dict[str, np.ndarray]:
    return {"image": np.load(digits_dir / "calib.npz")["x"].transpose(0, 3, 1, 2)}


def run(path: Path, x: np.ndarray, name: str = "image") -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {name: x})[0])


@pytest.fixture(scope="session")
def fp32_probs(digits_dir: Path, eval_nchw: np.ndarray) -> np.ndarray:
    return run(digits_dir / "digits.onnx", eval_nchw)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def only_out(tmp: Path, out: Path) -> None:
    """Nothing was left behind: neither ``out`` nor a temp file in its folder."""
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(f".{out.name}.")]


# ----------------------------------------------------------------------------------------------- fp16


def test_fp16_runs_on_cpu_agrees_and_halves_size(
    digits_dir: Path, tmp_path: Path, eval_nchw: np.ndarray, fp32_probs: np.ndarray
) -> None:
    oq.onnx_to_fp16(digits_dir / "digits.onnx", tmp_path / "a.onnx")
    oq.onnx_to_fp16(digits_dir / "digits.onnx", tmp_path / "b.onnx")
    inputs, outputs = ob.read_onnx_io(tmp_path / "a.onnx")
    assert inputs[0].dtype == outputs[0].dtype == "float32"  # keep_io_types
    assert agreement(run(tmp_path / "a.onnx", eval_nchw), fp32_probs) >= 0.99
    assert (tmp_path / "a.onnx").stat().st_size <= 0.55 * (digits_dir / "digits.onnx").stat().st_size
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


# ----------------------------------------------------------------------------------------------- int8


def op_types(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_qdq_agrees_shrinks_and_is_deterministic(
    digits_dir: Path, tmp_path: Path, method: str, calib_nchw: dict, eval_nchw: np.ndarray, fp32_probs: np.ndarray
) -> None:
    for name in ("a.onnx", "b.onnx"):
        oq.onnx_quantize_static(digits_dir / "digits.onnx", tmp_path / name, calib_nchw, method=method)
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(tmp_path / "a.onnx")
    assert agreement(run(tmp_path / "a.onnx", eval_nchw), fp32_probs) >= 0.98
    assert (tmp_path / "a.onnx").stat().st_size <= 0.3 * (digits_dir / "digits.onnx").stat().st_size
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_dynamic_int8_runs_and_is_deterministic(
    digits_dir: Path, tmp_path: Path, eval_nchw: np.ndarray, fp32_probs: np.ndarray
) -> None:
    oq.onnx_quantize_dynamic(digits_dir / "digits.onnx", tmp_path / "a.onnx")
    oq.onnx_quantize_dynamic(digits_dir / "digits.onnx", tmp_path / "b.onnx")
    assert agreement(run(tmp_path / "a.onnx", eval_nchw), fp32_probs) >= 0.98
    assert (tmp_path / "a.onnx").stat().st_size <= 0.3 * (digits_dir / "digits.onnx").stat().st_size
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("calib", [None, {}])
def test_static_int8_without_calibration(digits_dir: Path, tmp_path: Path, calib: dict | None) -> None:
    with pytest.raises(DataError, match=r"^int8 needs calibration data \(--calib\)$"):
        oq.onnx_quantize_static(digits_dir / "digits.onnx", tmp_path / "q.onnx", calib)  # type: ignore[arg-type]
    only_out(tmp_path, tmp_path / "q.onnx")


def test_static_int8_calibration_of_wrong_shape(digits_dir: Path, tmp_path: Path) -> None:
    nhwc = {"image": np.load(digits_dir / "calib.npz")["x"]}  # NHWC data for the NCHW model
    with pytest.raises(DataError) as info:
        oq.onnx_quantize_static(digits_dir / "digits.onnx", tmp_path / "q.onnx", nhwc)
    message = str(info.value)
    assert "'image'" in message and "(N, 1, 8, 8)" in message and "(300, 8, 8, 1)" in message
    with pytest.raises(DataError, match="pixels"):
        oq.onnx_quantize_static(digits_dir / "digits.onnx", tmp_path / "q.onnx", {"pixels": nhwc["image"]})
    only_out(tmp_path, tmp_path / "q.onnx")


def test_static_int8_unknown_method(digits_dir: Path, tmp_path: Path, calib_nchw: dict) -> None:
    with pytest.raises(BuildError, match="kl-divergence"):
        oq.onnx_quantize_static(digits_dir / "digits.onnx", tmp_path / "q.onnx", calib_nchw, method="kl-divergence")
    only_out(tmp_path, tmp_path / "q.onnx")
