"""Compiler benchmark: edgeops profiles against fp32 and against the converters' own default quantisers.

For each model (the digits example CNN and, unless ``--quick``, a compute-bound 32x32 conv net) it builds, in
one run, on the same model, calibration and eval data:

- the edgeops profiles rpi4, x86-gateway, coral-edgetpu, android-arm64, jetson-orin-nano and ios (Core ML
  cannot run on Linux: size only);
- fp32 baselines per format, built by edgeops with throw-away profiles (``precision = "fp32"``);
- the peers, called with their defaults: the TFLite converter with ``Optimize.DEFAULT`` (dynamic range) and
  ``Optimize.DEFAULT`` + ``representative_dataset`` (its full-integer recipe), and onnxruntime's
  ``quantize_dynamic(model, out)`` and ``quantize_static(model, out, reader)`` on edgeops' fp32 ONNX.

Every executable model is scored with the same code (top-1 agreement with the source model, accuracy on the
labels) and timed with the same harness (:func:`converters.benchmark.measure_latency`, batch 1, the same thread
count), in interleaved rounds whose order is shuffled; a latency ratio is the median over rounds of the
per-round ratio of p50s, so a noisy shared machine moves both sides together. Writes every raw figure, the
machine and a ``goals`` section to ``--out`` (default benchmarks/results/compile.json) and prints a table.

Run: ``TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/compile_bench.py [--quick] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.models import BenchModel, conv32_model, digits_model  # noqa: E402
from converters.benchmark import BenchmarkConfig, measure_latency  # noqa: E402
from edgeops.runtime import ModelRunner, RuntimeUnavailable, open_model  # noqa: E402

EDGEOPS_PROFILES = ("rpi4", "x86-gateway", "coral-edgetpu", "android-arm64", "jetson-orin-nano", "ios")
INT8_PROFILES = ("rpi4", "x86-gateway", "coral-edgetpu")
BASELINES = {"tflite": ("bench-tflite-fp32", "rpi4"), "onnx": ("bench-onnx-fp32", "x86-gateway")}
GOALS = {"size_ratio": 0.27, "agreement": 0.99, "drop_pt": 0.5, "latency_ratio": 0.6}
ROUNDS = 7
ROUND_CFG = BenchmarkConfig(warmup=5, runs=400, max_seconds=0.35)


@dataclass
class Row:
    """One model file of one model: an edgeops profile, an fp32 baseline or a peer."""

    model: str
    name: str
    kind: str  # edgeops | baseline | peer
    fmt: str
    precision: str
    size_bytes: int | None = None  # the model file itself
    artifact_bytes: int | None = None  # the signed edgeops artifact (model + manifest + goldens)
    build_seconds: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)  # what edgeops' own report said
    p50_rounds_ms: dict[str, list[float]] = field(default_factory=dict)  # threads -> p50 per round
    size_ratio: float | None = None
    latency_ratio: dict[str, float] = field(default_factory=dict)  # threads -> int8/fp32 p50, median of rounds
    latency_ratio_rounds: dict[str, list[float]] = field(default_factory=dict)  # threads -> per-round ratios
    size_breakdown: dict[str, int] = field(default_factory=dict)  # ONNX: initializer bytes by dtype, "graph"
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    blob: bytes | None = field(default=None, repr=False)
    transpose: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["blob"], doc["transpose"]
        doc["p50_ms"] = {t: round(statistics.median(v), 4) for t, v in self.p50_rounds_ms.items()}
        return doc


# ---------------------------------------------------------------- edgeops builds


def _write_baseline_profiles(folder: Path) -> None:
    """fp32 copies of rpi4 / x86-gateway, with loose budgets so the gate never hides a figure."""
    for fmt, (name, parent) in BASELINES.items():
        runtime = "litert" if fmt == "tflite" else "onnxruntime"
        folder.joinpath(f"{name}.toml").write_text(
            f'name = "{name}"\ndescription = "benchmark fp32 baseline ({parent} at fp32)"\nformat = "{fmt}"\n'
            f'runtime = "{runtime}"\nprecision = "fp32"\nthreads = 4\n'
            'passes = ["convert", "quantize", "validate", "package", "sign"]\n\n[budgets]\n'
            "max_accuracy_drop_pt = 100\nmin_agreement = 0.0\nartifact_size_mb = 4096\nmemory_mb = 65536\n"
            "latency_p95_ms = 100000\n"
        )


def _row_from_result(model: str, result: Any, baseline_names: dict[str, str]) -> Row:
    out, prof = result.outcome, result.profile
    kind = "baseline" if prof.name in baseline_names else "edgeops"
    row = Row(
        model,
        baseline_names.get(prof.name, prof.name),
        kind,
        prof.format,
        prof.precision,
        size_bytes=out.model_size_bytes,
        artifact_bytes=out.size_bytes,
        build_seconds=round(result.seconds, 2),
        reported={
            "metrics": out.metrics,
            "latency_ms": out.latency_ms,
            "gate_passed": result.passed,
            "gate_reason": result.reason,
            "notes": list(out.notes),
        },
    )
    if not result.passed:
        row.error = result.reason
    if out.manifest is not None and prof.format != "coreml":
        row.blob = out.files.get(out.manifest.model_file)
        row.transpose = {t.name: tuple(t.transpose) for t in out.manifest.inputs if t.transpose}
    if any("edgetpu_compiler is not installed" in n for n in out.notes):
        row.notes.append("not Edge-TPU compiled (no edgetpu_compiler): CPU int8")
    elif any("not available" in n for n in out.notes):
        row.notes.append("device accelerator absent: run on CPU")
    if prof.format == "coreml":
        row.notes.append("Core ML cannot run on Linux: size only (no accuracy, no latency)")
    return row


def build_edgeops(bm: BenchModel, work: Path) -> tuple[Any, list[Row]]:
    """Build every edgeops profile and the fp32 baselines; returns (build inputs, rows)."""
    from edgeops.build import BuildRequest, run_build
    from edgeops.signing import generate_keypair

    profiles_dir, dist = work / "profiles", work / "dist"
    profiles_dir.mkdir(parents=True, exist_ok=True)
    _write_baseline_profiles(profiles_dir)
    key, _ = generate_keypair(work / "keys", overwrite=True)
    baseline_names = {name: f"{fmt}-fp32" for fmt, (name, _) in BASELINES.items()}
    req = BuildRequest(
        model=bm.keras,
        profiles=[*EDGEOPS_PROFILES, *baseline_names],
        key=key,
        version="1.0.0",
        out_dir=dist,
        calib=bm.calib,
        eval=bm.eval,
        profiles_dirs=[profiles_dir],
        name=bm.name,
    )
    inputs, results = run_build(
        req,
        progress=lambda p, step, _steps: (
            print(f"  [{bm.name}] {p} {step}", flush=True) if step in ("convert", "load") else None
        ),
    )
    return inputs, [_row_from_result(bm.name, r, baseline_names) for r in results]


# ---------------------------------------------------------------- peers, called with their defaults


def _timed(row: Row, make: Callable[[], bytes]) -> Row:
    t0 = time.perf_counter()
    try:
        row.blob = make()
        row.size_bytes = len(row.blob)
    except Exception as exc:  # a peer failing with its defaults is a result to report, not a crash
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    row.build_seconds = round(time.perf_counter() - t0, 2)
    return row


def _tflite_default(bm: BenchModel, calib: np.ndarray | None) -> bytes:
    import keras
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(keras.models.load_model(bm.keras))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if calib is not None:

        def representative() -> Any:
            for i in range(len(calib)):
                yield [calib[i : i + 1]]

        converter.representative_dataset = representative
    return bytes(converter.convert())


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration array, one sample per batch."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self._it = iter([{name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _ort_default(fp32: bytes, calib: np.ndarray | None, work: Path) -> bytes:
    import onnx
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    src, dst = work / "peer_fp32.onnx", work / "peer_q.onnx"
    src.write_bytes(fp32)
    if calib is None:
        quantize_dynamic(str(src), str(dst))
    else:
        name = onnx.load(str(src)).graph.input[0].name
        quantize_static(str(src), str(dst), _Reader(name, calib))
    data = dst.read_bytes()
    open_model(data, "onnx")  # a model the runtime cannot load is a failed peer, found here, not later
    return data


def build_peers(bm: BenchModel, onnx_fp32: bytes | None, work: Path) -> list[Row]:
    calib = np.load(bm.calib)["x"].astype(np.float32)
    rows = [
        _timed(
            Row(bm.name, "tflite Optimize.DEFAULT", "peer", "tflite", "int8-dynamic"), lambda: _tflite_default(bm, None)
        ),
        _timed(Row(bm.name, "tflite DEFAULT+repr. data", "peer", "tflite", "int8"), lambda: _tflite_default(bm, calib)),
    ]
    for label, prec, data in (("ort quantize_dynamic", "int8-dynamic", None), ("ort quantize_static", "int8", calib)):
        row = Row(bm.name, label, "peer", "onnx", prec)
        if onnx_fp32 is None:
            row.error = "no fp32 ONNX to quantise (the onnx fp32 baseline failed)"
            rows.append(row)
        else:
            rows.append(_timed(row, lambda d=data: _ort_default(onnx_fp32, d, work)))  # type: ignore[misc]
    return rows


# ---------------------------------------------------------------- scoring and timing


def _runner(row: Row, threads: int) -> ModelRunner:
    if row.blob is None:
        raise RuntimeUnavailable("no model file")
    return ModelRunner(open_model(row.blob, row.fmt, threads=threads), transpose=row.transpose)


def score(
    row: Row, feeds: dict[str, np.ndarray], labels: np.ndarray | None, ref_top1: np.ndarray, threads: int
) -> None:
    """Fill row.metrics: agreement with the source's top-1, accuracy, and the drop in points."""
    try:
        out = next(iter(_runner(row, threads).run(feeds).values()))
    except RuntimeUnavailable as exc:
        row.error = row.error or str(exc)
        return
    top1 = out.reshape(len(ref_top1), -1).argmax(axis=1)
    row.metrics["agreement"] = float((top1 == ref_top1).mean())
    row.metrics["eval_count"] = len(ref_top1)
    if labels is not None:
        acc, src = float((top1 == labels).mean()), float((ref_top1 == labels).mean())
        row.metrics.update(accuracy=acc, source_accuracy=src, drop_pt=round((src - acc) * 100, 3))


