"""The device's health gate: a loaded candidate must reproduce its golden outputs and meet its latency budget.

Checks, in order, each named in the result and in the event the agent reports:

- ``golden``: every golden output within ``atol + rtol·|want|`` of what the model gives on the golden inputs
  (the tolerance the build measured and signed into the manifest);
- ``latency``: the p95 of ``runs`` single-sample inferences within the profile's ``latency_p95_ms`` budget
  (from the signed recipe) times ``budget_factor``; a p95 over budget is measured once more and the better of
  the two counts, so one scheduler hiccup on a busy device does not reject a good model. No budget in the
  profile → not checked, said so.

Loading (the ``load`` check) happens in :func:`device_agent.model_host.load_model`; its failure is reported
with the same :class:`GateResult` shape by the agent. The gate never touches the serving model.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeops.artifact import VerifiedArtifact
from edgeops.errors import EdgeopsError, UntrustedInput
from edgeops.runtime import ModelRunner

__all__ = ["GateResult", "golden_excess", "latency_budget_ms", "measure_latency_p95", "run_health_gate"]


@dataclass(frozen=True)
class GateResult:
    passed: bool
    check: str | None  # the failed check: "load", "golden", "latency"; None when passed
    reason: str
    golden_excess: float | None = None  # largest |got-want| - tolerance (<= 0 passes)
    latency_p95_ms: float | None = None
    budget_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "check": self.check,
            "reason": self.reason,
            "golden_excess": self.golden_excess,
            "latency_p95_ms": self.latency_p95_ms,
            "budget_ms": self.budget_ms,
        }


def _npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise UntrustedInput(f"golden file is not a valid .npy: {exc}") from None


def golden_inputs(artifact: VerifiedArtifact) -> dict[str, np.ndarray]:
    m = artifact.manifest
    if m.golden is None:
        raise UntrustedInput("artifact has no golden pairs: the health gate cannot run")
    return {n: _npy(artifact.read(p)) for n, p in m.golden.inputs.items()}


def golden_excess(artifact: VerifiedArtifact, runner: ModelRunner) -> float:
    """Run the golden inputs; the largest excess over tolerance (≤ 0 passes). Raises EdgeopsError."""
    m = artifact.manifest
    if m.golden is None:
        raise UntrustedInput("artifact has no golden pairs: the health gate cannot run")
    outputs = runner.run(golden_inputs(artifact))
    worst = -np.inf
    for name, member in m.golden.outputs.items():
        if name not in outputs:
            raise UntrustedInput(f"the model has no output {name!r} named by the golden pairs")
        want = _npy(artifact.read(member)).astype(np.float64)
        got = outputs[name].astype(np.float64)
        if got.size != want.size:
            return float("inf")
        excess = np.abs(got.reshape(want.shape) - want) - (m.golden.atol + m.golden.rtol * np.abs(want))
        worst = max(worst, float(np.nan_to_num(excess, nan=np.inf).max()))
    return float(worst)


def latency_budget_ms(artifact: VerifiedArtifact) -> float | None:
    """The profile's on-device p95 budget signed into the manifest's recipe, when it has one."""
    budgets = artifact.manifest.recipe.get("profile", {}).get("budgets", {})
    value = budgets.get("latency_p95_ms") if isinstance(budgets, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def measure_latency_p95(runner: ModelRunner, sample: dict[str, np.ndarray], runs: int) -> float:
    """p95 in ms of ``runs`` single-sample inferences (after one warm-up run)."""
    one = {k: v[:1] for k, v in sample.items()}
    runner.run(one)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.run(one)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 95))


def run_health_gate(
    artifact: VerifiedArtifact, runner: ModelRunner, *, latency_runs: int = 20, budget_factor: float = 1.0
) -> GateResult:
    """Golden outputs then latency. Never raises for a model's fault: a failure is a GateResult."""
    try:
        excess = golden_excess(artifact, runner)
    except EdgeopsError as exc:
        return GateResult(False, "golden", f"golden inputs could not be run: {exc}")
    except (ValueError, RuntimeError, KeyError) as exc:  # runtime errors from LiteRT / onnxruntime
        return GateResult(False, "golden", f"the runtime failed on the golden inputs: {exc}")
    if excess > 0:
        return GateResult(False, "golden", f"golden outputs differ beyond tolerance (by {excess:.3g})", excess)
    budget = latency_budget_ms(artifact)
    p95 = measure_latency_p95(runner, golden_inputs(artifact), latency_runs)
    if budget is None:
        return GateResult(True, None, "golden passed; no latency budget in the profile", excess, p95)
    limit = budget * budget_factor
    if p95 > limit:  # confirm before refusing: one scheduler hiccup on a busy device must not reject a good model
        p95 = min(p95, measure_latency_p95(runner, golden_inputs(artifact), latency_runs))
    if p95 > limit:
        return GateResult(
            False, "latency", f"latency p95 {p95:.2f} ms over the budget of {limit:.2f} ms", excess, p95, limit
        )
    return GateResult(True, None, f"golden passed; latency p95 {p95:.2f} ms ≤ {limit:.2f} ms", excess, p95, limit)
