"""ONNX → SavedModel with onnx2tf: the TFLite made from it must compute what onnxruntime computes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.onnx2tf_backend import OnnxToTf, onnx_to_saved_model
from edgeops.errors import DataError, ModelLoadError, UnsupportedOpError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits" / "out"
CNN_SHAPE = (1, 3, 48, 64)


def _cnn_onnx(path: Path) -> Path:
    """An ordinary PyTorch-style CNN: dynamic N/H/W, Conv+BN+Relu, residual Add, MaxPool, GAP, Gemm, Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    inits: list[Any] = []

    def weight(name: str, *shape: int, scale: float = 0.3, offset: float = 0.0) -> str:
        value = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
        inits.append(numpy_helper.from_array(value, name))
        return name

    def conv_bn(prefix: str, x: str, cin: int, cout: int) -> list[Any]:
        bn_in = [
            weight(f"{prefix}.g", cout, offset=1.0),
            weight(f"{prefix}.b", cout),
            weight(f"{prefix}.m", cout),
            weight(f"{prefix}.v", cout, scale=0.1, offset=1.0),
        ]
        inits[-1] = numpy_helper.from_array(np.abs(numpy_helper.to_array(inits[-1])), f"{prefix}.v")
        return [
            helper.make_node(
                "Conv",
                [x, weight(f"{prefix}.w", cout, cin, 3, 3), weight(f"{prefix}.cb", cout)],
                [f"{prefix}.c"],
                pads=[1, 1, 1, 1],
                name=f"{prefix}_conv",
            ),
            helper.make_node("BatchNormalization", [f"{prefix}.c", *bn_in], [f"{prefix}.bn"], name=f"{prefix}_bn"),
        ]

    nodes = [
        *conv_bn("c1", "image", 3, 8),
        helper.make_node("Relu", ["c1.bn"], ["r1"]),
        *conv_bn("c2", "r1", 8, 8),
        helper.make_node("Add", ["c2.bn", "r1"], ["res"]),
        helper.make_node("Relu", ["res"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["mp"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", weight("fc.w", 10, 8), weight("fc.b", 10)], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    _torch_style_names(nodes)
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _torch_style_names(nodes: list[Any]) -> None:
    """Name nodes and inner tensors the way torch.onnx.export does ("/c1/Conv", "/c1/Conv_output_0")."""
    inner = {o for n in nodes for o in n.output} - {"probs"}
    for i, node in enumerate(nodes):
        node.name = f"/block{i}/{node.op_type}"
        node.input[:] = [f"/{t}_output_0" if t in inner else t for t in node.input]
        node.output[:] = [f"/{t}_output_0" if t in inner else t for t in node.output]


def _tflite(saved_model: Path) -> bytes:
    import tensorflow as tf

    return bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert())


def _run_tflite(model: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    runner = interpreter.get_signature_runner("serving_default")
    return {k: np.asarray(v) for k, v in runner(**feeds).items()}


def _run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def _tf_feeds(result: OnnxToTf, nchw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        name: np.transpose(nchw[name], result.input_transpose[name]) if name in result.input_transpose else nchw[name]
        for name in result.input_names
    }


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, OnnxToTf, bytes]]:
    """The CNN converted once, offline: any socket connect fails, and the cwd must stay empty."""
    base = tmp_path_factory.mktemp("cnn")
    onnx_path = _cnn_onnx(base / "cnn.onnx")
    cwd = base / "cwd"
    cwd.mkdir()
    mp = pytest.MonkeyPatch()

    def no_network(*_: object, **__: object) -> None:
        raise AssertionError("onnx_to_saved_model tried to open a network connection")

    mp.setattr(socket.socket, "connect", no_network)
    mp.chdir(cwd)
    try:
        result = onnx_to_saved_model(onnx_path, base / "out", input_shapes={"image": CNN_SHAPE})
    finally:
        mp.undo()
    assert list(cwd.iterdir()) == [], "onnx2tf left files in the working directory"
    yield onnx_path, result, _tflite(result.saved_model)


def test_cnn_tflite_matches_onnxruntime_on_nchw_data(cnn: tuple[Path, OnnxToTf, bytes]) -> None:
    onnx_path, result, model = cnn
    assert result.input_names == ("image",) and result.output_names == ("probs",)
    assert result.input_transpose == {"image": (0, 2, 3, 1)}
    x = np.random.default_rng(1).standard_normal(CNN_SHAPE).astype(np.float32)
    (want,) = _run_ort(onnx_path, {"image": x})
    got = _run_tflite(model, _tf_feeds(result, {"image": x}))
    assert list(got) == ["probs"]
    assert got["probs"].shape == (1, 10)
    assert float(np.max(np.abs(got["probs"] - want))) < 1e-4


def test_same_model_twice_gives_byte_identical_tflite(cnn: tuple[Path, OnnxToTf, bytes], tmp_path: Path) -> None:
    onnx_path, _, first = cnn
    again = onnx_to_saved_model(onnx_path, tmp_path / "again", input_shapes={"image": CNN_SHAPE})
    assert _tflite(again.saved_model) == first


def test_digits_tflite_matches_onnxruntime_on_a_batch(tmp_path: Path) -> None:
    onnx_path = DIGITS / "digits.onnx"
    if not onnx_path.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "examples/digits/train.py")],
            check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
    data = np.load(DIGITS / "eval_nchw.npz")
    x = data["x"][:32].astype(np.float32)
    result = onnx_to_saved_model(onnx_path, tmp_path, input_shapes={"image": x.shape})
    (want,) = _run_ort(onnx_path, {"image": x})
    got = _run_tflite(_tflite(result.saved_model), _tf_feeds(result, {"image": x}))["probs"]
    assert float(np.max(np.abs(got - want))) < 1e-4
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert float(np.mean(got.argmax(1) == data["y"][:32])) > 0.8


