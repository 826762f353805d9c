"""Test artifacts: real digits builds, and re-signed variants that model a broken build or an attacker.

``build_digits`` runs the real ``edgeops build``. ``repack`` rewrites an artifact's files and/or manifest and
signs it again with the given key, as a broken build (or a stolen key) would — the result is structurally valid
and correctly signed, so only the agent's own checks (load, golden, latency) can catch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeops.artifact import MANIFEST_NAME, SIGNATURE_NAME, pack_artifact, read_members, sign_manifest
from edgeops.signing import load_private_key

ROOT = Path(__file__).resolve().parents[2]


def build_digits(digits: Path, out: Path, key: Path, version: str, *, profiles: tuple[str, ...]) -> dict[str, Path]:
    """Build the digits example for ``profiles`` (ONNX source for ONNX profiles, Keras for TFLite ones)."""
    onnx = [p for p in profiles if p in ("x86-gateway", "jetson-orin-nano")]
    keras = [p for p in profiles if p not in onnx]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for model, calib, group in (
        (digits / "digits.onnx", digits / "eval_nchw.npz", onnx),
        (digits / "digits.keras", digits / "calib.npz", keras),
    ):
        if not group:
            continue
        eval_ = digits / ("eval_nchw.npz" if model.suffix == ".onnx" else "eval.npz")
        args = [sys.executable, "-m", "edgeops.cli.main", "build", str(model), "--calib", str(calib)]
        args += ["--eval", str(eval_), "--key", str(key), "--version", version, "--out", str(out)]
        for p in group:
            args += ["--profile", p]
        subprocess.run(args, check=True, capture_output=True, env=env, cwd=ROOT)
    return {p: out / f"digits-{version}-{p}.edgeops" for p in profiles}


def read_files(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    with path.open("rb") as f:
        members = read_members(f)
        data = {}
        for m in members:
            f.seek(m.offset)
            data[m.name] = f.read(m.size)
    manifest = json.loads(data.pop(MANIFEST_NAME))
    data.pop(SIGNATURE_NAME)
    return manifest, data


def repack(
    src: Path,
    dst: Path,
    key: Path,
    *,
    files: Callable[[dict[str, bytes]], None] | None = None,
    manifest: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Copy ``src`` to ``dst`` with ``files``/``manifest`` changed in place, hashes updated, re-signed by ``key``."""
    doc, data = read_files(src)
    if files is not None:
        files(data)
    doc["files"] = [
        {"path": n, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in sorted(data.items())
    ]
    if manifest is not None:
        manifest(doc)
    raw = (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()
    dst.write_bytes(pack_artifact(raw, sign_manifest(raw, load_private_key(key)), data))
    return dst


def add_runtime_trap(model: bytes, input_name: str, output_name: str, limit: int = 4) -> bytes:
    """An ONNX model that answers like ``model`` but fails in onnxruntime when max(input) >= ``limit``.

    (A Gather whose index is floor(max(x)) into a table of ``limit`` zeros, added to the output.) Golden inputs
    of the digits model are in [0, 1], so the model passes the health gate and then fails on live inputs
    that carry large values: a real runtime error, not a mocked one.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load_from_string(model)
    g = m.graph
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == output_name:
                node.output[i] = output_name + "__raw"
    g.initializer.append(numpy_helper.from_array(np.zeros(limit, np.float32), "trap_table"))
    g.node.extend(
        [
            helper.make_node("ReduceMax", [input_name], ["trap_max"], keepdims=0),
            helper.make_node("Floor", ["trap_max"], ["trap_floor"]),
            helper.make_node("Cast", ["trap_floor"], ["trap_idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["trap_table", "trap_idx"], ["trap_zero"], axis=0),
            helper.make_node("Add", [output_name + "__raw", "trap_zero"], [output_name]),
        ]
    )
    return m.SerializeToString()
