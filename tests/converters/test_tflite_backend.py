"""Keras / SavedModel → TFLite: every precision runs in real LiteRT and agrees with Keras; bad inputs fail clearly."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.model_types import ModelFormat, Precision
from converters.tflite_backend import tf_to_tflite
from edgeops.errors import DataError, ModelLoadError, UnsupportedOpError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[2]
ALL_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8_DYNAMIC, Precision.INT8)
MIN_AGREEMENT = {Precision.FP32: 1.0, Precision.FP16: 0.99, Precision.INT8_DYNAMIC: 0.98, Precision.INT8: 0.98}


class Digits:
    """A small digits CNN trained for this module, its data and its Keras predictions."""

    def __init__(self, root: Path) -> None:
        import keras

        from examples.digits.train import SEED, build_model, load_digits_split

        keras.utils.set_random_seed(SEED)
        x_tr, y_tr, self.x_eval, _ = load_digits_split()
        model = build_model()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(x_tr, y_tr, epochs=3, batch_size=32, verbose=0)
        self.keras_path = root / "digits.keras"
        model.save(self.keras_path)
        self.calib = {"image": x_tr[:300]}
        self.keras_probs = np.asarray(model.predict(self.x_eval, verbose=0))
        self.root = root
        self._converted: dict[Precision, Path] = {}

    def tflite(self, precision: Precision) -> Path:
        """The digits model converted at ``precision`` (converted once per test module)."""
        if precision not in self._converted:
            out = self.root / f"digits_{precision.value}.tflite"
            tf_to_tflite(self.keras_path, ModelFormat.KERAS, out, precision=precision, calib=self.calib)
            self._converted[precision] = out
        return self._converted[precision]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return Digits(tmp_path_factory.mktemp("digits"))


def _interpreter(path: Path) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    return interp


def _litert_probs(path: Path, x: np.ndarray) -> np.ndarray:
    """Run every sample through the ``serving_default`` signature, one at a time (batch 1)."""
    runner = _interpreter(path).get_signature_runner("serving_default")
    return np.concatenate([runner(image=sample[None].astype(np.float32))["probs"] for sample in x])


@pytest.mark.parametrize("precision", ALL_PRECISIONS, ids=lambda p: p.value)
def test_each_precision_runs_in_litert_and_agrees_with_keras(digits: Digits, precision: Precision) -> None:
    path = digits.tflite(precision)
    interp = _interpreter(path)
    assert interp.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["probs"]}}
    (inp,) = interp.get_input_details()
    assert list(inp["shape"]) == [1, 8, 8, 1] and list(inp["shape_signature"]) == [1, 8, 8, 1]
    assert inp["dtype"] == np.float32
    probs = _litert_probs(path, digits.x_eval)
    agreement = float(np.mean(probs.argmax(1) == digits.keras_probs.argmax(1)))
    assert agreement >= MIN_AGREEMENT[precision], f"{precision.value}: top-1 agreement {agreement:.4f}"
    if precision is Precision.FP32:
        np.testing.assert_allclose(probs, digits.keras_probs, atol=1e-5)


def test_int8_is_small_and_really_int8(digits: Digits) -> None:
    fp32, int8 = digits.tflite(Precision.FP32), digits.tflite(Precision.INT8)
    assert int8.stat().st_size <= 0.3 * fp32.stat().st_size
    interp = _interpreter(int8)
    details = interp.get_tensor_details()
    io = {interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]}
    float_tensors = {d["index"] for d in details if d["dtype"] == np.float32}
    assert float_tensors == io, "only the float I/O tensors (quantize/dequantize ends) may be float32"
    weights = [
        d
        for d in details
        if d["dtype"] == np.int8 and len(d["shape"]) in (2, 4) and d["quantization_parameters"]["scales"].size > 1
    ]
    assert len(weights) >= 5, "conv and dense weights are int8, quantised per channel"
    assert all(d["dtype"] in (np.int8, np.int32) for d in details if d["index"] not in io)


def test_int8_io_gives_int8_tensors_with_scale_and_zero_point(digits: Digits, tmp_path: Path) -> None:
    out = tmp_path / "io.tflite"
    tf_to_tflite(digits.keras_path, ModelFormat.KERAS, out, precision=Precision.INT8, calib=digits.calib, int8_io=True)
    interp = _interpreter(out)
    (inp,), (outp,) = interp.get_input_details(), interp.get_output_details()
    assert inp["dtype"] == np.int8 and outp["dtype"] == np.int8
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = outp["quantization"]
    assert in_scale > 0 and out_scale > 0 and -128 <= in_zero <= 127
    runner = interp.get_signature_runner("serving_default")
    top = []
    for sample in digits.x_eval:
        q = np.clip(np.round(sample[None] / in_scale + in_zero), -128, 127).astype(np.int8)
        top.append(int(np.argmax((runner(image=q)["probs"].astype(np.float32) - out_zero) * out_scale)))
    assert np.mean(np.array(top) == digits.keras_probs.argmax(1)) >= 0.98


def test_per_channel_off_quantises_weights_per_tensor(digits: Digits, tmp_path: Path) -> None:
    out = tmp_path / "per_tensor.tflite"
    tf_to_tflite(
        digits.keras_path, ModelFormat.KERAS, out, precision=Precision.INT8, calib=digits.calib, per_channel=False
    )
    weights = [
        d
        for d in _interpreter(out).get_tensor_details()
        if d["dtype"] == np.int8 and len(d["shape"]) == 4 and d["shape"][0] == 32
    ]
    assert weights and all(d["quantization_parameters"]["scales"].size == 1 for d in weights)


def test_conversion_is_deterministic_in_one_process(digits: Digits, tmp_path: Path) -> None:
    for precision in ALL_PRECISIONS:
        again = tmp_path / f"again_{precision.value}.tflite"
        tf_to_tflite(digits.keras_path, ModelFormat.KERAS, again, precision=precision, calib=digits.calib)
        assert again.read_bytes() == digits.tflite(precision).read_bytes(), precision.value


_CHILD = """
import sys, hashlib, numpy as np
from pathlib import Path
from converters.model_types import ModelFormat, Precision
from converters.tflite_backend import tf_to_tflite
src, calib, work = Path(sys.argv[1]), {"image": np.load(sys.argv[2])}, Path(sys.argv[3])
for p in Precision.FP32, Precision.FP16, Precision.INT8_DYNAMIC, Precision.INT8:
    out = work / (p.value + ".tflite")
    tf_to_tflite(src, ModelFormat.KERAS, out, precision=p, calib=calib)
    print(p.value, hashlib.sha256(out.read_bytes()).hexdigest())