def time_rows(rows: list[Row], sample: dict[str, np.ndarray], thread_counts: list[int], seed: int) -> None:
    """Interleaved rounds: each round times every runnable row once per thread count, in shuffled order."""
    runners = {(id(r), t): _runner(r, t) for r in rows for t in thread_counts}
    order = [(r, t) for r in rows for t in thread_counts]
    rng = random.Random(seed)
    for _ in range(ROUNDS):
        rng.shuffle(order)
        for row, t in order:
            p50 = measure_latency(runners[(id(row), t)], sample, ROUND_CFG)["p50"]
            row.p50_rounds_ms.setdefault(str(t), []).append(p50)


def add_ratios(rows: list[Row]) -> None:
    base = {r.fmt: r for r in rows if r.kind == "baseline" and r.error is None}
    for row in rows:
        ref = base.get(row.fmt)
        if ref is None or row.size_bytes is None or ref.size_bytes is None:
            continue
        row.size_ratio = round(row.size_bytes / ref.size_bytes, 4)
        for t, vals in row.p50_rounds_ms.items():
            ref_vals = ref.p50_rounds_ms.get(t, [])
            if len(ref_vals) == len(vals) and vals:
                per_round = [round(a / b, 3) for a, b in zip(vals, ref_vals)]
                row.latency_ratio_rounds[t] = per_round
                row.latency_ratio[t] = round(statistics.median(per_round), 3)


