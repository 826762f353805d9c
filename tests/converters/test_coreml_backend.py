"""Keras / SavedModel -> Core ML mlprogram: precision, static I/O, canonical bytes, and bad input.

Core ML predictions need macOS, so on Linux these tests check structure (what a user gets in the .mlpackage),
not numbers; ``executed`` must say so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from converters.coreml_backend import tf_to_coreml
from converters.coreml_package import CoreMLCheck, check_coreml, coreml_files
from converters.model_types import ModelFormat, Precision
from edgeops.errors import BuildError, DataError, ModelLoadError, UnsupportedOpError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits" / "out" / "digits.keras"


def _write(files: list[tuple[str, bytes]], root: Path) -> Path:
    for rel, data in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def digits(digits_dir: Path) -> Path:
    return digits_dir / "digits.keras"


@pytest.fixture(scope="module")
def built(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits model converted three times: fp16 twice (for determinism) and int8-weights once."""
    folder = tmp_path_factory.mktemp("coreml")
    paths = {
        "fp16": folder / "digits_fp16.mlpackage",
        "fp16_again": folder / "digits_fp16_again.mlpackage",
        "int8": folder / "digits_int8.mlpackage",
    }
    for key, out in paths.items():
        precision = Precision.INT8_WEIGHTS if key == "int8" else Precision.FP16
        tf_to_coreml(digits, ModelFormat.KERAS, out, precision=precision, profile="ios")
    return paths


