"""Delta patches on real digits artifacts: byte-identical round trips, what they cost, what they refuse.

The artifacts are real ``edgeops build`` outputs: v1 from examples/digits/out, v2 "fine-tuned" by perturbing the
weights of the source model a little (head-only: the last Dense layer; full: every layer), as ONNX int8
(x86-gateway) and TFLite int8 (rpi4). The layout readers are checked against the TFLite schema and the LiteRT
interpreter, and against onnx.load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from edgeops.cli.main import main
from edgeops.delta import DeltaInfo, apply_delta, make_delta, read_patch_header
from edgeops.delta.layout import find_regions
from edgeops.errors import DeltaFormatError, IntegrityError, StorageError
from tests.support.artifacts import build_digits, repack

ONNX_PROFILE, TFLITE_PROFILE = "x86-gateway", "rpi4"
TP, PF = "tensor-planes-zstd", "zstd-patch-from"
DATA_FILES = ("calib.npz", "eval.npz", "eval_nchw.npz", "train.npz")

_PERTURB_KERAS = """
import sys
import numpy as np
import keras

src, out = sys.argv[1:3]
rng = np.random.default_rng(1)
model = keras.models.load_model(src)
for layer in model.layers:
    layer.set_weights([w + rng.normal(0, 0.02 * float(w.std()) + 1e-4, w.shape).astype(w.dtype)
                       for w in layer.get_weights()])