def onnx_breakdown(row: Row) -> None:
    """Bytes of an ONNX file by what they hold: initializers per dtype, and the graph (nodes, names) as the rest."""
    import onnx
    from onnx import numpy_helper

    if row.fmt != "onnx" or row.blob is None:
        return
    by: dict[str, int] = {}
    for init in onnx.load_from_string(row.blob).graph.initializer:
        arr = numpy_helper.to_array(init)
        by[str(arr.dtype)] = by.get(str(arr.dtype), 0) + int(arr.nbytes)
    row.size_breakdown = {**by, "graph": len(row.blob) - sum(by.values())}


def bench_model(bm: BenchModel, work: Path, thread_counts: list[int]) -> list[Row]:
    print(f"== {bm.name}: {bm.description}", flush=True)
    inputs, rows = build_edgeops(bm, work / "edgeops")
    onnx_base = next((r for r in rows if r.name == "onnx-fp32" and r.blob is not None), None)
    print(f"  [{bm.name}] peers", flush=True)
    rows += build_peers(bm, onnx_base.blob if onnx_base else None, work)
    feeds = {k: np.asarray(v) for k, v in inputs.eval.feeds.items()}
    ref_top1 = next(iter(inputs.reference.values())).reshape(inputs.eval.count, -1).argmax(axis=1)
    host = max(thread_counts)
    runnable = []
    for row in rows:
        if row.fmt != "coreml" and row.blob is not None:
            score(row, feeds, inputs.eval.labels, ref_top1, host)
            if row.error is None:
                runnable.append(row)
    print(f"  [{bm.name}] timing {len(runnable)} models x threads {thread_counts} x {ROUNDS} rounds", flush=True)
    time_rows(runnable, {k: v[:1] for k, v in feeds.items()}, thread_counts, seed=len(bm.name))
    add_ratios(rows)
    for row in rows:
        onnx_breakdown(row)
    return rows


