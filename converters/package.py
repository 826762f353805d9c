"""Pass ``package``: gather the artifact's files and write its manifest (unsigned; ``sign`` writes the file).

Files: the model (``model.tflite`` / ``model.onnx`` / ``model.mlpackage/...``, canonicalised so the bytes are
reproducible) and the golden pairs as ``.npy`` files. The manifest records the I/O schema as callers see it
(transpose, quantisation), sha256 of every file, source and data hashes, toolchain versions, the resolved
recipe, gate metrics, golden pairs and drift histograms. For the Coral profile it runs ``edgetpu_compiler``
when installed; when not, the artifact is the int8 model and the outcome says it was not Edge-TPU compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from converters.model_types import ModelFormat, ModelState
from converters.pass_context import PassContext
from converters.registry import make_config, register
from edgeops.errors import BuildError
from edgeops.manifest import FileEntry, Golden, Manifest, TensorInfo
from edgeops.runtime import open_model

__all__ = ["PackageConfig", "npy_bytes", "toolchain_versions"]

TOOLCHAIN = (
    "edgeops",
    "numpy",
    "tensorflow",
    "keras",
    "tf2onnx",
    "onnx2tf",
    "onnx",
    "onnxruntime",
    "ai-edge-litert",
    "coremltools",
)


@dataclass(frozen=True)
class PackageConfig:
    edgetpu_compiler: bool = field(default=False, metadata={"help": "run edgetpu_compiler when installed"})


def toolchain_versions() -> dict[str, str]:
    out = {}
    for dist in TOOLCHAIN:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def npy_bytes(arr: np.ndarray) -> bytes:
    """Deterministic ``.npy`` bytes (format 1.0, C order)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _model_files(ctx: PassContext, state: ModelState, cfg: PackageConfig) -> tuple[str, dict[str, bytes]]:
    if state.fmt is ModelFormat.COREML:
        from converters.coreml_package import coreml_files

        return "model.mlpackage", {f"model.mlpackage/{p}": b for p, b in coreml_files(state.path)}
    name = f"model.{state.fmt}"
    if state.fmt is ModelFormat.TFLITE and cfg.edgetpu_compiler:
        return name, {name: _edgetpu(ctx, state.path)}
    return name, {name: state.path.read_bytes()}


def _edgetpu(ctx: PassContext, model: Path) -> bytes:
    compiler = shutil.which("edgetpu_compiler")
    if compiler is None:
        ctx.outcome.notes.append(
            "not Edge-TPU compiled: edgetpu_compiler is not installed (the artifact is the "
            "int8 model; it runs on the Edge TPU only after compilation, on the CPU as is)"
        )
        return model.read_bytes()
    out_dir = ctx.workdir / "edgetpu"
    out_dir.mkdir(exist_ok=True)
    proc = subprocess.run([compiler, "-s", "-o", str(out_dir), str(model)], capture_output=True, text=True, check=False)
    compiled = out_dir / f"{model.stem}_edgetpu.tflite"
    if proc.returncode != 0 or not compiled.is_file():
        raise BuildError(
            f"profile {ctx.profile.name}: edgetpu_compiler failed: {proc.stderr.strip()[:300]}",
            profile=ctx.profile.name,
        )
    ctx.outcome.notes.append("Edge-TPU compiled with edgetpu_compiler")
    return compiled.read_bytes()


def _schema(ctx: PassContext, state: ModelState) -> tuple[list[TensorInfo], list[TensorInfo]]:
    if state.fmt is ModelFormat.COREML:
        from converters.coreml_package import check_coreml

        check = check_coreml(state.path)
        mk = [
            TensorInfo(t.name, [d if d is not None else -1 for d in t.shape], "float32", t.dtype) for t in check.inputs
        ]
        return mk, [
            TensorInfo(t.name, [d if d is not None else -1 for d in t.shape], "float32", t.dtype) for t in check.outputs
        ]
    backend = open_model(state.path, str(state.fmt), threads=1)
    layouts = {s.name: s.layout for s in ctx.source.inputs}

    def info(d: Any, is_input: bool) -> TensorInfo:
        perm = state.input_transpose.get(d.name) if is_input else None
        shape = list(d.shape)
        if perm is not None:  # the caller's shape: invert the permutation
            inverse = [perm.index(i) for i in range(len(perm))]
            shape = [shape[i] for i in inverse]
        dtype = "float32" if d.scale is not None else d.dtype
        return TensorInfo(
            d.name,
            shape,
            dtype,
            d.dtype,
            layouts.get(d.name) if is_input else None,
            d.scale,
            d.zero_point,
            list(perm) if perm is not None else None,
        )

    return [info(d, True) for d in backend.inputs], [info(d, False) for d in backend.outputs]


def _golden(ctx: PassContext, files: dict[str, bytes]) -> Golden | None:
    o = ctx.outcome
    if not o.golden_inputs:
        return None
    ins = {n: f"golden/input_{i}.npy" for i, n in enumerate(o.golden_inputs)}
    outs = {n: f"golden/output_{i}.npy" for i, n in enumerate(o.golden_outputs)}
    files.update({ins[n]: npy_bytes(a) for n, a in o.golden_inputs.items()})
    files.update({outs[n]: npy_bytes(a) for n, a in o.golden_outputs.items()})
    count = next(iter(o.golden_inputs.values())).shape[0]
    return Golden(ins, outs, count, o.golden_tolerance[0], o.golden_tolerance[1])


def _recipe(ctx: PassContext) -> dict[str, Any]:
    p = ctx.profile
    configs = {name: dataclasses.asdict(make_config(name, p.pass_options.get(name, {}))) for name in p.passes}
    return {"profile": p.to_dict(), "passes": [{"name": n, "config": configs[n]} for n in p.passes]}


@register("package", PackageConfig, "gather files and write the manifest")
def run(ctx: PassContext, state: ModelState, cfg: PackageConfig) -> ModelState:
    model_file, files = _model_files(ctx, state, cfg)
    ctx.outcome.model_size_bytes = sum(len(b) for b in files.values())
    golden = _golden(ctx, files)
    inputs, outputs = _schema(ctx, state)
    p, o = ctx.profile, ctx.outcome
    o.files = files
    o.manifest = Manifest(
        name=ctx.name,
        version=ctx.version,
        profile=p.name,
        format=p.format,
        precision=str(state.precision),
        runtime=p.runtime,
        model_file=model_file,
        inputs=inputs,
        outputs=outputs,
        files=[FileEntry(n, hashlib.sha256(b).hexdigest(), len(b)) for n, b in sorted(files.items())],
        source={"file": ctx.source.path.name, "format": str(ctx.source.fmt), "sha256": ctx.source.sha256},
        data={
            "calib_sha256": ctx.calib.sha256 if ctx.calib else None,
            "eval_sha256": ctx.eval.sha256,
            "train_sha256": ctx.train.sha256 if ctx.train else None,
        },
        toolchain=toolchain_versions(),
        runtime_config={
            "threads": p.threads,
            "delegates": list(p.delegates),
            "execution_providers": list(p.execution_providers),
        },
        recipe=_recipe(ctx),
        gate={
            "metrics": o.metrics,
            "budgets": dataclasses.asdict(p.budgets),
            "executed": o.executed,
            "sparsity": o.sparsity,
            "notes": list(o.notes),
        },
        golden=golden,
        drift=o.drift,
    )
    return state
