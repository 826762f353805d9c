"""A fleet simulator harness: N real agents in one process, each with its own data dir and MQTT connection.

:class:`FleetSim` writes one ``agent.toml`` per simulated device (``ROOT/<device_id>/agent.toml``, data in
``ROOT/<device_id>/data``) and runs a real :class:`~device_agent.agent.Agent` for each: its own slot store,
model host (a loaded copy of the model, as on a real device), SQLite spool, outbox and MQTT session with its
own client id, will and retained state. Nothing is shared or faked, so what the broker and the fleet side see
is what N devices would send; only the process (and so the GIL and the cores) is shared. It is meant for
integration tests and scale benchmarks, not for production.

Guarantees:

- ``start`` starts the agents one after the other; when one cannot start, the ones already started are
  stopped again and the error is raised, so a failed start leaves nothing running.
- ``stop`` stops every agent (in parallel: each publishes its retained ``online: false`` state and disconnects
  cleanly), even when some fail; it raises the first failure afterwards. Calling it twice is harmless.
- Each simulated agent runs its model with ``threads`` runtime threads (1 by default, so that N agents share
  the cores instead of starting N × the manifest's thread pool).

``python -m device_agent.sim --n 20 --broker mqtt://127.0.0.1:1883 --fleet F --profile P --pubkey K
--artifact A --root DIR --duration 60`` runs a simulated fleet until the duration ends or SIGINT/SIGTERM, and
prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from device_agent.agent import Agent
from device_agent.config import load_config
from edgeops.errors import EdgeopsError, StorageError
from edgeops.protocol import validate_segment

__all__ = ["FleetSim", "SimDevice", "main"]

log = logging.getLogger(__name__)

_STOP_WORKERS = 32  # agents stopped concurrently


@dataclass(frozen=True)
class SimDevice:
    """One simulated device: its id, its ``agent.toml`` and its data directory."""

    device_id: str
    config_path: Path
    data_dir: Path


def _toml_value(value: object) -> str:
    """A TOML value for a str, number, bool or list of them (JSON string escapes are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _toml(doc: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, section in doc.items():
        if isinstance(section, dict):
            lines += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in section.items())]
    return "\n".join(lines) + "\n"