def test_dynamic_dims_not_given_is_a_data_error_naming_the_input(tmp_path: Path) -> None:
    onnx_path = _cnn_onnx(tmp_path / "cnn.onnx")
    with pytest.raises(DataError, match="image"):
        onnx_to_saved_model(onnx_path, tmp_path / "out", input_shapes={})
    with pytest.raises(DataError, match="image"):
        onnx_to_saved_model(onnx_path, tmp_path / "out", input_shapes={"image": (1, 4, 48, 64)})
    assert not (tmp_path / "out" / "saved_model").exists()


def test_shape_the_graph_cannot_take_is_a_data_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        "flatten64",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[helper.make_tensor("s", TensorProto.INT64, [2], [1, 64])],
    )
    path = tmp_path / "r.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(DataError, match=r"\(1, 1, 9, 9\)"):
        onnx_to_saved_model(path, tmp_path / "out", input_shapes={"x": (1, 1, 9, 9)})


def test_corrupt_file_is_a_model_load_error(tmp_path: Path) -> None:
    good = (DIGITS / "digits.onnx").read_bytes() if (DIGITS / "digits.onnx").exists() else b"\x08\x07" * 500
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good[: len(good) // 3] + b"\xff" * 64)
    with pytest.raises(ModelLoadError):
        onnx_to_saved_model(bad, tmp_path / "out", input_shapes={"image": (1, 1, 8, 8)})
    with pytest.raises(ModelLoadError):
        onnx_to_saved_model(tmp_path / "missing.onnx", tmp_path / "out", input_shapes={})


def test_op_onnx2tf_cannot_convert_is_named(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("LpPool", ["x"], ["y"], kernel_shape=[2, 2], p=2)],
        "lp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 7, 7])],
    )
    path = tmp_path / "lp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(UnsupportedOpError, match="LpPool") as info:
        onnx_to_saved_model(path, tmp_path / "out", input_shapes={})
    assert info.value.op == "LpPool"


def test_two_inputs_with_pytorch_style_names_keep_their_names(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input.1"], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
            helper.make_node("Add", ["flat", "meta"], ["/head/out"]),
        ],
        "two",
        [
            helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 2, 4, 4]),
            helper.make_tensor_value_info("meta", TensorProto.FLOAT, ["N", 2]),
        ],
        [helper.make_tensor_value_info("/head/out", TensorProto.FLOAT, ["N", 2])],
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    result = onnx_to_saved_model(path, tmp_path / "out", input_shapes={"input.1": (3, 2, 4, 4), "meta": (3, 2)})
    assert result.input_names == ("input.1", "meta")
    assert result.input_transpose == {"input.1": (0, 2, 3, 1)}
    (out_key,) = result.output_names
    rng = np.random.default_rng(3)
    feeds = {"input.1": rng.random((3, 2, 4, 4), dtype=np.float32), "meta": rng.random((3, 2), dtype=np.float32)}
    (want,) = _run_ort(path, feeds)
    got = _run_tflite(_tflite(result.saved_model), _tf_feeds(result, feeds))
    assert list(got) == [out_key]
    assert float(np.max(np.abs(got[out_key] - want))) < 1e-5
