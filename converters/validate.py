"""Pass ``validate``: run the built model in its real runtime and gate it against the source model.

Runs the artifact with LiteRT / onnxruntime (the same :mod:`edgeops.runtime` code the device uses) on the eval
data (the calibration data when no ``--eval`` is given) and compares with the source model's outputs: top-1
agreement, accuracy against labels when present, max abs error. Past a budget it raises :class:`GateFailure`
naming the profile and the figure. It also records golden input/output pairs for the device's health gate and
reference histograms for drift. Core ML cannot run off macOS: it is checked structurally and the outcome says
it was not executed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from converters.model_types import ModelFormat, ModelState, Precision
from converters.pass_context import PassContext
from converters.registry import register
from edgeops.errors import BuildError, GateFailure
from edgeops.runtime import ModelRunner, open_model

__all__ = ["ValidateConfig", "gate_metrics", "histogram"]


@dataclass(frozen=True)
class ValidateConfig:
    max_samples: int = field(default=2000, metadata={"help": "eval samples used at most"})
    golden_count: int = field(default=8, metadata={"help": "golden input/output pairs stored for the device"})
    histogram_bins: int = field(default=10, metadata={"help": "bins of the drift reference histograms"})


def gate_metrics(
    outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray | None, ref_names: list[str]
) -> dict[str, float | None]:
    """Agreement/accuracy on the first output (when it has ≥ 2 classes), max abs error over all outputs."""
    # match by name when the artifact kept the source's output names, else by position
    got = [outputs[n] for n in ref_names] if set(outputs) == set(ref_names) else list(outputs.values())
    want = [reference[n] for n in ref_names]
    max_err = max(float(np.max(np.abs(g.astype(np.float64).reshape(w.shape) - w))) for g, w in zip(got, want))
    metrics: dict[str, float | None] = {
        "agreement": None,
        "accuracy": None,
        "source_accuracy": None,
        "max_abs_err": max_err,
    }
    first, ref = got[0].reshape(want[0].shape), want[0]
    if ref.ndim >= 2 and ref.shape[-1] >= 2:
        top, ref_top = first.reshape(len(first), -1).argmax(1), ref.reshape(len(ref), -1).argmax(1)
        metrics["agreement"] = float(np.mean(top == ref_top))
        if labels is not None:
            metrics["accuracy"] = float(np.mean(top == labels.reshape(-1)))
            metrics["source_accuracy"] = float(np.mean(ref_top == labels.reshape(-1)))
    return metrics


def _check_budgets(ctx: PassContext, m: dict[str, float | None]) -> None:
    b, name = ctx.profile.budgets, ctx.profile.name
    if m["agreement"] is not None and m["agreement"] < b.min_agreement:
        raise GateFailure(
            f"profile {name}: top-1 agreement {m['agreement']:.4f} < budget {b.min_agreement}",
            profile=name,
            figure="agreement",
        )
    if m["accuracy"] is not None and m["source_accuracy"] is not None:
        drop = 100.0 * (m["source_accuracy"] - m["accuracy"])
        if drop > b.max_accuracy_drop_pt:
            raise GateFailure(
                f"profile {name}: accuracy drop {drop:.2f} pt > budget {b.max_accuracy_drop_pt} pt",
                profile=name,
                figure="accuracy",
            )
    if b.max_abs_err is not None and m["max_abs_err"] is not None and m["max_abs_err"] > b.max_abs_err:
        raise GateFailure(
            f"profile {name}: max abs error {m['max_abs_err']:.4g} > budget {b.max_abs_err}",
            profile=name,
            figure="max_abs_err",
        )


def histogram(values: np.ndarray, bins: int) -> dict[str, list[float]]:
    """Quantile-edged reference histogram (fractions) of all values, for PSI on the device."""
    flat = values.astype(np.float64).reshape(-1)
    if flat.size > 200_000:
        flat = flat[:: flat.size // 200_000 + 1]
    edges = np.unique(np.quantile(flat, np.linspace(0, 1, bins + 1)))
    if edges.size < 2:
        edges = np.array([flat[0] - 0.5, flat[0] + 0.5])
    counts, _ = np.histogram(flat, bins=edges)
    return {"edges": [round(float(e), 7) for e in edges], "fractions": [round(float(c) / flat.size, 7) for c in counts]}


def _tolerance(precision: Precision, runner: ModelRunner) -> tuple[float, float]:
    scales = [o.scale for o in runner.backend.outputs if o.scale is not None]
    if scales:
        return max(2.0 * max(scales), 1e-3), 0.0
    return {Precision.FP32: (1e-4, 1e-3), Precision.FP16: (1e-2, 1e-2)}.get(precision, (3e-2, 1e-2))


def _structural(ctx: PassContext, state: ModelState) -> None:
    from converters.coreml_package import check_coreml

    check = check_coreml(state.path)
    # names and element counts must match the source (the layout may differ: NCHW sources become NHWC)
    want = {name: math.prod(shape) for name, shape in ctx.input_shapes.items()}
    got = {t.name: math.prod(d or 0 for d in t.shape) for t in check.inputs}
    if got != want:
        raise BuildError(
            f"profile {ctx.profile.name}: Core ML model has inputs {got}, expected {want}", profile=ctx.profile.name
        )
    ctx.outcome.executed = False
    ctx.outcome.metrics = {"agreement": None, "accuracy": None, "source_accuracy": None, "max_abs_err": None}
    ctx.outcome.notes.append(f"{check.note}; ops: {len(check.ops)}, weights {'/'.join(check.weight_dtypes)}")


@register("validate", ValidateConfig, "run the artifact in its runtime and gate it against the source", needs="eval")
def run(ctx: PassContext, state: ModelState, cfg: ValidateConfig) -> ModelState:
    if state.fmt is ModelFormat.COREML:
        _structural(ctx, state)
        return state
    backend = open_model(
        state.path, str(state.fmt), threads=ctx.host_threads, providers=ctx.profile.execution_providers
    )
    runner = ModelRunner(backend, transpose=state.input_transpose)
    data = ctx.eval.head(cfg.max_samples)
    outputs = runner.run(data.feeds)
    reference = {k: v[: data.count] for k, v in ctx.reference.items()}
    metrics = gate_metrics(outputs, reference, data.labels, [o.name for o in ctx.source.outputs])
    out = ctx.outcome
    out.metrics, out.executed, out.providers_used = metrics, True, backend.providers_used
    _check_budgets(ctx, metrics)
    k = min(cfg.golden_count, data.count)
    out.golden_inputs = {n: v[:k] for n, v in data.feeds.items()}
    out.golden_outputs = {n: v[:k] for n, v in outputs.items()}
    out.golden_tolerance = _tolerance(state.precision, runner)
    out.drift = {
        "inputs": {n: histogram(v, cfg.histogram_bins) for n, v in data.feeds.items()},
        "outputs": {n: histogram(v, cfg.histogram_bins) for n, v in outputs.items()},
    }
    return state