model.save(out)
"""


def _perturb_onnx(src: Path, dst: Path, *, head_only: bool) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    rng = np.random.default_rng(2)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        is_head = w.shape in ((128, 10), (10,))  # the last Dense layer of the digits CNN
        if w.dtype != np.float32 or w.size < 10 or (head_only and not is_head):
            continue
        moved = (w + rng.normal(0, 0.02 * float(w.std()) + 1e-4, w.shape)).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(moved, init.name))
    onnx.save(model, str(dst))


def _variant_dir(root: Path, digits: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    for f in DATA_FILES:
        (d / f).symlink_to(digits / f)
    return d


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path, keys_dir: Path) -> dict[str, Path]:
    """v1, v2-head, v2-full (ONNX int8) and v1, v2-full (TFLite int8) artifacts, and v1 with a new version.

    The builds run in two threads (each build is a child process), so the slow TFLite chain overlaps the rest.
    """
    root = tmp_path_factory.mktemp("delta")
    key = keys_dir / "signing.key"
    head, full = _variant_dir(root, digits_dir, "head"), _variant_dir(root, digits_dir, "full")
    _perturb_onnx(digits_dir / "digits.onnx", head / "digits.onnx", head_only=True)
    _perturb_onnx(digits_dir / "digits.onnx", full / "digits.onnx", head_only=False)
    out = root / "out"
    both = (ONNX_PROFILE, TFLITE_PROFILE)

    def v1_and_head() -> tuple[dict[str, Path], dict[str, Path]]:
        v1 = build_digits(digits_dir, out / "v1", key, "1.0.0", profiles=both)
        return v1, build_digits(head, out / "head", key, "2.0.0", profiles=(ONNX_PROFILE,))

    def full_finetune() -> dict[str, Path]:
        subprocess.run(
            [sys.executable, "-c", _PERTURB_KERAS, str(digits_dir / "digits.keras"), str(full / "digits.keras")],
            check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )  # fmt: skip
        return build_digits(full, out / "full", key, "2.0.0", profiles=both)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(v1_and_head), pool.submit(full_finetune)
        (v1, v2_head), v2_full = first.result(), second.result()

    def bump(doc: dict[str, Any]) -> None:
        doc["version"] = "1.0.1"

    return {
        "onnx_v1": v1[ONNX_PROFILE],
        "onnx_head": v2_head[ONNX_PROFILE],
        "onnx_full": v2_full[ONNX_PROFILE],
        "onnx_v1_bumped": repack(v1[ONNX_PROFILE], root / "bumped.edgeops", key, manifest=bump),
        "tflite_v1": v1[TFLITE_PROFILE],
        "tflite_full": v2_full[TFLITE_PROFILE],
    }


def _delta(arts: dict[str, Path], tmp_path: Path, old: str, new: str) -> tuple[DeltaInfo, Path]:
    patch = tmp_path / f"{old}-{new}.patch"
    return make_delta(arts[old], arts[new], patch), patch


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("onnx_v1", "onnx_head"),
        ("onnx_v1", "onnx_full"),
        ("onnx_full", "onnx_v1"),  # a rollback is a delta too
        ("tflite_v1", "tflite_full"),
        ("tflite_v1", "onnx_v1"),  # another format: tensors pair by position only
    ],
)
def test_round_trip_is_byte_identical(arts: dict[str, Path], tmp_path: Path, old: str, new: str) -> None:
    info, patch = _delta(arts, tmp_path, old, new)
    new_bytes = arts[new].read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    sha = apply_delta(arts[old], patch, out_dir / "new.edgeops", expected_sha256=info.new_sha256)
    assert (out_dir / "new.edgeops").read_bytes() == new_bytes
    assert sha == info.new_sha256 == hashlib.sha256(new_bytes).hexdigest()
    assert _leftovers(out_dir) == ["new.edgeops"]  # no temp file
    assert info.patch_size == patch.stat().st_size == min(info.candidates.values()) == info.candidates[info.codec]
    header = read_patch_header(patch)
    assert (header.codec, header.old_size, header.new_size) == (info.codec, info.old_size, info.new_size)
    assert header.old_sha256 == hashlib.sha256(arts[old].read_bytes()).hexdigest()


def test_unchanged_tensors_cost_nothing(arts: dict[str, Path], tmp_path: Path) -> None:
    info, _ = _delta(arts, tmp_path, "onnx_v1", "onnx_v1_bumped")
    assert info.codec == TP
    assert info.aligned_bytes > 0.8 * info.new_size
    assert info.patch_size < 2048, info  # a new manifest.json version and signature, every tensor a COPY


def test_head_only_finetune_costs_far_less_than_full(arts: dict[str, Path], tmp_path: Path) -> None:
    head, _ = _delta(arts, tmp_path, "onnx_v1", "onnx_head")
    full, _ = _delta(arts, tmp_path, "onnx_v1", "onnx_full")
    assert head.patch_size * 5 < full.patch_size, (head, full)


@pytest.mark.parametrize(("old", "new"), [("onnx_v1", "onnx_full"), ("tflite_v1", "tflite_full")])
def test_model_aware_codec_beats_patch_from_on_a_full_finetune(
    arts: dict[str, Path], tmp_path: Path, old: str, new: str
) -> None:
    info, _ = _delta(arts, tmp_path, old, new)
    assert info.codec == TP
    assert info.aligned_bytes > 0.8 * info.new_size
    assert info.candidates[TP] < 0.8 * info.candidates[PF], info.candidates


def _tflite_schema() -> ModuleType:
    """tensorflow/lite/python/schema_py_generated.py, loaded by path (flatbuffers only, no TensorFlow import)."""
    spec = importlib.util.find_spec("tensorflow")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "lite" / "python" / "schema_py_generated.py"
    module_spec = importlib.util.spec_from_file_location("tflite_schema_py_generated", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _member(artifact: Path, name: str) -> tuple[int, bytes]:
    with tarfile.open(artifact) as tar:
        info = tar.getmember(name)
        f = tar.extractfile(info)
        assert f is not None
        return info.offset_data, f.read()


def test_tflite_regions_agree_with_the_schema_and_the_interpreter(arts: dict[str, Path]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    schema = _tflite_schema()
    base, model_bytes = _member(arts["tflite_v1"], "model.tflite")
    artifact = arts["tflite_v1"].read_bytes()
    regions = {r.key: r for r in find_regions(artifact) if r.key.startswith("model.tflite:")}
    model = schema.Model.GetRootAsModel(model_bytes, 0)
    subgraph = model.Subgraphs(0)
    interpreter = Interpreter(model_content=model_bytes)
    seen: set[int] = set()
    checked = 0
    for i in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(i)
        buffer = model.Buffers(tensor.Buffer())
        if tensor.Buffer() == 0 or buffer.DataLength() == 0 or tensor.Buffer() in seen:
            continue
        seen.add(tensor.Buffer())
        region = regions[f"model.tflite:{tensor.Name().decode()}"]
        data = buffer.DataAsNumpy().tobytes()
        assert artifact[region.offset : region.offset + region.length] == data
        assert region.offset - base >= 0 and model_bytes[region.offset - base :][: len(data)] == data
        array = interpreter.get_tensor(i)
        assert array.tobytes() == data and region.elem_size == array.dtype.itemsize
        checked += 1
    assert checked >= 10  # conv and dense weights and biases of the digits CNN
    buffers_with_data = sum(1 for b in range(model.BuffersLength()) if model.Buffers(b).DataLength())
    assert len(regions) == buffers_with_data  # metadata buffers too (keyed buffer#N)


@pytest.mark.parametrize("source", ["fp32", "int8"])
def test_onnx_regions_agree_with_onnx_load(arts: dict[str, Path], digits_dir: Path, source: str) -> None:
    import onnx
    from onnx import numpy_helper

    if source == "fp32":  # the bare source model
        data, prefix, base = (digits_dir / "digits.onnx").read_bytes(), "", 0
        container = data
    else:  # the quantized model inside the artifact: offsets are the artifact's
        base, data = _member(arts["onnx_v1"], "model.onnx")
        prefix, container = "model.onnx:", arts["onnx_v1"].read_bytes()
    regions = {r.key: r for r in find_regions(container)}
    initializers = onnx.load_from_string(data).graph.initializer
    assert len(initializers) >= 8
    for init in initializers:
        array = numpy_helper.to_array(init)
        if not init.raw_data and not init.float_data:  # varint-packed (int32_data...): no fixed-width bytes
            assert prefix + init.name not in regions
            continue
        region = regions[prefix + init.name]
        assert container[region.offset : region.offset + region.length] == array.tobytes(), init.name
        assert region.elem_size == array.dtype.itemsize
        assert region.offset >= base


def test_wrong_base_is_refused_naming_the_base_hash(arts: dict[str, Path], tmp_path: Path) -> None:
    info, patch = _delta(arts, tmp_path, "onnx_v1", "onnx_full")
    with pytest.raises(DeltaFormatError, match=info.old_sha256):
        apply_delta(arts["onnx_head"], patch, tmp_path / "out.edgeops")
    assert not (tmp_path / "out.edgeops").exists()


def test_unexpected_target_hash_is_refused(arts: dict[str, Path], tmp_path: Path) -> None:
    _, patch = _delta(arts, tmp_path, "onnx_v1", "onnx_head")
    with pytest.raises(IntegrityError):
        apply_delta(arts["onnx_v1"], patch, tmp_path / "out.edgeops", expected_sha256="ab" * 32)
    assert not (tmp_path / "out.edgeops").exists()


@pytest.mark.parametrize("pair", [("onnx_v1", "onnx_full"), ("tflite_v1", "onnx_v1")])
def test_truncated_or_flipped_patches_are_refused_and_leave_nothing(
    arts: dict[str, Path], tmp_path: Path, pair: tuple[str, str]
) -> None:
    _, patch = _delta(arts, tmp_path, *pair)
    good = patch.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "new.edgeops"
    for cut in (0, 10, 123, 200, len(good) // 2, len(good) - 1, len(good) + 1):
        patch.write_bytes((good + b"\0")[:cut])
        with pytest.raises(DeltaFormatError):
            apply_delta(arts[pair[0]], patch, out)
        assert _leftovers(out_dir) == []
    rng = np.random.default_rng(3)
    refused = 0
    for i in [5, 20, 40, 70, 100, 140, 160, *rng.integers(124, len(good), 40)]:
        flipped = bytearray(good)
        flipped[int(i)] ^= 1 << int(rng.integers(0, 8))
        patch.write_bytes(flipped)
        try:
            apply_delta(arts[pair[0]], patch, out)
        except (DeltaFormatError, IntegrityError):
            refused += 1
            assert _leftovers(out_dir) == []
        else:  # a bit zstd does not depend on (e.g. a larger window size): the output is still the right one
            assert out.read_bytes() == arts[pair[1]].read_bytes()
            out.unlink()
    assert refused >= 40


def test_output_directory_that_cannot_be_written_is_a_storage_error(arts: dict[str, Path], tmp_path: Path) -> None:
    _, patch = _delta(arts, tmp_path, "onnx_v1", "onnx_head")
    with pytest.raises(StorageError):
        apply_delta(arts["onnx_v1"], patch, tmp_path / "missing" / "new.edgeops")


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from edgeops.delta import apply_delta
from edgeops.errors import StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    apply_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
except StorageError as exc:
    print("StorageError:", exc)
"""


