"""Fleet commands on the device: check with the guard, acknowledge, run one at a time, report the outcome.

Every command that arrives gets exactly one of these events on the device's event topic, carrying the
command's nonce so the sender can match it: ``command.rejected`` (with the guard's reason code: unsigned,
bad-signature, expired, replayed, wrong-target ...), or ``command.accepted`` followed by ``command.done`` (with
a result) or ``command.failed`` (with the reason). Commands run on one worker thread, in arrival order, so
paho's network thread is never blocked by an install; a full queue rejects with ``busy``.

A refusal for the validity window (``expired``, ``not-yet-valid``) of a correctly signed command also carries
``device_time``, ``issued_at``, ``expires_at`` (UTC, ISO 8601) and ``clock_offset_s`` (signed issue time minus
device time: how far the device's clock is behind, negative when ahead, plus the delivery delay), and is logged as
a warning: a device clock off by a day shows as such. The clock is read for each command (``time.time``), so a
clock stepped by NTP takes effect at the next command.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.command_guard import CommandClockRejected, CommandGuard, SqliteNonceStore
from edgeops.errors import CommandRejected, EdgeopsError
from edgeops.protocol import Command, CommandName, peek_nonce
from edgeops.signing import load_public_key

if TYPE_CHECKING:
    from device_agent.agent import Agent

__all__ = ["CommandDispatcher"]

log = logging.getLogger(__name__)
QUEUE_SIZE = 16


class CommandDispatcher:
    def __init__(self, agent: Agent) -> None:
        cfg = agent.cfg
        self.agent = agent
        self._nonces = SqliteNonceStore(Path(cfg.data_dir) / "nonces.sqlite")
        self.guard = CommandGuard(
            fleet=cfg.fleet,
            device_id=cfg.device_id,
            groups=cfg.groups,
            keys=agent.trust.command_keys() if agent.trust else [load_public_key(p) for p in cfg.command_keys],
            nonces=self._nonces,
        )
        self._queue: queue.Queue[Command | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._handlers: dict[CommandName, Callable[[Command], Any]] = {
            CommandName.STATUS: self._status,
            CommandName.PROMOTE_SHADOW: lambda c: {"version": agent.promote_shadow()},
            CommandName.DROP_SHADOW: lambda c: {"version": agent.drop_shadow()},
            CommandName.ROLLBACK: lambda c: {"version": agent.rollback("command", automatic=False)},
            CommandName.SET_TELEMETRY_INTERVAL: self._set_interval,
            CommandName.INSTALL_FROM_FILE: self._install,
            CommandName.OTA_UPDATE: lambda c: agent.ota.request(str(c.args["release_id"])),
        }
        self._thread = threading.Thread(target=self._work, name="commands", daemon=True)
        self._thread.start()

    def handle(self, topic: str, payload: bytes) -> None:
        """Called on the MQTT thread for every message on a command topic; never raises."""
        events = self.agent.reporter
        try:
            cmd = self.guard.check(payload, now=time.time())
        except CommandClockRejected as exc:  # signed, but outside its window by this device's clock
            log.warning("command refused (%s): %s", exc.reason, exc.detail)
            events.event(
                "command.rejected",
                reason=exc.reason,
                detail=exc.detail,
                topic=topic,
                nonce=peek_nonce(payload),
                **exc.fields(),
            )
            return
        except CommandRejected as exc:
            events.event(
                "command.rejected", reason=exc.reason, detail=exc.detail, topic=topic, nonce=peek_nonce(payload)
            )
            return
        try:
            self._queue.put_nowait(cmd)
        except queue.Full:
            events.event("command.rejected", reason="busy", cmd=str(cmd.name.value), nonce=cmd.nonce)
            return
        events.event("command.accepted", cmd=str(cmd.name.value), nonce=cmd.nonce, target=cmd.target)

    def _work(self) -> None:
        while True:
            cmd = self._queue.get()
            if cmd is None:
                return
            name = str(cmd.name.value)
            try:
                result = self._handlers[cmd.name](cmd)
            except EdgeopsError as exc:
                self.agent.reporter.event("command.failed", cmd=name, nonce=cmd.nonce, reason=str(exc))
            except Exception as exc:  # a bug in a handler must not kill the worker; logged with traceback
                log.exception("command %s failed", name)
                self.agent.reporter.event("command.failed", cmd=name, nonce=cmd.nonce, reason=f"internal: {exc}")
            else:
                if isinstance(result, dict) and result.get("failed"):
                    self.agent.reporter.event(
                        "command.failed", cmd=name, nonce=cmd.nonce, reason=result["reason"], result=result
                    )
                else:
                    self.agent.reporter.event("command.done", cmd=name, nonce=cmd.nonce, result=result)

    def _status(self, cmd: Command) -> dict[str, Any]:
        self.agent.reporter.publish_state()
        return self.agent.status()

    def _set_interval(self, cmd: Command) -> dict[str, Any]:
        self.agent.telemetry.set_interval(float(cmd.args["interval_s"]))
        return {"interval_s": self.agent.telemetry.interval_s}

    def _install(self, cmd: Command) -> dict[str, Any]:
        gate = self.agent.install(Path(cmd.args["path"]), source="command", shadow=bool(cmd.args.get("shadow")))
        doc = gate.to_json()
        doc["failed"] = not gate.passed
        return doc

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1.0)
        self._thread.join(timeout=5)
        self._nonces.close()
