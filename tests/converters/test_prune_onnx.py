"""converters.prune_onnx on the digits ONNX model, checked with real onnxruntime and zstd."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.prune_onnx import prune_onnx_magnitude
from edgeops.errors import BuildError

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits" / "out"


@pytest.fixture(scope="session")
def digits_onnx(digits_dir: Path) -> Path:
    return digits_dir / "digits.onnx"


def initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def probs(path: Path) -> np.ndarray:
    import onnxruntime as ort

    x = np.load(DIGITS / "eval_nchw.npz")["x"].astype(np.float32)
    return np.asarray(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0])


def zstd_size(path: Path) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=19).compress(path.read_bytes()))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_reaches_target_sparsity_on_weights_only(digits_onnx: Path, tmp_path: Path, target: float) -> None:
    out = tmp_path / "pruned.onnx"
    result = prune_onnx_magnitude(digits_onnx, out, sparsity=target)
    assert result.method == "magnitude" and abs(result.sparsity - target) <= 0.01
    before, after = initializers(digits_onnx), initializers(out)
    weights = [after[name] for name in result.layers]
    measured = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert abs(measured - target) <= 0.01 and measured == pytest.approx(result.sparsity)
    # the four Conv/MatMul weights of >= 1024 values; conv1 (288 values) and every bias untouched
    assert len(result.layers) == 4 and all(after[n].ndim >= 2 for n in result.layers)
    for name in set(before) - set(result.layers):
        assert np.array_equal(before[name], after[name])


def test_30_percent_keeps_predictions_and_compresses_better(digits_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    prune_onnx_magnitude(digits_onnx, out, sparsity=0.3)
    agreement = float((probs(out).argmax(1) == probs(digits_onnx).argmax(1)).mean())
    assert agreement >= 0.97
    assert zstd_size(out) < 0.9 * zstd_size(digits_onnx)


def test_is_deterministic(digits_onnx: Path, tmp_path: Path) -> None:
    prune_onnx_magnitude(digits_onnx, tmp_path / "a.onnx", sparsity=0.5)
    prune_onnx_magnitude(digits_onnx, tmp_path / "b.onnx", sparsity=0.5)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_out_of_range(digits_onnx: Path, tmp_path: Path, sparsity: float) -> None:
    with pytest.raises(BuildError, match="sparsity"):
        prune_onnx_magnitude(digits_onnx, tmp_path / "p.onnx", sparsity=sparsity)
    assert list(tmp_path.iterdir()) == []


def test_nothing_large_enough_to_prune(digits_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="nothing to prune"):
        prune_onnx_magnitude(digits_onnx, tmp_path / "p.onnx", sparsity=0.5, min_params=10**9)
    assert list(tmp_path.iterdir()) == []