def test_disk_full_during_apply_is_a_storage_error_and_leaves_nothing(arts: dict[str, Path], tmp_path: Path) -> None:
    _, patch = _delta(arts, tmp_path, "onnx_v1", "onnx_full")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(arts["onnx_v1"]), str(patch), str(out_dir / "new.edgeops")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert run.stdout.startswith("StorageError: cannot write"), run.stdout + run.stderr
    assert _leftovers(out_dir) == []


def test_cli_make_apply_info_round_trip(
    arts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    patch, out = tmp_path / "v2.patch", tmp_path / "v2.edgeops"
    assert main(["delta", "make", str(arts["onnx_v1"]), str(arts["onnx_full"]), "-o", str(patch), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["codec"] == TP and made["patch_size"] == patch.stat().st_size and TP in made["candidates"]
    assert main(["delta", "info", str(patch), "--json"]) == 0
    header = json.loads(capsys.readouterr().out)
    assert header["new_sha256"] == made["new_sha256"] and header["old_size"] == made["old_size"]
    args = ["delta", "apply", str(arts["onnx_v1"]), str(patch), "-o", str(out)]
    assert main([*args, "--expect-sha256", made["new_sha256"], "--json"]) == 0
    applied = json.loads(capsys.readouterr().out)
    assert applied["sha256"] == made["new_sha256"] and out.read_bytes() == arts["onnx_full"].read_bytes()
    assert main(["delta", "make", str(arts["onnx_v1"]), str(arts["onnx_head"]), "-o", str(patch)]) == 0
    text = capsys.readouterr().out
    assert "tensor-planes-zstd" in text and "aligned" in text


def test_cli_errors_are_one_line(arts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    patch = tmp_path / "v2.patch"
    assert main(["delta", "make", str(arts["onnx_v1"]), str(arts["onnx_head"]), "-o", str(patch)]) == 0
    capsys.readouterr()
    assert main(["delta", "apply", str(arts["onnx_full"]), str(patch), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgeops: error: ") and "not the base of this patch" in err and err.count("\n") == 1
    assert main(["delta", "info", str(tmp_path / "nope.patch")]) == 1
    assert "no such file" in capsys.readouterr().err
