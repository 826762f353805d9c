"""Shadow mode: a candidate model runs beside the active one on live inputs, never serving.

The serving path only enqueues (inputs, active outputs) on a bounded queue and returns; a worker thread runs
the candidate and compares. When the queue is full the sample is dropped and counted, so the shadow can never
slow down or fail a request. Agreement is top-1 agreement for outputs with a class axis (ndim ≥ 2), plus the
largest absolute difference over all outputs.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from device_agent.model_host import LoadedModel

__all__ = ["ShadowRunner"]

log = logging.getLogger(__name__)
QUEUE_SIZE = 64

_Sample = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


class ShadowRunner:
    """Runs ``model`` on what the active model saw and keeps agreement figures."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._queue: queue.Queue[_Sample | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._lock = threading.Lock()
        self.compared = 0  # samples (rows) compared
        self.agreed = 0
        self.max_abs_diff = 0.0
        self.errors = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
        self._thread.start()

    def submit(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        try:
            self._queue.put_nowait((dict(feeds), dict(outputs)))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued sample is compared (tests, promote)."""
        done = threading.Event()

        def join() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=join, daemon=True).start()
        done.wait(timeout)

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1.0)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._compare(*item)
            finally:
                self._queue.task_done()

    def _compare(self, feeds: dict[str, np.ndarray], active: dict[str, np.ndarray]) -> None:
        try:
            mine = self.model.run(feeds)
        except Exception as exc:  # runtime errors are untyped; the shadow must never take the agent down
            log.warning("shadow model %s failed: %s", self.model.version, exc)
            with self._lock:
                self.errors += 1
            return
        rows, agree, diff = 0, 0, 0.0
        for name, want in active.items():
            got = mine.get(name)
            if got is None or got.shape != want.shape:
                continue
            diff = max(diff, float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0.0)))
            if want.ndim >= 2 and rows == 0:
                rows = want.shape[0]
                same = np.argmax(got, axis=-1) == np.argmax(want, axis=-1)
                agree = int(same.reshape(rows, -1).all(axis=1).sum())
        with self._lock:
            self.compared += rows
            self.agreed += agree
            self.max_abs_diff = max(self.max_abs_diff, diff)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": self.model.version,
                "slot": self.model.slot,
                "compared": self.compared,
                "agreement": (self.agreed / self.compared) if self.compared else None,
                "max_abs_diff": self.max_abs_diff,
                "errors": self.errors,
                "dropped": self.dropped,
            }