class FleetSim:
    """N in-process agents against one broker (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        n: int,
        fleet: str,
        profile: str,
        broker_url: str,
        trusted_keys: Sequence[Path] = (),
        command_keys: Sequence[Path] | None = None,
        trust_root: Path | None = None,
        groups: Callable[[int], Sequence[str]] | None = None,
        initial_artifact: Path | None = None,
        telemetry_interval_s: float = 60.0,
        serve_api: bool = False,
        id_prefix: str = "sim",
        threads: int | None = 1,
        extra: Callable[[int], dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        """Write the N ``agent.toml`` files under ``root/<device_id>/`` (nothing starts yet).

        Device ids are ``{id_prefix}-0000``, ``{id_prefix}-0001`` ...; ``groups(i)`` gives device i's groups.
        With ``serve_api`` each agent serves its HTTP API on a free 127.0.0.1 port. Raises ValueError for a bad
        ``n``, id prefix, fleet or group, and StorageError when the files cannot be written. ``extra(i)`` gives
        device i more config sections (``{"health": {"latency_budget_factor": 0.5}}``), merged over the defaults.
        Keys: ``trusted_keys`` (+ ``command_keys``) for static-key agents, or ``trust_root`` (a TUF root, [trust]).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if bool(trusted_keys) == (trust_root is not None):
            raise ValueError("give either trusted_keys or trust_root")
        validate_segment(fleet, "fleet")
        self.root = Path(root)
        self.serve_api = serve_api
        self._agents: list[Agent] = []
        self._lock = threading.Lock()
        self.devices: list[SimDevice] = []
        common: dict[str, Any] = {"fleet": fleet, "profile": profile}
        if trust_root is None:
            common["trusted_keys"] = [str(Path(k).resolve()) for k in trusted_keys]
            common["command_keys"] = [str(Path(k).resolve()) for k in (command_keys or trusted_keys)]
        if threads is not None:
            common["threads"] = threads
        if initial_artifact is not None:
            common["initial_artifact"] = str(Path(initial_artifact).resolve())
        for i in range(n):
            device_id = validate_segment(f"{id_prefix}-{i:04d}", "device_id")
            folder = self.root / device_id
            doc = {
                "device_id": device_id,
                **common,
                "groups": [validate_segment(str(g), "group") for g in (groups(i) if groups else ())],
                "data_dir": str((folder / "data").resolve()),
                "broker": {"url": broker_url},
                "telemetry": {"interval_s": telemetry_interval_s},
                "api": {"address": "127.0.0.1:0" if serve_api else ""},
            }
            if trust_root is not None:
                doc["trust"] = {"root": str(Path(trust_root).resolve())}
            for section, values in (extra(i) if extra else {}).items():
                doc[section] = {**doc.get(section, {}), **values}
            self.devices.append(SimDevice(device_id, folder / "agent.toml", folder / "data"))
            self._write(folder / "agent.toml", _toml(doc))

    @staticmethod
    def _write(path: Path, text: str) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every agent (config checked, slots loaded, initial artifact installed, MQTT connecting).

        Raises RuntimeError when already started, or what the failing agent raised (ConfigError,
        StorageError, AgentLocked ...) after stopping the agents started before it.
        """
        with self._lock:
            if self._agents:
                raise RuntimeError("FleetSim.start() called twice")
            for device in self.devices:
                try:
                    agent = Agent(load_config(device.config_path), serve_api=self.serve_api)
                    self._agents.append(agent)
                    agent.start()
                except BaseException:
                    log.error("sim: %s did not start; stopping the %d started", device.device_id, len(self._agents))
                    self._stop_after_failed_start()
                    raise

    def stop(self) -> None:
        """Stop every agent cleanly (retained offline state, clean disconnect). Raises the first failure."""
        with self._lock:
            self._stop_locked()

    def _stop_after_failed_start(self) -> None:
        try:
            self._stop_locked()
        except Exception:  # the start failure is the one to raise; this one is logged with its traceback
            log.exception("sim: stopping the started agents failed too")

    def _stop_locked(self) -> None:
        agents, self._agents = self._agents, []
        if not agents:
            return
        with ThreadPoolExecutor(max_workers=min(len(agents), _STOP_WORKERS), thread_name_prefix="sim-stop") as pool:
            futures = [pool.submit(a.stop) for a in agents]
        for future in futures:  # every agent has been stopped (or tried) by now: report the first failure
            error = future.exception()
            if error is not None:
                raise error

    def __enter__(self) -> FleetSim:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- observation -------------------------------------------------------------------------------------------
    @property
    def agents(self) -> list[Agent]:
        """The running agents, in device order (empty before ``start`` and after ``stop``)."""
        return list(self._agents)

    def connected_count(self) -> int:
        return sum(1 for a in self._agents if a.reporter.connected)

    def spool_pending(self) -> int:
        """Messages written to the agents' spools and not yet acknowledged by the broker, all agents together."""
        return sum(a.reporter.spool.pending() for a in self._agents)

    def wait_connected(self, timeout: float) -> bool:
        """True once every agent is connected; False when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while self.connected_count() < len(self._agents):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return bool(self._agents)

    def summary(self) -> str:
        return (
            f"{len(self._agents)} agents started, {self.connected_count()} connected, "
            f"spool pending {self.spool_pending()}"
        )


# -- command line ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device_agent.sim", description="run N simulated edgeops agents")
    p.add_argument("--n", type=int, required=True, help="number of agents")
    p.add_argument("--broker", required=True, help="broker URL, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--fleet", required=True)
    p.add_argument("--profile", required=True, help="the devices' hardware profile")
    p.add_argument("--pubkey", type=Path, action="append", required=True, help="trusted signing key (repeatable)")
    p.add_argument("--artifact", type=Path, help="initial artifact installed on every agent")
    p.add_argument("--root", type=Path, help="folder for the agents' configs and data (default: a temp dir)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    p.add_argument("--telemetry-interval", type=float, default=60.0, help="seconds between telemetry messages")
    p.add_argument("--group", action="append", default=[], help="group of every agent (repeatable)")
    p.add_argument("--id-prefix", default="sim")
    p.add_argument("--serve-api", action="store_true", help="each agent serves its HTTP API on a free port")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _run(args: argparse.Namespace, root: Path) -> int:
    groups: list[str] = list(args.group)
    sim = FleetSim(
        root,
        n=args.n,
        fleet=args.fleet,
        profile=args.profile,
        broker_url=args.broker,
        trusted_keys=args.pubkey,
        groups=lambda _i: groups,
        initial_artifact=args.artifact,
        telemetry_interval_s=args.telemetry_interval,
        serve_api=args.serve_api,
        id_prefix=args.id_prefix,
    )
    done = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        t0 = time.monotonic()
        sim.start()
        try:
            print(f"sim: {len(sim.agents)} agents started in {time.monotonic() - t0:.1f} s under {root}", flush=True)
            done.wait(max(0.0, args.duration))
            print(f"sim: {sim.summary()} after {time.monotonic() - t0:.1f} s", flush=True)
        finally:
            sim.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.root is not None:
            return _run(args, args.root)
        with tempfile.TemporaryDirectory(prefix="edgeops-sim-") as tmp:
            return _run(args, Path(tmp))
    except (EdgeopsError, ValueError) as exc:
        print(f"sim: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
