"""``edgeops-agent``: the device-side command line.

- ``run --config agent.toml``: the daemon. Logs to stderr (journald under systemd), stops cleanly on SIGTERM
  or SIGINT, tells systemd it is ready (``Type=notify``) once the model is loaded and the API is up.
- ``infer --config agent.toml INPUT.npy``: one inference through the running agent's API; when no agent is
  running (or ``--local``), the active slot is verified and run in this process.
- ``batch --config agent.toml FOLDER``: every ``*.npy`` in FOLDER → ``*.out.npy`` beside it (offline, local).
- ``status --config agent.toml [--json]``: from the running agent, else from the slots on disk.
- ``install --config agent.toml ARTIFACT``: stage, gate and swap into a stopped agent's slots.
- ``check ARTIFACT --pubkey PUB [--profile P]``: the install gate alone, no config needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.api_client import ApiClient
from device_agent.config import AgentConfig, load_config
from device_agent.health_gate import golden_excess
from device_agent.model_host import ModelHost, load_model
from device_agent.slot_store import SlotStore
from edgeops.artifact import verify_artifact
from edgeops.errors import EdgeopsError, RequestError, TransportError, UntrustedInput
from edgeops.signing import load_public_key

__all__ = ["main"]

log = logging.getLogger("edgeops-agent")


def _setup_logging(verbose: bool) -> None:
    journald = "JOURNAL_STREAM" in os.environ  # journald adds its own timestamps
    fmt = "%(levelname)s %(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    logging.getLogger("paho").setLevel(logging.WARNING)


def _sd_notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), addr)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def _run(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent  # the daemon's wiring; not needed by the offline commands

    _setup_logging(args.verbose)
    cfg = load_config(args.config)
    agent = Agent(cfg)
    stop_requested = threading.Event()

    def stop(signum: int, _frame: Any) -> None:  # only flags: the main loop stops the agent outside the handler
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.start()
    log.info(
        "agent %s/%s up: model %s, api %s",
        cfg.fleet,
        cfg.device_id,
        agent.active_version(),
        agent.api.address if agent.api else "off",
    )
    _sd_notify("READY=1")
    while not stop_requested.wait(1.0):
        pass
    _sd_notify("STOPPING=1")
    agent.stop()
    return 0


def _local_host(cfg: AgentConfig) -> ModelHost:
    """The active slot, verified and loaded in this process (no agent needed)."""
    keys = [load_public_key(p) for p in cfg.trusted_keys]
    store = SlotStore(Path(cfg.data_dir) / "slots", trusted_keys=keys, profile=cfg.profile, read_only=True)
    slot = store.state.active
    if slot is None:
        raise EdgeopsError(f"no model installed in {cfg.data_dir} (run the agent or `edgeops-agent install`)")
    host = ModelHost(cfg.health)
    host.set_models(load_model(store.verify_slot(slot), slot, threads=cfg.threads), None)
    return host


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RequestError(f"{path}: not a readable .npy file ({exc})") from None


def _infer(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    x = _load_npy(args.input)
    outputs: dict[str, np.ndarray] | None = None
    if not args.local and cfg.api.address:
        try:
            outputs, version = ApiClient(cfg.api.address).infer(x)
            via = "agent"
        except TransportError:
            outputs = None
    if outputs is None:
        result = _local_host(cfg).infer({"input": x})
        outputs, version, via = result.outputs, result.version, "local"
    if args.out:
        np.save(args.out, next(iter(outputs.values())))
    if args.json:
        print(
            json.dumps({"model_version": version, "via": via, "outputs": {k: v.tolist() for k, v in outputs.items()}})
        )
    else:
        for name, y in outputs.items():
            top = f", top-1 {int(np.argmax(y.reshape(-1, y.shape[-1])[0]))}" if y.ndim >= 1 and y.size else ""
            print(f"{name}: shape {list(y.shape)}{top} (model {version}, {via})")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from device_agent.batch import run_batch

    cfg = load_config(args.config)
    summary = run_batch(args.folder, _local_host(cfg), overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"done": summary.done, "skipped": summary.skipped, "failed": summary.failed}))
    else:
        print(f"{summary.done} done, {summary.skipped} skipped, {len(summary.failed)} failed")
        for name, reason in summary.failed:
            print(f"  {name}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


def _status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    doc: dict[str, Any] | None = None
    if cfg.api.address:
        try:
            doc = {"running": True, **ApiClient(cfg.api.address, timeout=3.0).status()}
        except TransportError:
            doc = None
    if doc is None:
        keys = [load_public_key(p) for p in cfg.trusted_keys]
        store = SlotStore(Path(cfg.data_dir) / "slots", trusted_keys=keys, profile=cfg.profile, read_only=True)
        doc = {"running": False, "device": cfg.device_id, "slots": store.state.to_json()}
    if args.json:
        print(json.dumps(doc, sort_keys=True))
    else:
        slots = doc.get("slots", {})
        print(
            f"device {doc.get('device')}: {'running' if doc['running'] else 'not running'}; active slot "
            f"{slots.get('active')} ({slots.get('versions', {}).get(slots.get('active'), '-')}), previous "
            f"{slots.get('previous')}, floor {slots.get('floor')}"
        )
    return 0


def _install(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent

    cfg = load_config(args.config)
    agent = Agent(cfg, connect=False, serve_api=False)
    try:
        agent.load_slots()
        gate = agent.install(args.artifact, source="cli", shadow=False)
    finally:
        agent.stop()
    print(json.dumps(gate.to_json()) if args.json else f"{'installed' if gate.passed else 'rejected'}: {gate.reason}")
    return 0 if gate.passed else 1


def _check(args: argparse.Namespace) -> int:
    keys = [load_public_key(p) for p in args.pubkey]
    artifact = verify_artifact(args.artifact, keys)
    m = artifact.manifest
    if args.profile and m.profile != args.profile:
        raise UntrustedInput(f"artifact is for profile {m.profile!r}, this device is {args.profile!r}")
    result = {"valid": True, "name": m.name, "version": m.version, "profile": m.profile, "golden": "not run"}
    if m.format != "coreml":
        excess = golden_excess(artifact, load_model(artifact, "-", threads=args.threads).runner)
        if excess > 0:
            raise UntrustedInput(f"golden outputs differ beyond tolerance (by {excess:.3g})")
        result["golden"] = "passed"
    print(json.dumps(result) if args.json else f"ok: {m.name} {m.version} ({m.profile}); golden {result['golden']}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeops-agent", description="edgeops device agent")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", type=Path, required=True, help="agent.toml")
        return p

    run = with_config("run", "run the agent daemon")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)
    infer = with_config("infer", "run one input (.npy) through the active model")
    infer.add_argument("input", type=Path)
    infer.add_argument("--out", type=Path, help="write the first output here (.npy)")
    infer.add_argument("--local", action="store_true", help="run in this process even if the agent is running")
    infer.add_argument("--json", action="store_true")
    infer.set_defaults(func=_infer)
    batch = with_config("batch", "run every *.npy in a folder; results are written next to the inputs")
    batch.add_argument("folder", type=Path)
    batch.add_argument("--overwrite", action="store_true", help="re-run inputs that already have a result")
    batch.add_argument("--json", action="store_true")
    batch.set_defaults(func=_batch)
    status = with_config("status", "slots, versions and health")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)
    install = with_config("install", "install an artifact into a stopped agent's slots (gate + swap)")
    install.add_argument("artifact", type=Path)
    install.add_argument("--json", action="store_true")
    install.set_defaults(func=_install)
    check = sub.add_parser("check", help="verify an artifact and run its golden inputs, as the agent would")
    check.add_argument("artifact", type=Path)
    check.add_argument("--pubkey", type=Path, action="append", required=True, help="trusted key (repeatable)")
    check.add_argument("--profile", help="the device's profile; the artifact must match it")
    check.add_argument("--threads", type=int, default=1)
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeopsError as exc:
        print(f"edgeops-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
