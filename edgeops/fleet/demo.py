"""``edgeops demo``: the whole flow on one machine, with real parts.

A fleet PKI and a TUF trust repository (edgeops pki / edgeops trust) → mosquitto on a free port, mutual TLS with a
per-device ACL → the digits CNN (examples/digits, trained offline) built for one profile as v1 and a fine-tuned v2
→ both published as releases (v2 as a delta from v1), listed in the TUF targets → the fleet service (store,
controller, ingest, release server keeping the trust metadata fresh, dashboard) → a simulated fleet of real agents
(FleetSim: real slot stores, runtimes and MQTT sessions, each with its own certificate and the TUF root) in two
groups → v1 rolled out to both groups, then v2 with a canary → a live summary until every device runs v2, then the
dashboard stays up until Ctrl-C (or exit at once with ``--exit-when-done``).

Guarantees: every process and thread it starts is stopped on the way out, Ctrl-C included; the work directory
keeps the built artifacts so that a second run skips the builds. It needs mosquitto installed (it says the one
command to run when it is not) and the repository's examples/ (the demo trains and fine-tunes its model there).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from edgeops.errors import EdgeopsError, TransportError
from edgeops.fleet.model import Rollout

__all__ = ["DemoOptions", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    examples: Path  # the repository's examples/digits folder
    devices: int = 20
    profile: str = "rpi4"
    http: str = "127.0.0.1:8080"
    fleet: str = "demo"
    exit_when_done: bool = False
    timeout_s: float = 600.0  # per rollout


def _say(msg: str) -> None:
    print(msg, flush=True)


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else "")
    if not found:
        raise EdgeopsError("mosquitto is not installed: run `sudo apt-get install mosquitto` (or `make system-deps`)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_broker(workdir: Path, stack: ExitStack, pki: Path, port: int) -> str:
    """mosquitto run by the PKI's config (mutual TLS, ACL, CRL on ``port``) plus the demo's logging."""
    conf = workdir / "mosquitto.conf"
    conf.write_text((pki / "mosquitto.conf").read_text() + "\npersistence false\n"
                    f"log_dest file {workdir / 'mosquitto.log'}\nuser {pwd.getpwuid(os.getuid()).pw_name}\n"
                    "max_queued_messages 100000\n")
    proc = subprocess.Popen([_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=10)

    stack.callback(stop)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return f"mqtts://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise TransportError(f"mosquitto did not start (see {workdir / 'mosquitto.log'})")


def _security(opts: DemoOptions, port: int, release_keys: Path, fleet_keys: Path) -> tuple[Path, Path]:
    """A fresh fleet PKI (broker, fleet service and one certificate per device) and TUF trust repository (the
    demo's build key as the artifacts role, its fleet key as the commands role). Returns (pki dir, trust dir)."""
    from edgeops.pki import init_pki, issue_device
    from edgeops.signing import load_private_key
    from edgeops.trust_repo import init_repo

    pki, trust = opts.workdir / "pki", opts.workdir / "trust"
    for d in (pki, trust):
        shutil.rmtree(d, ignore_errors=True)
    init_pki(pki, fleet=opts.fleet, port=port, broker_hosts=("127.0.0.1", "localhost"))
    half = opts.devices // 2
    for i in range(opts.devices):
        issue_device(pki, f"dev-{i:04d}", groups=["lab"] if i < half else ["field"])
    repo = init_repo(trust, fleet=opts.fleet, artifacts_key=release_keys / "signing.pub",
                     commands_key=fleet_keys / "signing.pub")
    repo.publish_timestamp(load_private_key(repo.keys_dir / "timestamp.key"))
    _say(f"fleet PKI in {pki} ({opts.devices} device certificates, broker ACL); TUF trust root v1 in {trust}")
    return pki, trust


def _http_address(wanted: str) -> str:
    """``wanted`` when its port is free, else a free port on the same host (the demo must not fail on 8080)."""
    host, _, port = wanted.rpartition(":")
    try:
        with socket.socket() as s:
            s.bind((host or "127.0.0.1", int(port)))
    except OSError:
        _say(f"{wanted} is in use: the dashboard takes a free port instead")
        return f"{host or '127.0.0.1'}:0"
    return wanted


def _run(cmd: list[str], what: str) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise EdgeopsError(f"{what} failed:\n{(done.stderr or done.stdout).strip()[-2000:]}")


def _build_models(opts: DemoOptions, keys: Path) -> tuple[Path, Path]:
    """v1 (examples/digits trained) and v2 (fine-tuned) artifacts for the profile; cached in the workdir."""
    py = sys.executable
    v1_model, v2_dir = opts.examples / "out", opts.workdir / "v2-model"
    out = {v: opts.workdir / "artifacts" / v for v in ("1.0.0", "2.0.0")}
    arts = {v: out[v] / f"digits-{v}-{opts.profile}.edgeops" for v in out}
    if not (v1_model / "digits.keras").is_file():
        _say("training the digits CNN (examples/digits/train.py, offline, ~20 s)")
        _run([py, str(opts.examples / "train.py"), "--out", str(v1_model)], "training")
    if not (v2_dir / "digits.keras").is_file():
        _say("fine-tuning it into v2 (examples/digits/fine_tune.py)")
        _run([py, str(opts.examples / "fine_tune.py"), "--base", str(v1_model), "--out", str(v2_dir)], "fine-tune")
    for version, model in (("1.0.0", v1_model), ("2.0.0", v2_dir)):
        if arts[version].is_file():
            continue
        _say(f"building digits {version} for {opts.profile} (edgeops build: convert, quantize, validate, sign)")
        _run([py, "-m", "edgeops", "build", str(model / "digits.keras"), "--profile", opts.profile,
              "--calib", str(model / "calib.npz"), "--eval", str(model / "eval.npz"), "--key",
              str(keys / "signing.key"), "--version", version, "--out", str(out[version])], f"build {version}")
    return arts["1.0.0"], arts["2.0.0"]


def _keys(workdir: Path) -> tuple[Path, Path]:
    from edgeops.signing import generate_keypair

    release_keys, fleet_keys = workdir / "keys" / "release", workdir / "keys" / "fleet"
    for d in (release_keys, fleet_keys):
        if not (d / "signing.key").is_file():
            d.mkdir(parents=True, exist_ok=True)
            generate_keypair(d)
    return release_keys, fleet_keys


def _publish(opts: DemoOptions, trust: Path, v1: Path, v2: Path) -> tuple[str, str]:
    """Both releases signed with the targets key and listed in the trust repository's targets."""
    from edgeops.release_builder import build_release
    from edgeops.signing import load_private_key
    from edgeops.trust_repo import load_repo

    repo = load_repo(trust)
    key = load_private_key(repo.keys_dir / "targets.key")
    store = opts.workdir / "releases"
    shutil.rmtree(store, ignore_errors=True)
    r1 = build_release(v1, [], fleet=opts.fleet, key=key, store=store)
    r2 = build_release(v2, [v1], fleet=opts.fleet, key=key, store=store)
    for rel in (r1, r2):
        repo.add_release(rel.meta.release_id, rel.signed, key)
    full = next(p for p in r2.meta.payloads if p.kind.value == "full")
    delta = [p for p in r2.meta.payloads if p.kind.value == "delta"]
    if delta:
        _say(f"v2 published as a delta from v1: {delta[0].size} bytes instead of {full.size}")
    return r1.meta.release_id, r2.meta.release_id


def _summary(db: str, fleet_size: int) -> tuple[str, Counter[str]]:
    from edgeops.fleet.store import open_store

    store = open_store(db)
    try:
        devices = store.list_devices()
        versions = Counter(d.active_version or "none" for d in devices if d.online)
        latest: dict[str, Rollout] = {}
        for r in store.list_rollouts():  # newest first: the latest rollout of each group
            latest.setdefault(r.group, r)
        rollouts = sorted(latest.values(), key=lambda r: r.group)
        execs = {r.rollout_id: Counter(str(e.status) for e in store.list_executions(r.rollout_id)) for r in rollouts}
        telemetry = store.telemetry_count()
    finally:
        store.close()
    parts = [f"{sum(versions.values())}/{fleet_size} online", " ".join(f"{v}:{n}" for v, n in sorted(versions.items()))]
    for r in rollouts:
        c = execs[r.rollout_id]
        parts.append(f"{r.group}→{r.version} {r.status} ph{r.phase + 1}/{len(r.spec.phases)} "
                     f"ok {c['succeeded']} run {c['in_progress']} wait {c['queued']} fail {c['failed']}")
    parts.append(f"telemetry rows {telemetry}")
    return " | ".join(parts), versions


def _wait(db: str, n: int, done: Callable[[Counter[str]], bool], timeout_s: float) -> None:
    deadline, last = time.monotonic() + timeout_s, ""
    while True:
        line, versions = _summary(db, n)
        if line != last:
            _say("  " + line)
            last = line
        if done(versions):
            return
        if time.monotonic() > deadline:
            raise EdgeopsError(f"the rollout did not finish within {timeout_s:.0f} s: {line}")
        time.sleep(2.0)


def run_demo(opts: DemoOptions) -> int:
    """Run the demo (see the module docstring). Raises EdgeopsError with the reason when a step fails."""
    from device_agent.sim import FleetSim
    from edgeops.fleet import deployments
    from edgeops.fleet.model import Approval, RolloutSpec
    from edgeops.fleet.service import FleetService, ServiceConfig
    from edgeops.fleet.store import open_store
    from edgeops.signing import load_private_key

    opts.workdir.mkdir(parents=True, exist_ok=True)
    release_keys, fleet_keys = _keys(opts.workdir)
    v1, v2 = _build_models(opts, release_keys)
    port = _free_port()
    pki, trust = _security(opts, port, release_keys, fleet_keys)
    r1, r2 = _publish(opts, trust, v1, v2)
    db = str(opts.workdir / "fleet.db")
    for suffix in ("", "-wal", "-shm"):  # a fresh fleet every run (the builds above are kept)
        Path(db + suffix).unlink(missing_ok=True)
    shutil.rmtree(opts.workdir / "fleet", ignore_errors=True)
    with ExitStack() as stack:
        broker = _start_broker(opts.workdir, stack, pki, port)
        _say(f"mosquitto on {broker} (mutual TLS: every client shows a certificate of the fleet CA)")
        service = FleetService(ServiceConfig(
            fleet=opts.fleet, broker_url=broker, db=db, release_dir=opts.workdir / "releases",
            command_key=load_private_key(fleet_keys / "signing.key"), http=_http_address(opts.http),
            housekeeping_s=1.0, ca_certs=pki / "ca.crt", cert_file=pki / "fleet.crt", key_file=pki / "fleet.key",
            trust_dir=trust, timestamp_key=trust / "keys" / "timestamp.key"))
        service.start()
        stack.callback(service.stop)
        half = opts.devices // 2
        def tls(i: int) -> dict[str, dict[str, str]]:
            own = pki / "devices" / f"dev-{i:04d}"
            files = {"ca_file": own / "ca.crt", "cert_file": own / "device.crt", "key_file": own / "device.key"}
            return {"broker": {k: str(v.resolve()) for k, v in files.items()}}

        sim = FleetSim(opts.workdir / "fleet", n=opts.devices, fleet=opts.fleet, profile=opts.profile,
                       broker_url=broker, trust_root=trust / "metadata" / "root" / "1.json", telemetry_interval_s=2.0,
                       id_prefix="dev", groups=lambda i: ["lab"] if i < half else ["field"], extra=tls)
        sim.start()
        stack.callback(sim.stop)
        _say(f"dashboard: {service.url}   ({opts.devices} agents: dev-0000..{opts.devices - 1:04d}, groups lab/field)")
        _wait(db, opts.devices, lambda v: sum(v.values()) == opts.devices, 60.0)
        store = open_store(db)
        stack.callback(store.close)
        now = time.time()
        for rid in (r1, r2):
            store.set_approval(rid, Approval.APPROVED, by="demo", at=now)
        _say(f"rolling out {r1} to lab and field")
        for group in ("lab", "field"):
            deployments.deploy(store, release_id=r1, group=group, spec=RolloutSpec(), now=time.time())
        _wait(db, opts.devices, lambda v: v.get("1.0.0", 0) == opts.devices, opts.timeout_s)
        _say(f"rolling out {r2} (delta) with a canary: lab 10% → 50% → 100%, then field 10% → 100%")
        # a short healthy window after each phase, so that the canary can be watched on the dashboard
        canary = RolloutSpec(phases=(0.1, 0.5, 1.0), max_failures=0.2, wait_s=5.0)
        deployments.deploy(store, release_id=r2, group="lab", spec=canary, now=time.time())
        deployments.deploy(store, release_id=r2, group="field", spec=RolloutSpec(phases=(0.1, 1.0), wait_s=5.0),
                           now=time.time())
        _wait(db, opts.devices, lambda v: v.get("2.0.0", 0) == opts.devices, opts.timeout_s)
        _say(f"v2 on all devices ({opts.devices}/{opts.devices}). Dashboard: {service.url}")
        if not opts.exit_when_done:
            _say("Ctrl-C to stop")
            try:
                while True:
                    time.sleep(5.0)
                    _say("  " + _summary(db, opts.devices)[0])
            except KeyboardInterrupt:
                _say("stopping")
    _say("demo stopped cleanly")
    return 0
