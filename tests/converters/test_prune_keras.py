"""Tests for converters.prune_keras on the real Keras 3 runtime (digits CNN, a residual net, Sequential)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import zstandard

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from converters.model_types import PruneResult
from converters.prune_keras import prune_keras
from edgeops.errors import BuildError, DataError, ModelLoadError, OutputError

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits" / "out"


def _load(path: Path):  # type: ignore[no-untyped-def]
    return keras.models.load_model(path, compile=False)


def _accuracy(path: Path) -> float:
    ev = np.load(DIGITS / "eval.npz")
    return float((_load(path).predict(ev["x"], verbose=0).argmax(-1) == ev["y"]).mean())


def _train() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DIGITS / "train.npz")
    return data["x"], data["y"]


def _weights_zstd_size(path: Path) -> int:
    """zstd size of the weights file inside a .keras archive (optimizer state, if any, left out)."""
    model = _load(path)
    raw = io.BytesIO()
    np.savez(raw, *model.get_weights())
    return len(zstandard.ZstdCompressor(level=19).compress(raw.getvalue()))


@pytest.fixture(scope="module")
def magnitude(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PruneResult]:
    out = tmp_path_factory.mktemp("magnitude") / "pruned.keras"
    result = prune_keras(DIGITS / "digits.keras", out, method="magnitude", sparsity=0.5, train=_train(), epochs=2)
    return out, result


def test_magnitude_prunes_half_of_the_kernels_and_keeps_them_zero_through_the_fine_tune(
    magnitude: tuple[Path, PruneResult],
) -> None:
    out, result = magnitude
    assert result.method == "magnitude" and result.removed_params == 0
    assert abs(result.sparsity - 0.5) <= 0.01
    assert "fc1" in result.layers and "conv1" not in result.layers  # conv1 has 288 weights: too small
    pruned = _load(out)
    for name in result.layers:
        kernel = pruned.get_layer(name).kernel.numpy()
        assert abs(np.mean(kernel == 0) - 0.5) <= 0.01, name
    assert not np.any(pruned.get_layer("conv1").kernel.numpy() == 0)
    assert _accuracy(out) >= _accuracy(DIGITS / "digits.keras") - 0.02
    assert zipfile.is_zipfile(out) and not list(out.parent.glob(".pruned.*"))  # no temp file left behind


def test_high_sparsity_fine_tune_trains_under_the_masks(tmp_path: Path) -> None:
    """At 80 % one-shot loses >10 pt here; training with the masks applied each batch recovers it.

    Were the masks not applied during the fit, the final exact re-masking would cut weights the fine-tune had
    come to rely on, and the accuracy would fall back towards the one-shot figure.
    """
    one_shot, tuned = tmp_path / "one_shot.keras", tmp_path / "tuned.keras"
    prune_keras(DIGITS / "digits.keras", one_shot, method="magnitude", sparsity=0.8)
    result = prune_keras(DIGITS / "digits.keras", tuned, method="magnitude", sparsity=0.8, train=_train(), epochs=2)
    assert abs(result.sparsity - 0.8) <= 0.01
    assert _accuracy(tuned) >= 0.95 and _accuracy(tuned) >= _accuracy(one_shot) + 0.05


def test_magnitude_pruned_weights_compress_smaller(magnitude: tuple[Path, PruneResult]) -> None:
    out, _ = magnitude
    assert _weights_zstd_size(out) < 0.8 * _weights_zstd_size(DIGITS / "digits.keras")


def test_pruning_is_deterministic(magnitude: tuple[Path, PruneResult], tmp_path: Path) -> None:
    again = tmp_path / "again.keras"
    prune_keras(DIGITS / "digits.keras", again, method="magnitude", sparsity=0.5, train=_train(), epochs=2)
    for first, second in zip(_load(magnitude[0]).get_weights(), _load(again).get_weights(), strict=True):
        np.testing.assert_array_equal(first, second)


def test_structured_quarter_removes_filters_keeps_io_and_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "structured.keras"
    result = prune_keras(DIGITS / "digits.keras", out, method="structured", sparsity=0.25, train=_train(), epochs=2)
    original, pruned = _load(DIGITS / "digits.keras"), _load(out)
    assert result.layers == ("conv2", "conv3", "fc1")  # conv1 too small, probs is the output
    assert pruned.get_layer("conv2").filters == 48 and pruned.get_layer("fc1").units == 96
    assert result.removed_params == original.count_params() - pruned.count_params() > 0
    assert 0.25 <= result.sparsity < 0.6  # inputs of the next layer shrink too
    assert [t.shape for t in pruned.inputs] == [t.shape for t in original.inputs]
    assert [t.shape for t in pruned.outputs] == [t.shape for t in original.outputs]
    assert pruned.get_config()["input_layers"] == original.get_config()["input_layers"]
    assert pruned.get_config()["output_layers"] == original.get_config()["output_layers"]
    assert _accuracy(out) >= 0.9


def test_structured_removing_dead_filters_leaves_outputs_unchanged(tmp_path: Path) -> None:
    """Zeroed filters are the lowest-L1 ones; cutting them (and fc1's interleaved Flatten rows) changes nothing."""
    model = _load(DIGITS / "digits.keras")
    rng = np.random.default_rng(0)
    for name in ("conv2", "conv3", "fc1"):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        dead = rng.choice(kernel.shape[-1], size=kernel.shape[-1] // 4, replace=False)
        kernel[..., dead], bias[dead] = 0.0, 0.0
        layer.set_weights([kernel, bias])
    src, out = tmp_path / "dead.keras", tmp_path / "cut.keras"
    model.save(src)
    result = prune_keras(src, out, method="structured", sparsity=0.25)
    x = np.load(DIGITS / "eval.npz")["x"]
    assert result.layers == ("conv2", "conv3", "fc1")
    np.testing.assert_allclose(_load(out).predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def _residual_model():  # type: ignore[no-untyped-def]
    """A MobileNetV2-style block: expand -> BN -> ReLU6 -> depthwise -> BN -> project -> BN -> Add, then a head."""
    from keras import layers

    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3), name="pixels")
    stem = layers.ReLU(6.0, name="stem_relu")(layers.Conv2D(16, 3, padding="same", name="stem")(inputs))
    h = layers.Conv2D(64, 1, name="expand")(stem)
    h = layers.ReLU(6.0, name="expand_relu")(layers.BatchNormalization(name="expand_bn")(h))
    h = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(h)
    h = layers.ReLU(6.0, name="dw_relu")(layers.BatchNormalization(name="dw_bn")(h))
    h = layers.BatchNormalization(name="project_bn")(layers.Conv2D(16, 1, name="project")(h))
    h = layers.Add(name="add")([stem, h])
    h = layers.Conv2D(96, 1, activation="relu", name="head")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = layers.Dense(4, name="regress")(h)  # linear: fine-tuning falls back to self-distillation
    model = keras.Model(inputs, outputs, name="residual")
    x = np.random.default_rng(1).random((64, 16, 16, 3), dtype=np.float32)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.random.default_rng(2).random((64, 4)), epochs=1, verbose=0)  # non-trivial BN statistics
    return model, x