# ---------------------------------------------------------------- goals


def _goal(value: Any, passed: bool, detail: Any, why: str | None) -> dict[str, Any]:
    return {"value": value, "passed": passed, "detail": detail, "why": None if passed else why}


def _edgeops_rows(rows: list[Row], names: tuple[str, ...] = EDGEOPS_PROFILES) -> list[Row]:
    return [r for r in rows if r.kind == "edgeops" and r.name in names]


def goal_size(rows: list[Row]) -> dict[str, Any]:
    detail = {f"{r.model}/{r.name}": r.size_ratio for r in _edgeops_rows(rows, INT8_PROFILES)}
    known = [v for v in detail.values() if v is not None]
    worst = max(known) if known else None
    missed = [r for r in _edgeops_rows(rows, INT8_PROFILES)
              if r.size_ratio is None or r.size_ratio > GOALS["size_ratio"]]
    why = "; ".join(_size_why(r, rows) for r in missed)
    return _goal(worst, bool(known) and not missed, detail, why)


def _size_why(row: Row, rows: list[Row]) -> str:
    base = next((r for r in rows if r.kind == "baseline" and r.model == row.model and r.fmt == row.fmt), None)
    if row.size_ratio is None or base is None or base.size_bytes is None or not row.size_breakdown:
        return f"{row.model}/{row.name}: {row.error or 'no size breakdown'}"
    parts = {k: round(v / base.size_bytes, 4) for k, v in row.size_breakdown.items()}
    return (f"{row.model}/{row.name} is {row.size_ratio}x fp32: int8 weights {parts.get('int8', 0)}x, graph "
            f"(QDQ nodes and their names) {parts['graph']}x, scales/zero points/int32 biases the rest; the fixed "
            "graph overhead weighs more on a small model")


def goal_quality(rows: list[Row]) -> tuple[dict[str, Any], dict[str, Any]]:
    executed = [r for r in _edgeops_rows(rows) if r.fmt != "coreml"]
    agree = {f"{r.model}/{r.name}": r.metrics.get("agreement") for r in executed}
    drop = {f"{r.model}/{r.name}": r.metrics.get("drop_pt") for r in executed}
    bad_a = [k for k, v in agree.items() if v is None or v < GOALS["agreement"]]
    bad_d = [k for k, v in drop.items() if v is None or v > GOALS["drop_pt"]]
    worst_a = min((v for v in agree.values() if v is not None), default=None)
    worst_d = max((v for v in drop.values() if v is not None), default=None)
    return (_goal(worst_a, bool(agree) and not bad_a, agree, f"below {GOALS['agreement']} or not run: {bad_a}"),
            _goal(worst_d, bool(drop) and not bad_d, drop, f"over {GOALS['drop_pt']} pt or not run: {bad_d}"))


