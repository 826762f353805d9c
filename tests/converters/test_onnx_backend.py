"""converters.onnx_backend against real tf2onnx / onnxruntime (CPUExecutionProvider) on the digits example.

Precision changes (fp16, int8) are tested in test_onnx_quantize.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from converters import onnx_backend as ob
from converters.model_types import ModelFormat
from edgeops.errors import DataError, ModelLoadError, UnsupportedOpError


def run(path: Path, x: np.ndarray, name: str = "image") -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {name: x})[0])


def only_out(tmp: Path, out: Path) -> None:
    """Nothing was left behind: neither ``out`` nor a temp file in its folder."""
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(f".{out.name}.")]


# ----------------------------------------------------------------------------------------------- read


def test_read_onnx_io_reports_names_dynamic_batch_and_dtypes(digits_dir: Path) -> None:
    inputs, outputs = ob.read_onnx_io(digits_dir / "digits.onnx")
    assert [(s.name, s.shape, s.dtype) for s in inputs] == [("image", (None, 1, 8, 8), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in outputs] == [("probs", (None, 10), "float32")]


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\xff" * 10])
def test_corrupt_file_is_a_one_line_model_load_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        ob.read_onnx_io(bad)
    assert "bad.onnx" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelLoadError):
        ob.check_onnx_runnable(bad)
    with pytest.raises(ModelLoadError):
        ob.read_onnx_io(tmp_path / "missing.onnx")


# ----------------------------------------------------------------------------------------------- tf -> onnx


@pytest.fixture(scope="module")
def keras_onnx(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tf2onnx")
    ob.tf_to_onnx(digits_dir / "digits.keras", ModelFormat.KERAS, tmp / "a.onnx")
    ob.tf_to_onnx(digits_dir / "digits.keras", ModelFormat.KERAS, tmp / "b.onnx")
    return tmp / "a.onnx", tmp / "b.onnx"


def test_tf_to_onnx_keeps_names_layout_and_matches_keras(digits_dir: Path, keras_onnx: tuple[Path, Path]) -> None:
    import keras

    inputs, outputs = ob.read_onnx_io(keras_onnx[0])
    assert [(s.name, s.shape) for s in inputs] == [("image", (None, 8, 8, 1))]  # NHWC kept, batch dynamic
    assert [(s.name, s.shape) for s in outputs] == [("probs", (None, 10))]
    x = np.load(digits_dir / "eval.npz")["x"].astype(np.float32)
    expected = keras.models.load_model(digits_dir / "digits.keras", compile=False).predict(x, verbose=0)
    assert np.abs(run(keras_onnx[0], x) - expected).max() < 1e-4
    assert np.abs(run(keras_onnx[0], x[:1]) - expected[:1]).max() < 1e-4


def test_tf_to_onnx_is_deterministic(keras_onnx: tuple[Path, Path]) -> None:
    assert keras_onnx[0].read_bytes() == keras_onnx[1].read_bytes()


def test_tf_to_onnx_from_savedmodel(digits_dir: Path, tmp_path: Path) -> None:
    import keras

    model = keras.models.load_model(digits_dir / "digits.keras", compile=False)
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    ob.tf_to_onnx(tmp_path / "sm", ModelFormat.SAVEDMODEL, tmp_path / "sm.onnx")
    inputs, outputs = ob.read_onnx_io(tmp_path / "sm.onnx")
    assert inputs[0].shape == (None, 8, 8, 1) and ":" not in inputs[0].name + outputs[0].name
    x = np.load(digits_dir / "eval.npz")["x"].astype(np.float32)
    got = run(tmp_path / "sm.onnx", x, inputs[0].name)
    assert np.abs(got - model.predict(x, verbose=0)).max() < 1e-4


def test_tf_to_onnx_corrupt_keras_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelLoadError):
        ob.tf_to_onnx(bad, ModelFormat.KERAS, tmp_path / "out.onnx")
    only_out(tmp_path, tmp_path / "out.onnx")


# ----------------------------------------------------------------------------------------------- shapes


def test_fix_input_shapes_makes_inputs_and_outputs_static(digits_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "static.onnx"
    ob.fix_onnx_input_shapes(digits_dir / "digits.onnx", out, {"image": (1, 1, 8, 8)})
    inputs, outputs = ob.read_onnx_io(out)
    assert inputs[0].shape == (1, 1, 8, 8) and outputs[0].shape == (1, 10)
    x = np.load(digits_dir / "eval_nchw.npz")["x"][:1].astype(np.float32)
    assert np.allclose(run(out, x), run(digits_dir / "digits.onnx", x), atol=1e-6)


@pytest.mark.parametrize("shapes", [{"pixels": (1, 1, 8, 8)}, {"image": (1, 8, 8)}, {"image": (1, 3, 8, 8)}])
def test_fix_input_shapes_rejects_unknown_or_conflicting(digits_dir: Path, tmp_path: Path, shapes: dict) -> None:
    with pytest.raises(DataError):
        ob.fix_onnx_input_shapes(digits_dir / "digits.onnx", tmp_path / "x.onnx", shapes)
    only_out(tmp_path, tmp_path / "x.onnx")


# ----------------------------------------------------------------------------------------------- runnable


def tiny_model(path: Path, op: str, domain: str, elem_type: int) -> Path:
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], domain=domain, name="n0")],
        "tiny",
        [helper.make_tensor_value_info("x", elem_type, [2])],
        [helper.make_tensor_value_info("y", elem_type, [2])],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path.write_bytes(helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString())
    return path


def test_custom_op_without_cpu_kernel_is_unsupported_op(tmp_path: Path) -> None:
    from onnx import TensorProto

    model = tiny_model(tmp_path / "custom.onnx", "FooBar", "com.example", TensorProto.FLOAT)
    with pytest.raises(UnsupportedOpError) as info:
        ob.check_onnx_runnable(model, profile="rpi4-onnx")
    assert info.value.op == "FooBar" and info.value.profile == "rpi4-onnx"
    assert "FooBar" in str(info.value) and "rpi4-onnx" in str(info.value)


def test_standard_op_without_kernel_for_dtype_is_unsupported_op(tmp_path: Path) -> None:
    from onnx import TensorProto

    model = tiny_model(tmp_path / "sqrt.onnx", "Sqrt", "", TensorProto.BFLOAT16)
    with pytest.raises(UnsupportedOpError) as info:
        ob.check_onnx_runnable(model)
    assert info.value.op == "Sqrt"


def test_digits_model_is_runnable(digits_dir: Path) -> None:
    ob.check_onnx_runnable(digits_dir / "digits.onnx")
