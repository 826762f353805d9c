"""Pass ``benchmark``: host latency of the artifact in its runtime, with the profile's thread count.

Times single-sample inference (input preparation included, as the device does it) after a warm-up, and
records p50/p95/mean in milliseconds. These are *host* figures: they rank precisions and catch regressions;
the device's health gate enforces the profile's latency budget on real hardware. Delegates the host lacks
(GPU, NNAPI, Edge TPU, Neural Engine) are noted, not emulated. Core ML cannot run here: no latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from converters.model_types import ModelFormat, ModelState
from converters.pass_context import PassContext
from converters.registry import register
from edgeops.runtime import ModelRunner, open_model

__all__ = ["BenchmarkConfig", "measure_latency"]

HOST_DELEGATES = {"xnnpack"}


@dataclass(frozen=True)
class BenchmarkConfig:
    warmup: int = field(default=10, metadata={"help": "untimed runs first"})
    runs: int = field(default=200, metadata={"help": "timed runs at most"})
    max_seconds: float = field(default=5.0, metadata={"help": "stop timing after this many seconds"})


def measure_latency(runner: ModelRunner, sample: dict[str, np.ndarray], cfg: BenchmarkConfig) -> dict[str, float]:
    """p50/p95/mean milliseconds of ``runner.run(sample)``."""
    for _ in range(cfg.warmup):
        runner.run(sample)
    times: list[float] = []
    deadline = time.perf_counter() + cfg.max_seconds
    while len(times) < cfg.runs and (len(times) < 10 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        runner.run(sample)
        times.append((time.perf_counter() - t0) * 1e3)
    arr = np.array(times)
    return {
        "p50": round(float(np.percentile(arr, 50)), 4),
        "p95": round(float(np.percentile(arr, 95)), 4),
        "mean": round(float(arr.mean()), 4),
        "runs": float(len(times)),
    }


@register("benchmark", BenchmarkConfig, "measure host latency p50/p95 in the profile's runtime")
def run(ctx: PassContext, state: ModelState, cfg: BenchmarkConfig) -> ModelState:
    if state.fmt is ModelFormat.COREML:
        ctx.outcome.notes.append("latency not measured: Core ML runs only on Apple hardware")
        return state
    backend = open_model(
        state.path, str(state.fmt), threads=ctx.host_threads, providers=ctx.profile.execution_providers
    )
    runner = ModelRunner(backend, transpose=state.input_transpose)
    sample = {k: v[:1] for k, v in ctx.eval.feeds.items()}
    ctx.outcome.latency_ms = measure_latency(runner, sample, cfg)
    missing = [d for d in ctx.profile.delegates if d not in HOST_DELEGATES]
    if missing:
        ctx.outcome.notes.append(
            f"host latency on CPU ({ctx.host_threads} threads); device delegates "
            f"{', '.join(missing)} not available on the build host"
        )
    wanted = ctx.profile.execution_providers[0] if ctx.profile.format == "onnx" else None
    if wanted and backend.providers_used and backend.providers_used[0] != wanted:
        ctx.outcome.notes.append(f"{wanted} not available here: validated and timed with {backend.providers_used[0]}")
    return state