def goal_latency(rows: list[Row], cnn: str) -> dict[str, Any]:
    """rpi4 (int8 LiteRT) / tflite-fp32 p50 on the compute-bound CNN, at every measured thread count."""
    detail = {f"{r.model}/{r.name}": r.latency_ratio for r in _edgeops_rows(rows, ("rpi4", "coral-edgetpu"))}
    judged = detail.get(f"{cnn}/rpi4") or {}
    worst = max(judged.values()) if judged else None
    ort = next((r.latency_ratio for r in rows if r.model == cnn and r.name == "x86-gateway"), {})
    peer = next((r.latency_ratio for r in rows if r.model == cnn and r.name == "tflite DEFAULT+repr. data"), {})
    flags = ",".join(machine()["cpu_flags"]) or "none of avx2/avx512/vnni/amx"
    why = (f"rpi4 on {cnn}: int8/fp32 p50 by threads {judged} > {GOALS['latency_ratio']}. On this host (cpu "
           f"flags {flags}) LiteRT's int8 kernels (XNNPACK delegate) are not faster than its fp32 ones; "
           f"onnxruntime's int8 QDQ on the same model and host gives {ort}. "
           f"The TFLite converter's own full-integer model gives {peer}: the runtime on this CPU, not the recipe")
    if cnn == "digits":
        why += " (digits is an 8x8 model: per-call overhead dominates, run without --quick for the conv net)"
    return _goal(worst, worst is not None and worst <= GOALS["latency_ratio"], {"judged_on": f"{cnn}/rpi4", **detail},
                 why)


def goal_vs_peers(rows: list[Row]) -> dict[str, Any]:
    """edgeops int8 accuracy >= every int8 peer of the same format whose model is at most 10 % larger."""
    detail, missed = [], []
    for ours in _edgeops_rows(rows, INT8_PROFILES):
        for peer in (r for r in rows if r.kind == "peer" and r.model == ours.model and r.fmt == ours.fmt):
            acc_o, acc_p = ours.metrics.get("accuracy"), peer.metrics.get("accuracy")
            if peer.error or acc_p is None or ours.size_bytes is None or peer.size_bytes is None:
                detail.append({"ours": f"{ours.model}/{ours.name}", "peer": peer.name, "comparable": False,
                               "peer_error": peer.error})
                continue
            same_size = peer.size_bytes <= 1.1 * ours.size_bytes
            ok = acc_o is not None and acc_o >= acc_p
            detail.append({"ours": f"{ours.model}/{ours.name}", "peer": peer.name, "comparable": same_size,
                           "accuracy": acc_o, "peer_accuracy": acc_p,
                           "agreement": ours.metrics.get("agreement"),
                           "peer_agreement": peer.metrics.get("agreement"),
                           "size_bytes": ours.size_bytes, "peer_size_bytes": peer.size_bytes,
                           "at_least_as_accurate": ok})
            if same_size and not ok and acc_o is not None:
                images = round((acc_p - acc_o) * (ours.metrics.get("eval_count") or 0))
                slower = _slowdown(peer, ours)
                missed.append(f"{ours.model}/{ours.name} ({ours.precision}) {acc_o:.4f} < {peer.name} "
                              f"({peer.precision}) {acc_p:.4f}: {images} eval image(s); that peer is {slower}")
    compared = [d for d in detail if d["comparable"]]
    return _goal(f"{len(compared) - len(missed)}/{len(compared)} comparisons", bool(compared) and not missed,
                 detail, "less accurate than a peer default at the same size: " + "; ".join(missed))