def _savedmodel(path: Path, *, seq_shape: tuple[int | None, ...], op: str = "relu") -> Path:
    """A tiny SavedModel with a variable, two named outputs and (optionally) an op Core ML cannot convert."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.ones((4, 3)))

        @tf.function(input_signature=[tf.TensorSpec(seq_shape, tf.float32, name="seq")])
        def __call__(self, seq: tf.Tensor) -> dict[str, tf.Tensor]:
            act = tf.math.lgamma if op == "lgamma" else tf.nn.relu
            return {"scores": act(tf.matmul(seq, self.w)), "total": tf.reduce_sum(seq, axis=-1)}

    module = Tiny()
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return path


def test_fp16_is_a_static_mlprogram_with_the_source_names(built: dict[str, Path]) -> None:
    check = check_coreml(built["fp16"])
    assert isinstance(check, CoreMLCheck)
    assert check.model_type == "mlProgram" and check.spec_version >= 7  # iOS16
    assert [(s.name, s.shape, s.dtype) for s in check.inputs] == [("image", (1, 8, 8, 1), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in check.outputs] == [("probs", (1, 10), "float32")]
    assert all(s.is_static for s in check.inputs + check.outputs)
    assert {"conv", "linear", "softmax"} <= set(check.ops) and list(check.ops) == sorted(set(check.ops))
    assert check.weight_dtypes == ("fp16",)
    assert 0.9 < check.weight_bytes / (188_234 * 2) < 1.1  # the Keras model has 188,234 parameters
    assert check.executed is False and "macOS" in check.note


def test_int8_weights_are_int8_and_smaller(built: dict[str, Path]) -> None:
    fp16, int8 = check_coreml(built["fp16"]), check_coreml(built["int8"])
    assert int8.weight_dtypes[0] == "int8" and "fp16" in int8.weight_dtypes
    assert "constexpr_affine_dequantize" in int8.ops and "constexpr_affine_dequantize" not in fp16.ops
    assert int8.weight_bytes < 0.6 * fp16.weight_bytes
    size = {k: sum(len(d) for _, d in coreml_files(p)) for k, p in built.items()}
    assert size["int8"] < 0.6 * size["fp16"]
    assert int8.inputs == fp16.inputs and int8.outputs == fp16.outputs


def test_two_conversions_give_identical_canonical_files(built: dict[str, Path]) -> None:
    first, second = coreml_files(built["fp16"]), coreml_files(built["fp16_again"])
    assert [p for p, _ in first] == sorted(p for p, _ in first)
    assert "Manifest.json" in dict(first) and any(p.endswith("weight.bin") for p, _ in first)
    assert first == second
    # the package on disk is already canonical: the files are what coreml_files returns
    assert all((built["fp16"] / rel).read_bytes() == data for rel, data in first)
    assert b"conversion_date" not in dict(first)["Data/com.apple.CoreML/model.mlmodel"]


def test_canonical_files_load_again(built: dict[str, Path], tmp_path: Path) -> None:
    import coremltools as ct

    copy = _write(coreml_files(built["int8"]), tmp_path / "copy.mlpackage")
    assert check_coreml(copy) == check_coreml(built["int8"])
    spec = ct.utils.load_spec(str(copy))  # coremltools' own package reader accepts the rewritten manifest
    assert spec.WhichOneof("Type") == "mlProgram"
    assert coreml_files(copy) == coreml_files(built["int8"])


def test_savedmodel_dynamic_dims_need_input_shapes(tmp_path: Path) -> None:
    source = _savedmodel(tmp_path / "tiny", seq_shape=(None, None, 4))
    out = tmp_path / "tiny.mlpackage"
    with pytest.raises(DataError, match="'seq'"):
        tf_to_coreml(source, ModelFormat.SAVEDMODEL, out, precision=Precision.FP16)
    assert not out.exists() and _leftovers(tmp_path) == []
    with pytest.raises(DataError, match="does not fit"):
        tf_to_coreml(source, ModelFormat.SAVEDMODEL, out, precision=Precision.FP16, input_shapes={"seq": (1, 5, 3)})
    tf_to_coreml(source, ModelFormat.SAVEDMODEL, out, precision=Precision.FP16, input_shapes={"seq": (1, 5, 4)})
    check = check_coreml(out)
    assert [(s.name, s.shape) for s in check.inputs] == [("seq", (1, 5, 4))]
    assert [(s.name, s.shape) for s in check.outputs] == [("scores", (1, 5, 3)), ("total", (1, 5))]


def test_unsupported_op_is_named_and_keeps_the_old_package(built: dict[str, Path], tmp_path: Path) -> None:
    source = _savedmodel(tmp_path / "lgamma", seq_shape=(None, 2, 4), op="lgamma")
    out = tmp_path / "model.mlpackage"
    shutil.copytree(built["fp16"], out)
    with pytest.raises(UnsupportedOpError, match=r"Lgamma.*ios") as caught:
        tf_to_coreml(source, ModelFormat.SAVEDMODEL, out, precision=Precision.FP16, profile="ios")
    assert caught.value.op == "Lgamma" and caught.value.profile == "ios"
    assert coreml_files(out) == coreml_files(built["fp16"]) and _leftovers(tmp_path) == []


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.INT8, Precision.INT8_DYNAMIC])
def test_other_precisions_are_refused(digits: Path, tmp_path: Path, precision: Precision) -> None:
    out = tmp_path / "x.mlpackage"
    with pytest.raises(BuildError, match=precision.value):
        tf_to_coreml(digits, ModelFormat.KERAS, out, precision=precision, profile="ios")
    assert not out.exists()


def test_corrupt_sources_are_model_load_errors(tmp_path: Path) -> None:
    bad_keras = tmp_path / "bad.keras"
    bad_keras.write_bytes(b"PK\x03\x04 not really a zip")
    bad_saved = tmp_path / "bad_saved"
    bad_saved.mkdir()
    (bad_saved / "saved_model.pb").write_bytes(b"\x08\xff\xff garbage")
    for source, fmt in [(bad_keras, ModelFormat.KERAS), (bad_saved, ModelFormat.SAVEDMODEL)]:
        with pytest.raises(ModelLoadError):
            tf_to_coreml(source, fmt, tmp_path / "x.mlpackage", precision=Precision.FP16)
    with pytest.raises(ModelLoadError):
        tf_to_coreml(bad_keras, ModelFormat.ONNX, tmp_path / "x.mlpackage", precision=Precision.FP16)
    assert not (tmp_path / "x.mlpackage").exists() and _leftovers(tmp_path) == []


def test_malformed_packages_are_model_load_errors(built: dict[str, Path], tmp_path: Path) -> None:
    no_manifest = shutil.copytree(built["fp16"], tmp_path / "a.mlpackage")
    (no_manifest / "Manifest.json").unlink()
    truncated = shutil.copytree(built["fp16"], tmp_path / "b.mlpackage")
    weights = truncated / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    garbage = shutil.copytree(built["fp16"], tmp_path / "c.mlpackage")
    (garbage / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"\xff\xff\xff\xff")
    for package in (no_manifest, truncated, garbage, tmp_path / "missing.mlpackage"):
        with pytest.raises(ModelLoadError):
            check_coreml(package)
    with pytest.raises(ModelLoadError):
        coreml_files(no_manifest)