"""


@pytest.mark.slow  # ~20 s: a second interpreter imports TensorFlow and converts four times
def test_conversion_is_deterministic_across_processes(digits: Digits, tmp_path: Path) -> None:
    np.save(tmp_path / "calib.npy", digits.calib["image"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(digits.keras_path), str(tmp_path / "calib.npy"), str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    child = dict(line.split() for line in done.stdout.splitlines() if line.strip())
    for precision in ALL_PRECISIONS:
        here = hashlib.sha256(digits.tflite(precision).read_bytes()).hexdigest()
        assert child[precision.value] == here, precision.value


def test_int8_without_calibration_is_a_data_error(digits: Digits, tmp_path: Path) -> None:
    out = tmp_path / "m.tflite"
    with pytest.raises(DataError, match=r"int8 needs calibration data \(--calib\)"):
        tf_to_tflite(digits.keras_path, ModelFormat.KERAS, out, precision=Precision.INT8)
    assert not out.exists()


def test_calibration_of_the_wrong_shape_names_input_and_shapes(digits: Digits, tmp_path: Path) -> None:
    out = tmp_path / "m.tflite"
    nchw = {"image": digits.calib["image"].transpose(0, 3, 1, 2)}
    with pytest.raises(DataError) as err:
        tf_to_tflite(digits.keras_path, ModelFormat.KERAS, out, precision=Precision.INT8, calib=nchw)
    assert "'image'" in str(err.value) and "(8, 8, 1)" in str(err.value) and "(300, 1, 8, 8)" in str(err.value)
    assert not out.exists()


def _saved_model(path: Path, fn: Any, spec: Any) -> Path:
    import tensorflow as tf

    module = tf.Module()
    module.f = tf.function(lambda x: {"y": fn(x)}, input_signature=[spec])
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.f.get_concrete_function()})
    return path


def test_op_outside_tflite_builtins_is_unsupported_and_leaves_nothing(tmp_path: Path) -> None:
    import tensorflow as tf

    src = _saved_model(tmp_path / "inv", tf.linalg.inv, tf.TensorSpec((None, 4, 4), tf.float32, name="x"))
    out = tmp_path / "inv.tflite"
    out.write_bytes(b"stale result of an earlier build")
    with pytest.raises(UnsupportedOpError, match="MatrixInverse") as err:
        tf_to_tflite(src, ModelFormat.SAVEDMODEL, out, precision=Precision.FP32, profile="coral")
    assert err.value.op == "MatrixInverse" and "coral" in str(err.value)
    assert not out.exists() and list(tmp_path.glob("*.tflite*")) == []
    tf_to_tflite(src, ModelFormat.SAVEDMODEL, out, precision=Precision.FP32, allow_select_tf_ops=True)
    assert out.stat().st_size > 0


def test_int8_refuses_an_op_the_converter_would_leave_in_float(tmp_path: Path) -> None:
    import tensorflow as tf

    src = _saved_model(
        tmp_path / "floor", lambda x: tf.math.floor(x * 4.0) + x, tf.TensorSpec((1, 4), tf.float32, name="x")
    )
    out = tmp_path / "floor.tflite"
    calib = {"x": np.linspace(0, 1, 40, dtype=np.float32).reshape(10, 4)}
    with pytest.raises(UnsupportedOpError, match="FLOOR") as err:
        tf_to_tflite(src, ModelFormat.SAVEDMODEL, out, precision=Precision.INT8, calib=calib, profile="coral")
    assert "coral" in str(err.value) and not out.exists()


def test_savedmodel_with_dynamic_dims_needs_input_shapes(tmp_path: Path) -> None:
    import tensorflow as tf

    src = _saved_model(
        tmp_path / "dyn", lambda x: tf.nn.relu(x) * 2.0, tf.TensorSpec((None, None, 4), tf.float32, name="seq")
    )
    out = tmp_path / "dyn.tflite"
    with pytest.raises(DataError, match="'seq'"):
        tf_to_tflite(src, ModelFormat.SAVEDMODEL, out, precision=Precision.FP32)
    with pytest.raises(DataError, match="'seq'"):
        tf_to_tflite(src, ModelFormat.SAVEDMODEL, out, precision=Precision.FP32, input_shapes={"seq": (1, 5, 3)})
    tf_to_tflite(src, ModelFormat.SAVEDMODEL, out, precision=Precision.FP32, input_shapes={"seq": (1, 5, 4)})
    interp = _interpreter(out)
    assert interp.get_signature_list() == {"serving_default": {"inputs": ["seq"], "outputs": ["y"]}}
    assert list(interp.get_input_details()[0]["shape_signature"]) == [1, 5, 4]
    x = np.linspace(-1, 1, 20, dtype=np.float32).reshape(1, 5, 4)
    np.testing.assert_allclose(interp.get_signature_runner()(seq=x)["y"], np.maximum(x, 0) * 2.0)


def test_keras_exported_savedmodel_converts_with_its_names(digits: Digits, tmp_path: Path) -> None:
    import keras

    src = tmp_path / "sm"
    keras.models.load_model(digits.keras_path).export(str(src), verbose=False)
    out = tmp_path / "sm.tflite"
    tf_to_tflite(src, ModelFormat.SAVEDMODEL, out, precision=Precision.FP32)
    interp = _interpreter(out)
    assert interp.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["output_0"]}}
    runner = interp.get_signature_runner()
    probs = np.concatenate([runner(image=s[None])["output_0"] for s in digits.x_eval[:50]])
    np.testing.assert_allclose(probs, digits.keras_probs[:50], atol=1e-5)


@pytest.mark.parametrize("fmt", [ModelFormat.KERAS, ModelFormat.SAVEDMODEL])
def test_corrupt_source_is_a_one_line_model_load_error(tmp_path: Path, fmt: ModelFormat) -> None:
    src = tmp_path / ("bad.keras" if fmt is ModelFormat.KERAS else "bad_sm")
    if fmt is ModelFormat.KERAS:
        src.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        src.mkdir()
        (src / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 10)
    out = tmp_path / "m.tflite"
    with pytest.raises(ModelLoadError) as err:
        tf_to_tflite(src, fmt, out, precision=Precision.FP32)
    assert str(src) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