def test_structured_residual_model_skips_add_feeding_convs(tmp_path: Path) -> None:
    model, x = _residual_model()
    src, cut, tuned = tmp_path / "residual.keras", tmp_path / "cut.keras", tmp_path / "tuned.keras"
    model.save(src)
    result = prune_keras(src, cut, method="structured", sparsity=0.5)
    pruned = _load(cut)
    assert result.layers == ("expand", "head")  # stem and project feed the Add; regress is the output
    assert pruned.get_layer("expand").filters == 32 and pruned.get_layer("head").filters == 48
    assert pruned.get_layer("depthwise").kernel.shape == (3, 3, 32, 1)
    assert pruned.get_layer("dw_bn").moving_mean.shape == (32,)
    np.testing.assert_array_equal(pruned.get_layer("stem").kernel.numpy(), model.get_layer("stem").kernel.numpy())
    assert pruned.get_layer("project").kernel.shape == (1, 1, 32, 16)  # input cut, output kept for the Add
    assert result.removed_params == model.count_params() - pruned.count_params() > 0
    # labels are not used for a linear output: the fine-tune distils the unpruned model's own outputs
    prune_keras(src, tuned, method="structured", sparsity=0.5, train=(x, np.zeros(len(x))), epochs=3)
    reference = model.predict(x, verbose=0)
    one_shot_err = np.mean((pruned.predict(x, verbose=0) - reference) ** 2)
    tuned_err = np.mean((_load(tuned).predict(x, verbose=0) - reference) ** 2)
    print(f"residual distillation mse: one-shot {one_shot_err:.5f}, fine-tuned {tuned_err:.5f}")
    assert tuned_err < one_shot_err


def test_structured_sequential_dense_model(tmp_path: Path) -> None:
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((32,), name="features"),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dropout(0.1, name="drop"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    src, out = tmp_path / "seq.keras", tmp_path / "seq_pruned.keras"
    model.save(src)
    result = prune_keras(src, out, method="structured", sparsity=0.5)
    pruned = _load(out)
    assert result.layers == ("hidden",) and pruned.get_layer("hidden").units == 32
    assert pruned.get_layer("out").kernel.shape == (32, 3)
    assert pruned.predict(np.ones((2, 32), np.float32), verbose=0).shape == (2, 3)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_unit_interval_is_refused(sparsity: float, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="sparsity"):
        prune_keras(DIGITS / "digits.keras", tmp_path / "o.keras", method="magnitude", sparsity=sparsity)


def test_bad_inputs_raise_typed_errors_and_write_nothing(tmp_path: Path) -> None:
    src, out = DIGITS / "digits.keras", tmp_path / "o.keras"
    with pytest.raises(BuildError, match="unknown pruning method"):
        prune_keras(src, out, method="random", sparsity=0.5)
    with pytest.raises(ModelLoadError, match="no such file"):
        prune_keras(tmp_path / "missing.keras", out, method="magnitude", sparsity=0.5)
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match=r"garbage\.keras"):
        prune_keras(garbage, out, method="magnitude", sparsity=0.5)
    x, y = _train()
    with pytest.raises(DataError, match=r"\(1437, 8, 8\).*\(N, 8, 8, 1\)"):
        prune_keras(src, out, method="magnitude", sparsity=0.5, train=(x[..., 0], y))
    with pytest.raises(DataError, match="labels"):
        prune_keras(src, out, method="structured", sparsity=0.5, train=(x, y + 10))
    with pytest.raises(OutputError, match=r"\.keras"):
        prune_keras(src, tmp_path / "o.h5", method="magnitude", sparsity=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.keras"]
