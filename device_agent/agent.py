"""The agent: wires the slot store, model host, health gate, reporter, API and command guard together.

Flows (docs/agent.md has the diagram):

- start-up: take the data-dir lock, re-verify and load the active slot (previous slot if the active one fails
  verification, reported as ``slot.corrupt``), install ``initial_artifact`` when no slot is active, load the
  previous slot as fallback in the background, then start the API, MQTT and telemetry. The broker being away
  changes nothing but the spool.
- install: stage (verify) → load → health gate → commit → swap. Any failure leaves the serving model and
  ``state.json`` as they were and is reported as ``install.rejected`` with the failed check and the reason.
- rollback: on the command, or when the model host reports runtime errors above the threshold.
- shadow: an install with ``shadow=True`` loads and gates the candidate and runs it beside the active model;
  promote commits and swaps it, drop discards it.

Installs, rollbacks and shadow changes are serialised by one lock; inference never takes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from device_agent import __version__
from device_agent.commands import CommandDispatcher
from device_agent.config import AgentConfig
from device_agent.fault_points import fault_point
from device_agent.health_gate import GateResult, run_health_gate
from device_agent.http_api import ApiServer
from device_agent.model_host import LoadedModel, ModelHost, load_model
from device_agent.ota import OtaClient
from device_agent.reporter import Reporter
from device_agent.service import InferenceResult
from device_agent.slot_store import SlotStore
from device_agent.telemetry_loop import TelemetryLoop
from device_agent.trust_client import TrustClient
from edgeops.errors import EdgeopsError, StorageError, UntrustedInput
from edgeops.manifest import TensorInfo
from edgeops.signing import load_public_key

__all__ = ["Agent", "AgentLocked"]

log = logging.getLogger(__name__)


class AgentLocked(StorageError):
    """Another agent process holds the data directory."""


def _lock(data_dir: Path) -> IO[bytes]:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        f = (data_dir / "agent.lock").open("ab")
    except OSError as exc:
        raise StorageError(f"cannot use the data directory {data_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise AgentLocked(f"another edgeops-agent is running on {data_dir}") from None
    return f


class Agent:
    """One device agent. ``connect=False`` runs it without MQTT (CLI install, offline tools)."""

    def __init__(self, cfg: AgentConfig, *, connect: bool = True, serve_api: bool = True) -> None:
        self.cfg = cfg
        self._serve_api = serve_api and bool(cfg.api.address)
        self._lockfile = _lock(Path(cfg.data_dir))
        self.trust: TrustClient | None = None
        if cfg.trust_root is not None:  # TUF mode: the trusted root names the artifact and command keys
            self.trust = TrustClient(
                Path(cfg.data_dir), cfg.fleet, cfg.trust_root, on_root=self._on_root, on_reject=self._on_trust_reject
            )
            keys = list(self.trust.artifact_keys())
        else:
            keys = [load_public_key(p) for p in cfg.trusted_keys]
        self.store = SlotStore(Path(cfg.data_dir) / "slots", trusted_keys=keys, profile=cfg.profile)
        self.host = ModelHost(cfg.health, on_runtime_failure=self._on_runtime_failure)
        self.telemetry = TelemetryLoop(self)
        self.host.observer = self.telemetry.observe
        self.reporter = Reporter(cfg, state=self.state, on_command=self._on_message, connect=connect)
        self.commands = CommandDispatcher(self)
        self.ota = OtaClient(self)
        self.api: ApiServer | None = None
        self._ops = threading.Lock()
        self._stopped = threading.Event()
        self._loader: threading.Thread | None = None  # loads the previous slot as fallback after start
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.load_slots()
        if self.host.active is None and self.cfg.initial_artifact is not None:
            try:
                self.install(self.cfg.initial_artifact, source="initial_artifact")
            except EdgeopsError as exc:
                log.error("initial artifact not installed: %s", exc)
        if self._serve_api:
            self.api = ApiServer(self, self.cfg.api.address, max_request_bytes=self.cfg.api.max_request_bytes)
            self.api.start()
        self.ota.start()
        self.reporter.start()
        self.reporter.event("agent.started", version=__version__, active=self.active_version())
        self.telemetry.start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.telemetry.stop()
        self.ota.stop()
        if self.api is not None:
            self.api.stop()
        self.reporter.event("agent.stopped", active=self.active_version())
        self.reporter.stop()
        self.host.set_shadow(None)
        self.commands.close()
        if self._loader is not None:  # a runtime session half-created at interpreter exit aborts the process
            self._loader.join(timeout=30)
        self._lockfile.close()

    def load_slots(self) -> None:
        s = self.store.state
        active = self._verified_load(s.active) if s.active else None
        if s.active and active is None and s.previous:
            active = self._verified_load(s.previous)
            if active is not None:
                self.store.forget(s.active)
                self.store.commit(active.slot, active.version)
        elif s.active and active is None:
            self.store.forget(s.active)
        self.host.set_models(active, None)
        self.telemetry.model_changed(active)
        prev = self.store.state.previous
        if active is not None and prev is not None:
            self._loader = threading.Thread(target=self._load_fallback, args=(prev,), name="load-previous", daemon=True)
            self._loader.start()

    def _verified_load(self, slot: str) -> LoadedModel | None:
        try:
            return load_model(self.store.verify_slot(slot), slot, threads=self.cfg.threads)
        except EdgeopsError as exc:
            log.error("slot %s not loaded: %s", slot, exc)
            self.reporter.event("slot.corrupt", slot=slot, reason=str(exc))
            return None

    def _load_fallback(self, slot: str) -> None:
        try:
            model = load_model(self.store.verify_slot(slot), slot, threads=self.cfg.threads)
        except EdgeopsError as exc:
            log.warning("previous slot %s not loaded as fallback: %s", slot, exc)
            return
        with self._ops:
            if self.host.fallback is None and self.store.state.previous == slot:
                self.host.set_models(self.host.active, model)

    # -- install / rollback / shadow ---------------------------------------------------------------------------
    def install(self, path: Path, *, source: str = "file", shadow: bool = False) -> GateResult:
        """Stage, gate and (unless ``shadow``) swap in the artifact at ``path``.

        Returns the gate result (a failed gate leaves the old model serving). Raises UntrustedInput or
        StorageError when the artifact is refused before it is loaded; both are reported as events too.
        """
        with self._ops:
            self.host.set_shadow(None)
            try:
                slot, artifact = self.store.stage(path)
            except (UntrustedInput, StorageError) as exc:
                self.reporter.event("install.rejected", source=source, check="verify", reason=str(exc))
                raise
            version = artifact.manifest.version
            try:
                model = load_model(artifact, slot, threads=self.cfg.threads)
            except EdgeopsError as exc:
                gate = GateResult(False, "load", f"the runtime cannot load the model: {exc}")
            else:
                gate = run_health_gate(
                    artifact,
                    model.runner,
                    latency_runs=self.cfg.health.latency_runs,
                    budget_factor=self.cfg.health.latency_budget_factor,
                )
            if not gate.passed:
                self.reporter.event(
                    "install.rejected",
                    source=source,
                    version=version,
                    check=gate.check,
                    reason=gate.reason,
                    gate=gate.to_json(),
                )
                return gate
            fault_point("install.gated")
            if shadow:
                self.host.set_shadow(model)
                self.reporter.event("shadow.started", version=version, gate=gate.to_json())
            else:
                self._commit(model, event="install.succeeded", source=source, gate=gate.to_json())
        self.reporter.publish_state()
        return gate

    def _commit(self, model: LoadedModel, *, event: str, **fields: Any) -> None:
        old = self.active_version()
        self.store.commit(model.slot, model.version)
        fault_point("install.committed")
        self.host.swap(model)
        fault_point("install.swapped")
        self.telemetry.model_changed(model)
        self.reporter.event(event, version=model.version, previous=old, **fields)

    def promote_shadow(self) -> str:
        with self._ops:
            shadow = self.host.shadow
            if shadow is None:
                raise EdgeopsError("no shadow model to promote")
            stats = shadow.stats()
            self.host.set_shadow(None)
            self._commit(shadow.model, event="shadow.promoted", shadow=stats)
        self.reporter.publish_state()
        return shadow.model.version

    def drop_shadow(self) -> str:
        with self._ops:
            shadow = self.host.shadow
            if shadow is None:
                raise EdgeopsError("no shadow model to drop")
            self.host.set_shadow(None)
            self.reporter.event("shadow.dropped", version=shadow.model.version, shadow=shadow.stats())
        self.reporter.publish_state()
        return shadow.model.version

    def rollback(self, reason: str, *, automatic: bool = False) -> str:
        """Serve the previous slot again. Raises EdgeopsError when there is none."""
        with self._ops:
            failed = self.host.active
            fallback = self.host.fallback
            if fallback is None or fallback.slot != self.store.state.previous:
                raise EdgeopsError("no previous model loaded to roll back to")
            self.store.rollback(keep_current=not automatic)
            fault_point("rollback.committed")
            if automatic:
                self.host.rollback()
            else:
                self.host.swap(fallback)
            fault_point("rollback.swapped")
            self.telemetry.model_changed(fallback)
            self.reporter.event(
                "rollback",
                automatic=automatic,
                reason=reason,
                version=fallback.version,
                previous=failed.version if failed else None,
            )
        self.reporter.publish_state()
        return fallback.version

    def _on_runtime_failure(self, reason: str) -> None:
        try:
            self.rollback(reason, automatic=True)
        except EdgeopsError as exc:
            self.reporter.event("model.failing", reason=reason, rollback=str(exc))

    # -- update trust (TUF mode) -------------------------------------------------------------------------------
    def _on_root(self, version: int) -> None:
        """A new root is trusted: its artifact and command keys replace the old ones now."""
        assert self.trust is not None
        self.store.trusted_keys = list(self.trust.artifact_keys())
        self.commands.guard.set_keys(self.trust.command_keys())
        log.info("trust: root v%d in force", version)
        self.reporter.event("trust.root", version=version)

    def _on_trust_reject(self, what: str, reason: str, detail: str) -> None:
        self.reporter.event("trust.rejected", what=what, reason=reason, detail=detail)

    # -- MQTT commands -----------------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.trust is not None and self.trust.owns(topic):
            self.trust.handle(topic, payload)
            self.ota.trust_updated()
        elif self.ota.owns(topic):
            self.ota.handle(topic, payload)
        else:
            self.commands.handle(topic, payload)

    # -- InferenceService (the API and batch front ends serve the agent) --------------------------------------
    def infer(self, feeds: Mapping[str, np.ndarray]) -> InferenceResult:
        return self.host.infer(feeds)

    def input_schema(self) -> list[TensorInfo] | None:
        return self.host.input_schema()

    # -- state -------------------------------------------------------------------------------------------------
    def active_version(self) -> str | None:
        model = self.host.active
        return model.version if model is not None else None

    def health(self) -> str:
        if self.host.active is None:
            return "no-model"
        return "degraded" if self.host.status()["errors"] and self.host.fallback_answers else "ok"

    def state(self) -> dict[str, Any]:
        s = self.store.state
        return {
            "fleet": self.cfg.fleet,
            "profile": self.cfg.profile,
            "groups": list(self.cfg.groups),
            "agent_version": __version__,
            "health": self.health(),
            "slots": {"active": s.active, "previous": s.previous, "floor": s.floor, "versions": s.versions},
            "models": self.host.status(),
            "ota": self.ota.progress(),
            "pid": os.getpid(),
        }

    def status(self) -> dict[str, Any]:
        return {
            "device": self.cfg.device_id,
            **self.state(),
            "connected": self.reporter.connected,
            "spool": {"pending": self.reporter.spool.pending(), "dropped": self.reporter.spool.dropped},
            "telemetry_interval_s": self.telemetry.interval_s,
            "api": self.api.address if self.api is not None else None,
            "uptime_s": round(time.time() - self.started_at, 1),
            "trust": self.trust.status() if self.trust is not None else {"mode": "static-keys"},
        }

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
