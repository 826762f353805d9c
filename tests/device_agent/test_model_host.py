"""Serving with real onnxruntime models: request checks, swap under load, runtime-error fallback and rollback
trigger, shadow agreement, and the health gate's three checks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import HealthConfig
from device_agent.health_gate import run_health_gate
from device_agent.model_host import LoadedModel, ModelHost, load_model
from device_agent.service import NoModelError
from edgeops.artifact import verify_artifact
from edgeops.errors import EdgeopsError, RequestError
from edgeops.signing import load_public_key


@pytest.fixture(scope="module")
def eval_x(digits_dir: Path) -> np.ndarray:
    return np.load(digits_dir / "eval_nchw.npz")["x"][:64].astype(np.float32)


def _load(path: Path, keys_dir: Path, slot: str = "a") -> LoadedModel:
    return load_model(verify_artifact(path, [load_public_key(keys_dir / "signing.pub")]), slot)


def test_requests_are_checked_against_the_manifest(
    artifacts: dict[str, Path], keys_dir: Path, eval_x: np.ndarray
) -> None:
    host = ModelHost(HealthConfig())
    with pytest.raises(NoModelError):
        host.infer({"image": eval_x[:1]})
    host.set_models(_load(artifacts["v1"], keys_dir), None)
    batch = host.infer({"image": eval_x[:5]})
    assert batch.outputs["probs"].shape == (5, 10) and batch.version == "1.0.0"
    one = host.infer({"input": eval_x[0]})  # one sample without its batch dim, under any single name
    assert one.outputs["probs"].shape == (10,)
    np.testing.assert_allclose(one.outputs["probs"], batch.outputs["probs"][0], atol=1e-6)
    bad = [
        ({"image": eval_x[:1, :, :4]}, "shape"),
        ({"image": np.zeros((1, 8, 8, 1), np.float32)}, "shape"),
        ({"image": np.array([["a"]])}, "dtype"),
        ({"image": eval_x[:1], "extra": eval_x[:1]}, "unexpected"),
        ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "shape"),
    ]
    for feeds, word in bad:
        with pytest.raises(RequestError, match=word):
            host.infer(feeds)
    assert host.errors == 0  # a caller's bad request is not the model's error


def test_swap_under_load_fails_no_request(artifacts: dict[str, Path], keys_dir: Path, eval_x: np.ndarray) -> None:
    host = ModelHost(HealthConfig())
    models = [_load(artifacts["v1"], keys_dir, "a"), _load(artifacts["v1.1"], keys_dir, "b")]
    host.set_models(models[0], None)
    stop, failures, versions = threading.Event(), [], set()

    def client() -> None:
        while not stop.is_set():
            try:
                r = host.infer({"image": eval_x[:4]})
                versions.add(r.version)
                assert r.outputs["probs"].shape == (4, 10)
            except Exception as exc:
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(100):
        host.swap(models[(i + 1) % 2])
        time.sleep(0.003)  # let requests start on each model
    stop.set()
    for t in threads:
        t.join()
    assert failures == [] and versions == {"1.0.0", "1.1.0"} and host.requests > 0


def test_runtime_errors_fall_back_then_trigger_rollback(
    artifacts: dict[str, Path], keys_dir: Path, eval_x: np.ndarray
) -> None:
    tripped = threading.Event()
    reasons: list[str] = []
    host = ModelHost(
        HealthConfig(max_error_rate=0.2, error_window=20, min_errors=3),
        on_runtime_failure=lambda r: (reasons.append(r), tripped.set()),
    )
    trap = _load(artifacts["trap"], keys_dir, "b")
    host.set_models(trap, _load(artifacts["v1"], keys_dir, "a"))
    assert host.infer({"image": eval_x[:2]}).version == "1.1.4"  # normal inputs: the trap model answers
    hot = eval_x[:2] * 10  # values >= 4 make the trap model fail in onnxruntime
    answers = [host.infer({"image": hot}) for _ in range(3)]
    assert {a.version for a in answers} == {"1.0.0"}  # the previous model answered meanwhile
    assert tripped.wait(5) and "3 runtime errors" in reasons[0]
    back = host.rollback()
    assert back.version == "1.0.0" and host.fallback is None
    assert host.infer({"image": hot}).version == "1.0.0"


def test_the_request_that_trips_the_rollback_is_still_answered(
    artifacts: dict[str, Path], keys_dir: Path, eval_x: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The automatic rollback runs on its own thread; when it finishes before the failing request looks for its
    fallback (the fallback is then gone: it is the active model), the request is still answered, not a 500."""

    class InlineThread:  # the rollback completes before _record returns: the worst interleaving, every time
        def __init__(self, target: Callable[..., object], args: tuple[object, ...], **_: object) -> None:
            self.target, self.args = target, args

        def start(self) -> None:
            self.target(*self.args)

    monkeypatch.setattr("device_agent.model_host.threading.Thread", InlineThread)
    host: ModelHost
    host = ModelHost(HealthConfig(min_errors=1, max_error_rate=0.0), on_runtime_failure=lambda r: host.rollback())
    host.set_models(_load(artifacts["trap"], keys_dir, "b"), _load(artifacts["v1"], keys_dir, "a"))
    answer = host.infer({"image": eval_x[:1] * 10})
    assert answer.version == "1.0.0" and host.active.version == "1.0.0" and host.fallback is None  # type: ignore[union-attr]


