"""The models the agent serves: the active one, the previous one (fallback) and an optional shadow.

Guarantees:

- A swap is one reference assignment: a request reads the active model once and runs to completion on it, so a
  request in flight during a swap is answered by the model it started on; nothing is closed under it (the old
  model is freed only when the last request holding it returns).
- Callers' inputs are checked against the signed manifest (names, shape with the batch dim free, numeric
  dtype) before they reach the runtime; a bad request raises :class:`RequestError` and does not count as a
  model error. A sample sent without its batch dim is accepted and answered without one.
- A runtime failure counts as an error of the active model. The request is then answered by the previous model
  when one is loaded (the answer names the version that produced it). When errors in the last
  ``error_window`` requests reach ``min_errors`` and exceed ``max_error_rate``, ``on_runtime_failure`` is called
  once (on its own thread); the agent then rolls back.

LiteRT interpreters are not thread-safe, so each LiteRT model serialises its own runs; onnxruntime sessions run
concurrently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from device_agent.config import HealthConfig
from device_agent.service import InferenceResult, NoModelError
from device_agent.shadow import ShadowRunner
from edgeops.artifact import VerifiedArtifact
from edgeops.errors import EdgeopsError, RequestError
from edgeops.manifest import Manifest, TensorInfo
from edgeops.runtime import LiteRTBackend, ModelRunner, open_model

__all__ = ["LoadedModel", "ModelHost", "Observer", "load_model", "prepare_feeds"]

log = logging.getLogger(__name__)
Observer = Callable[["LoadedModel", Mapping[str, np.ndarray], Mapping[str, np.ndarray], float], None]


class LoadedModel:
    """A verified artifact loaded in its runtime."""

    def __init__(self, artifact: VerifiedArtifact, slot: str, runner: ModelRunner) -> None:
        self.artifact = artifact
        self.slot = slot
        self.runner = runner
        self._lock: threading.Lock | None = threading.Lock() if isinstance(runner.backend, LiteRTBackend) else None

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def version(self) -> str:
        return self.artifact.manifest.version

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._lock is None:
            return self.runner.run(feeds)
        with self._lock:
            return self.runner.run(feeds)


def load_model(artifact: VerifiedArtifact, slot: str, *, threads: int | None = None) -> LoadedModel:
    """Load a verified artifact with its runtime (threads/providers from the manifest). Raises EdgeopsError."""
    m = artifact.manifest
    rc = m.runtime_config
    n_threads = threads or int(rc.get("threads") or 1)
    providers = tuple(rc.get("execution_providers") or ("CPUExecutionProvider",))
    backend = open_model(artifact.read(m.model_file), m.format, threads=n_threads, providers=providers)
    transpose = {t.name: t.transpose for t in m.inputs if t.transpose}
    return LoadedModel(artifact, slot, ModelRunner(backend, transpose=transpose))


def _check_shape(t: TensorInfo, x: np.ndarray) -> bool:
    """True when x lacked the batch dim (and gets one). Raises RequestError on a shape that does not fit."""
    want = t.shape
    squeezed = x.ndim == len(want) - 1
    got = (1, *x.shape) if squeezed else x.shape
    if len(got) != len(want) or any(w not in (-1, g) for w, g in zip(want[1:], got[1:])) or got[0] == 0:
        shown = ["N" if i == 0 else ("?" if d == -1 else str(d)) for i, d in enumerate(want)]
        raise RequestError(f"input {t.name!r} has shape {list(x.shape)}, the model takes [{', '.join(shown)}]")
    return squeezed


def prepare_feeds(inputs: list[TensorInfo], feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """Check and cast caller inputs; returns (batch-first arrays by input name, whether the batch dim was added).

    Raises RequestError naming the input and what is wrong.
    """
    names = [t.name for t in inputs]
    if len(inputs) == 1 and len(feeds) == 1 and names[0] not in feeds:
        feeds = {names[0]: next(iter(feeds.values()))}
    missing, extra = sorted(set(names) - set(feeds)), sorted(set(feeds) - set(names))
    if missing or extra:
        raise RequestError(f"inputs do not match the model: missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    added: set[bool] = set()
    for t in inputs:
        x = np.asarray(feeds[t.name])
        if x.dtype.kind not in "biuf":
            raise RequestError(f"input {t.name!r} has dtype {x.dtype}, the model takes {t.dtype}", status=415)
        added.add(_check_shape(t, x))
        out[t.name] = x.astype(t.dtype, copy=False)
    if len(added) > 1:
        raise RequestError("send every input with its batch dim, or every input without it")
    squeezed = added == {True}
    return ({k: v[None] for k, v in out.items()} if squeezed else out), squeezed


class ModelHost:
    """Serves the active model with fallback and an optional shadow (see the module docstring)."""

    def __init__(
        self,
        health: HealthConfig,
        *,
        on_runtime_failure: Callable[[str], None] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.health = health
        self.on_runtime_failure = on_runtime_failure
        self.observer = observer
        self._active: LoadedModel | None = None
        self._fallback: LoadedModel | None = None
        self._shadow: ShadowRunner | None = None
        self._lock = threading.Lock()
        self._window: deque[bool] = deque(maxlen=health.error_window)
        self._failure_reported = False
        self.requests = 0
        self.errors = 0
        self.fallback_answers = 0

    # -- model management --------------------------------------------------------------------------------------
    @property
    def active(self) -> LoadedModel | None:
        return self._active

    @property
    def fallback(self) -> LoadedModel | None:
        return self._fallback

    @property
    def shadow(self) -> ShadowRunner | None:
        return self._shadow

    def set_models(self, active: LoadedModel | None, fallback: LoadedModel | None) -> None:
        with self._lock:
            self._active, self._fallback = active, fallback
            self._reset_errors()

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        """Make ``new`` active; the old active becomes the fallback. Returns the old active."""
        with self._lock:
            old, self._active, self._fallback = self._active, new, self._active
            self._reset_errors()
        return old

    def rollback(self) -> LoadedModel:
        """Serve the fallback again; the failed model is dropped. Raises EdgeopsError when there is none."""
        with self._lock:
            if self._fallback is None:
                raise EdgeopsError("no previous model loaded to roll back to")
            self._active, self._fallback = self._fallback, None
            self._reset_errors()
            return self._active

    def set_shadow(self, model: LoadedModel | None) -> None:
        old, self._shadow = self._shadow, (ShadowRunner(model) if model is not None else None)
        if old is not None:
            old.stop()

    def _reset_errors(self) -> None:
        self._window.clear()
        self._failure_reported = False

    # -- serving -----------------------------------------------------------------------------------------------
    def input_schema(self) -> list[TensorInfo] | None:
        model = self._active
        return list(model.manifest.inputs) if model is not None else None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> InferenceResult:
        with self._lock:  # read both once: a swap or rollback after this line does not affect this request
            model, fallback = self._active, self._fallback
        if model is None:
            raise NoModelError("no model is installed yet")
        prepared, added = prepare_feeds(model.manifest.inputs, feeds)
        t0 = time.perf_counter()
        try:
            outputs = model.run(prepared)
        except Exception as exc:  # the runtimes raise their own untyped errors; every one counts
            self._record(False, model)  # may start the automatic rollback, which drops self._fallback
            return self._answer_with_fallback(model, fallback, feeds, exc)
        ms = (time.perf_counter() - t0) * 1e3
        self._record(True, model)
        if self.observer is not None:
            self.observer(model, prepared, outputs, ms)
        shadow = self._shadow
        if shadow is not None:
            shadow.submit(prepared, outputs)
        if added:
            outputs = {k: v[0] for k, v in outputs.items()}
        return InferenceResult(outputs, model.version, ms)

    def _answer_with_fallback(
        self, failed: LoadedModel, fallback: LoadedModel | None, feeds: Mapping[str, np.ndarray], exc: Exception
    ) -> InferenceResult:
        log.warning("model %s failed at run time: %s", failed.version, exc)
        if fallback is None or fallback is failed:
            raise EdgeopsError(f"the model failed at run time: {exc}") from None
        prepared, added = prepare_feeds(fallback.manifest.inputs, feeds)
        t0 = time.perf_counter()
        try:
            outputs = fallback.run(prepared)
        except Exception as exc2:  # untyped runtime errors again: both models failed on this input
            raise EdgeopsError(f"the model failed at run time ({exc}) and so did the previous one ({exc2})") from None
        self.fallback_answers += 1
        if added:
            outputs = {k: v[0] for k, v in outputs.items()}
        return InferenceResult(outputs, fallback.version, (time.perf_counter() - t0) * 1e3)

    def _record(self, ok: bool, model: LoadedModel) -> None:
        with self._lock:
            self.requests += 1
            if model is not self._active:  # answered by a model swapped out meanwhile
                return
            self._window.append(ok)
            if ok:
                return
            self.errors += 1
            errors = self._window.count(False)
            rate = errors / len(self._window)
            trip = errors >= self.health.min_errors and rate > self.health.max_error_rate
            if not trip or self._failure_reported or self.on_runtime_failure is None:
                return
            self._failure_reported = True
        reason = f"{errors} runtime errors in the last {len(self._window)} requests on {model.version}"
        threading.Thread(target=self.on_runtime_failure, args=(reason,), name="rollback", daemon=True).start()

    def status(self) -> dict[str, Any]:
        active, fallback, shadow = self._active, self._fallback, self._shadow
        return {
            "active": _describe(active),
            "previous": _describe(fallback),
            "shadow": shadow.stats() if shadow is not None else None,
            "requests": self.requests,
            "errors": self.errors,
            "fallback_answers": self.fallback_answers,
        }


def _describe(model: LoadedModel | None) -> dict[str, Any] | None:
    if model is None:
        return None
    m = model.manifest
    return {
        "name": m.name,
        "version": m.version,
        "profile": m.profile,
        "slot": model.slot,
        "format": m.format,
        "providers": list(model.runner.backend.providers_used),
    }
