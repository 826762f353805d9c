"""Applying a delta is bounded in memory: peak RSS growth stays under old + new + 16 MiB, and far under it when
the tensors align.

Measured in a child process by its VmHWM (the peak RSS of its own address space): ``ru_maxrss`` would not do,
since Linux carries the parent's peak across fork and exec and pytest's is far larger than what is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeops.delta import make_delta

MIB = 1 << 20
SIZE = 30 * MIB

_APPLY = """
import json, sys
from pathlib import Path
import numpy, zstandard
import edgeops.delta

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

before = peak_rss()
sha = edgeops.delta.apply_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
print(json.dumps({"sha256": sha, "growth": peak_rss() - before, "before": before}))
"""


def _apply_growth(old: Path, patch: Path, out: Path) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", _APPLY, str(old), str(patch), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    return str(doc["sha256"]), int(doc["growth"])


def _weights(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    old = rng.normal(0, 0.05, n).astype(np.float32)
    new = (old + rng.normal(0, 5e-4, n)).astype(np.float32)  # a full fine-tune: every weight moves a little
    return old, new


def _onnx_model(path: Path, tensors: list[np.ndarray]) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(t, f"w{i}") for i, t in enumerate(tensors)]
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"y{i}"]) for i in range(len(tensors))]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, list(t.shape)) for i, t in enumerate(tensors)]
    graph = helper.make_graph(nodes, "weights", [], outputs, initializer=inits)
    onnx.save(helper.make_model(graph), str(path))


@pytest.mark.parametrize("kind", ["bare-floats", "onnx"])
def test_apply_peak_memory_is_bounded(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(5)
    old_w, new_w = _weights(rng, SIZE // 4)
    old, new, patch = tmp_path / "old.bin", tmp_path / "new.bin", tmp_path / "p.patch"
    if kind == "onnx":
        _onnx_model(old, list(old_w.reshape(6, -1, 256)))
        _onnx_model(new, list(new_w.reshape(6, -1, 256)))
    else:
        old.write_bytes(old_w.tobytes())
        new.write_bytes(new_w.tobytes())
    info = make_delta(old, new, patch, level=3)
    assert info.codec == ("tensor-planes-zstd" if kind == "onnx" else "zstd-patch-from")
    sha, growth = _apply_growth(old, patch, tmp_path / "out.bin")
    assert sha == info.new_sha256
    assert (tmp_path / "out.bin").read_bytes() == new.read_bytes()
    assert growth < info.old_size + info.new_size + 16 * MIB, growth / MIB
    if kind == "onnx":  # tensor by tensor: a few copies of one op, nothing proportional to the files
        assert growth < 24 * MIB, growth / MIB