def test_runtime_error_without_fallback_is_an_error(
    artifacts: dict[str, Path], keys_dir: Path, eval_x: np.ndarray
) -> None:
    host = ModelHost(HealthConfig())
    host.set_models(_load(artifacts["trap"], keys_dir), None)
    with pytest.raises(EdgeopsError, match="failed at run time"):
        host.infer({"image": eval_x[:1] * 10})
    assert host.errors == 1


def test_shadow_reports_agreement_without_serving(
    artifacts: dict[str, Path], keys_dir: Path, eval_x: np.ndarray
) -> None:
    host = ModelHost(HealthConfig())
    host.set_models(_load(artifacts["v1"], keys_dir, "a"), None)
    host.set_shadow(_load(artifacts["v1.1"], keys_dir, "b"))
    for i in range(0, 64, 8):
        assert host.infer({"image": eval_x[i : i + 8]}).version == "1.0.0"
    shadow = host.shadow
    assert shadow is not None
    shadow.drain()
    stats = shadow.stats()
    assert stats["version"] == "1.1.0" and stats["compared"] == 64 and stats["agreement"] == 1.0
    host.set_shadow(None)
    assert host.shadow is None


@pytest.mark.parametrize(("name", "check"), [("v1.1", None), ("bad_golden", "golden"), ("slow", "latency")])
def test_health_gate(artifacts: dict[str, Path], keys_dir: Path, name: str, check: str | None) -> None:
    model = _load(artifacts[name], keys_dir)
    result = run_health_gate(model.artifact, model.runner, latency_runs=5)
    assert result.passed == (check is None) and result.check == check, result.reason
    if check is None:
        assert result.budget_ms == 20.0 and result.latency_p95_ms is not None


def test_corrupt_model_bytes_fail_to_load(artifacts: dict[str, Path], keys_dir: Path) -> None:
    with pytest.raises(EdgeopsError, match="cannot load"):
        _load(artifacts["corrupt_model"], keys_dir)


def test_tflite_artifact_runs_in_litert(artifacts: dict[str, Path], keys_dir: Path, digits_dir: Path) -> None:
    model = _load(artifacts["rpi4"], keys_dir)
    assert model.runner.backend.providers_used == ("litert-cpu",)
    assert run_health_gate(model.artifact, model.runner, latency_runs=5).passed
    host = ModelHost(HealthConfig())
    host.set_models(model, None)
    x = np.load(digits_dir / "eval.npz")["x"][:4].astype(np.float32)  # NHWC, as the Keras source took it
    result = host.infer({"image": x})
    assert result.outputs[next(iter(result.outputs))].shape == (4, 10)


def test_coreml_artifact_is_refused_off_apple(artifacts: dict[str, Path], keys_dir: Path, tmp_path: Path) -> None:
    from tests.support.artifacts import repack

    def coreml(doc: dict) -> None:
        doc["format"], doc["runtime"], doc["version"] = "coreml", "coreml", "1.5.0"

    path = repack(artifacts["v1.1"], tmp_path / "coreml.edgeops", keys_dir / "signing.key", manifest=coreml)
    with pytest.raises(EdgeopsError, match="Core ML models run only on Apple platforms"):
        _load(path, keys_dir)