def _slowdown(peer: Row, ours: Row) -> str:
    t = max(ours.p50_rounds_ms, default=None, key=int)
    if t is None or t not in peer.p50_rounds_ms:
        return "not timed"
    ratio = statistics.median(peer.p50_rounds_ms[t]) / statistics.median(ours.p50_rounds_ms[t])
    return f"{ratio:.1f}x the latency of ours at {t} threads (float activations, quantised at run time)" \
        if "dynamic" in peer.precision else f"{ratio:.1f}x the latency of ours at {t} threads"


def goals(rows: list[Row], cnn: str) -> dict[str, Any]:
    agreement, drop = goal_quality(rows)
    return {
        "int8_size_le_0.27x_fp32": goal_size(rows),
        "agreement_ge_99pct": agreement,
        "accuracy_drop_le_0.5pt": drop,
        "int8_litert_latency_le_0.6x_fp32_cnn": goal_latency(rows, cnn),
        "at_least_as_accurate_as_peer_defaults_same_size": goal_vs_peers(rows),
    }


# ---------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in ("edgeops", "tensorflow", "keras", "ai-edge-litert", "onnx", "onnxruntime", "tf2onnx", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(), "cpu_flags": _cpu_flags(),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _cpu_flags() -> list[str]:
    """The SIMD features that decide int8 vs fp32 speed on x86 (empty elsewhere or when unknown)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        return []
    return []


def _fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def table(rows: list[Row], thread_counts: list[int]) -> str:
    heads = ["model", "row", "fmt", "prec", "size KiB", "size/fp32",
             *[f"lat/fp32 {t}t" for t in thread_counts], "agree %", "acc %", "drop pt", "note"]
    lines = []
    for r in rows:
        note = (r.error or "; ".join(r.notes))[:60]
        lines.append([r.model, r.name, r.fmt, r.precision, _fmt(r.size_bytes, ".1f", 1 / 1024),
                      _fmt(r.size_ratio, ".3f"), *[_fmt(r.latency_ratio.get(str(t)), ".2f") for t in thread_counts],
                      _fmt(r.metrics.get("agreement"), ".2f", 100), _fmt(r.metrics.get("accuracy"), ".2f", 100),
                      _fmt(r.metrics.get("drop_pt"), "+.2f"), note])
    widths = [max(len(str(x)) for x in col) for col in zip(heads, *lines)]
    out = [" | ".join(h.ljust(w) for h, w in zip(heads, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def goals_text(doc: dict[str, Any]) -> str:
    lines = []
    for name, g in doc.items():
        why = f"  -- {g['why']}" if g["why"] else ""
        lines.append(f"{'PASS' if g['passed'] else 'MISS'}  {name}: {g['value']}{why}")
    return "\n".join(lines)


def _model_doc(bm: BenchModel) -> dict[str, Any]:
    doc = asdict(bm)
    for key in ("keras", "calib", "eval"):
        path: Path = getattr(bm, key)
        doc[key] = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else f"(made in a temp folder) {path.name}"
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits model only")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compile.json")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="where the conv net is trained/cached (default: a temp folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t0 = time.perf_counter()
    thread_counts = sorted({1, min(4, os.cpu_count() or 1)})
    with tempfile.TemporaryDirectory(prefix="edgeops-compile-bench-") as tmp:
        work = Path(tmp)
        models = [digits_model(REPO / "examples" / "digits" / "out")]
        if not args.quick:
            models.append(conv32_model(args.models_dir or work / "conv32"))
        rows: list[Row] = []
        for bm in models:
            rows += bench_model(bm, work / bm.name, thread_counts)
    cnn = models[-1].name
    goal_doc = goals(rows, cnn)
    doc = {"benchmark": "compile", "quick": args.quick, "seconds": round(time.perf_counter() - t0, 1),
           "machine": machine(), "thread_counts": thread_counts, "rounds": ROUNDS,
           "latency_harness": {**asdict(ROUND_CFG), "batch": 1, "statistic": "median over rounds of per-round p50"},
           "goal_thresholds": GOALS, "models": [_model_doc(m) for m in models],
           "rows": [r.to_json() for r in rows], "goals": goal_doc}
    write_json(args.out, doc)
    print("\n" + table(rows, thread_counts) + "\n\n" + goals_text(goal_doc))
    print(f"\nwrote {args.out} in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
