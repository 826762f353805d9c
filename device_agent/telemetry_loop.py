"""The agent's telemetry loop: every interval, one message with latency, traffic, resources and drift.

Request-path hooks (:meth:`TelemetryLoop.observe`) only append to bounded in-memory windows; the loop thread
builds the message and hands it to the reporter (spool first). Drift is measured against the active model's
signed reference histograms and restarts when the model changes; a change of drift level (ok → warn → alert)
is also reported as a ``drift`` event. Dropped spool messages are reported as a ``spool.dropped`` event; each
message carries the spool's state (pending, dropped, and the RAM fallback's held / lost / error on a full disk).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.telemetry import DriftMonitor, LatencyWindow, ResourceProbe

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from device_agent.model_host import LoadedModel

__all__ = ["TelemetryLoop"]

log = logging.getLogger(__name__)
DRIFT_VALUES_PER_INTERVAL = 1_000_000  # per interval; past it, requests are not binned (bounds the request-path cost)


class TelemetryLoop:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.interval_s = agent.cfg.telemetry.interval_s
        self.latency = LatencyWindow()
        self.probe = ResourceProbe()
        self._drift: DriftMonitor | None = None
        self._drift_level = "ok"
        self._drift_values = 0
        self._last = {"requests": 0, "errors": 0, "fallback_answers": 0}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def model_changed(self, model: LoadedModel | None) -> None:
        t = self.agent.cfg.telemetry
        self._drift = (
            DriftMonitor(model.manifest.drift, warn=t.psi_warn, alert=t.psi_alert, min_samples=t.drift_min_samples)
            if model is not None
            else None
        )
        self._drift_level = "ok"

    def observe(
        self, model: LoadedModel, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], ms: float
    ) -> None:
        self.latency.add(ms)
        drift = self._drift
        if drift is not None and self._drift_values < DRIFT_VALUES_PER_INTERVAL:
            self._drift_values += sum(int(x.size) for x in feeds.values())
            for name, x in feeds.items():
                drift.observe("inputs", name, x)
            for name, y in outputs.items():
                drift.observe("outputs", name, y)

    def set_interval(self, seconds: float) -> None:
        self.interval_s = float(seconds)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            if self._stop.is_set():
                return
            if self._wake.is_set():  # interval changed: restart the wait
                self._wake.clear()
                continue
            try:
                self.tick()
            except Exception:  # the loop must survive anything one tick meets; logged with its traceback
                log.exception("telemetry tick failed")

    def _counters(self) -> dict[str, int]:
        status = self.agent.host.status()
        now = {k: int(status[k]) for k in self._last}
        delta = {k: now[k] - self._last[k] for k in now}
        self._last = now
        return delta

    def tick(self) -> dict[str, Any]:
        """Build and report one telemetry message (also called directly by tests and `status`)."""
        agent = self.agent
        drift = self._drift.snapshot_and_reset() if self._drift is not None else None
        self._drift_values = 0
        doc = {
            "model_version": agent.active_version(),
            "interval_s": self.interval_s,
            "latency_ms": self.latency.snapshot_and_reset(),
            **self._counters(),
            "resources": self.probe.sample(),
            "drift": drift,
            "health": agent.health(),
            "spool": agent.reporter.spool_status(),
        }
        agent.reporter.telemetry(doc)
        if drift is not None and drift.get("level") in ("ok", "warn", "alert") and drift["level"] != self._drift_level:
            self._drift_level = drift["level"]
            agent.reporter.event("drift", level=drift["level"], version=agent.active_version(), drift=drift)
        if agent.reporter.connected:  # offline, the report waits for the connect (Reporter.report_spool_drops)
            agent.reporter.report_spool_drops()
        return doc
