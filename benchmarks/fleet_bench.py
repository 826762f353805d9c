"""Fleet benchmark: N real agents at 1 Hz through mosquitto into the fleet service's SQLite store, the ingest's
throughput per core against two peers (and into PostgreSQL), and one delta rollout to the whole fleet.

The goals (/work/shared/DESIGN.md "Performance goals"): 1,000 real agent instances on one 2-core machine,
telemetry at 1 Hz, zero loss; ingest ≥ 5k msg/s per core into SQLite; a rollout publishes each chunk once per
release. Everything is real and local: a private mosquitto 2 (default configuration but ``max_queued_messages``)
on a free 127.0.0.1 port, the fleet service (``edgeops.fleet.service.FleetService``: controller, 2 ingest workers,
release server; no dashboard) in its own process so that its CPU and memory are measured apart (SERVICE_RUNNER),
the agents as ``device_agent.sim.FleetSim`` in child processes of at most ``--per-process`` agents each (every
agent a real ``Agent``: its own slot store, loaded model, SQLite spool and MQTT session; see PER_PROCESS for why
25), artifacts from the real ``edgeops build`` (digits, x86-gateway: ONNX int8; v2 a fine-tune of it, shipped as a
delta), built once into the git-ignored benchmarks/.cache/fleet.

Parts:

- **ingest** (once per run): ``--ingest-messages`` agent-shaped telemetry messages from ``--ingest-devices``
  registered devices are published (QoS 1) while every consumer is offline with a persistent session, so the
  broker queues a copy for the service's share group and one for each peer; then each consumer alone drains its
  copy. Per core = rows stored ÷ the consumer's CPU seconds (user + system, all threads) from its last status
  before its first message to its first status with every row stored. Peers (PEER_RUNNER): **naive**, what one
  writes first (one paho subscriber: ``json.loads`` + one ``INSERT`` of 5 columns + ``COMMIT`` per message), and
  **unbatched**, the service's own per-message work (parse, alert rules, ``FleetStore.write_batch``) in one
  transaction per message; both in SQLite with the store's pragmas (WAL, ``synchronous=NORMAL``) and
  acknowledging after the commit, as the service does. Then, when a PostgreSQL server answers at ``--pg``, the
  service drains the same backlog again into a fresh database there (its server's CPU counted apart).
- **fleet** (per size in ``--sizes``): a fresh broker, store and service; N agents on v1 (telemetry every
  ``--interval`` s) connect; for ``--duration`` s the CPU and memory of the service, the agents and the broker are
  sampled from /proc (and the machine's, so other jobs on it show) and the telemetry stored is counted; the loss
  so far is counted with the agents running; then v2 is approved and deployed to the group with
  ``edgeops.fleet.deployments.deploy`` (``--phases``, default one phase of every device) and followed in the store
  until every execution is terminal. Figures: chunks published by the service's release server vs the delta's
  chunk count, repair requests, when the devices started / finished, time to converge. Then the agents stop
  (each flushes its spool), the ingest drains, the service stops and **loss** is counted exactly: every agent's
  spool numbers its messages 1, 2, 3 ... (telemetry and events share the sequence; ``sqlite_sequence`` of its
  spool is the last one given), the store keys rows by (device, seq), so sent = Σ last seq − still spooled,
  stored = telemetry + event rows, lost = numbers neither stored nor still spooled. A size whose agents do not
  all come online in time is measured as it is (and said so), without a rollout.

Writes benchmarks/results/fleet.json (``--out``), prints a table and the goals met/missed; progress on stderr.
Exit status 1 when a part could not be measured (a missed goal is a result, not a failure).
Run: ``.venv/bin/python benchmarks/fleet_bench.py`` (sizes 100, 500, 1000: ~25 min on 2 cores; ``--quick``: 50
agents, 20 s, 20k messages, ~1 min).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgeops.errors import EdgeopsError  # noqa: E402
from edgeops.fleet.deployments import deploy  # noqa: E402
from edgeops.fleet.model import Approval, DeviceRecord, ExecStatus, RolloutSpec  # noqa: E402
from edgeops.fleet.store import FleetStore, open_store  # noqa: E402
from edgeops.release import PayloadKind  # noqa: E402
from edgeops.release_builder import PublishedRelease, build_release  # noqa: E402
from edgeops.signing import generate_keypair, load_private_key  # noqa: E402
from tests.support.artifacts import build_digits  # noqa: E402
from tests.support.mosquitto import MosquittoBroker  # noqa: E402

FLEET = "bench"
PROFILE = "x86-gateway"  # ONNX int8 built from digits.onnx: the quickest build, runs in onnxruntime
GROUP = "fleet"
CACHE = REPO / "benchmarks" / ".cache" / "fleet"
DIGITS = REPO / "examples" / "digits" / "out"
DIGITS_FILES = ("digits.keras", "digits.onnx", "calib.npz", "eval.npz", "eval_nchw.npz", "train.npz")
GOALS = {"ingest_per_core": 5000.0, "fleet_size": 1000, "interval_s": 1.0}
# mosquitto's max_queued_messages per session (default 1000). Fleet part: 100,000 (as `edgeops demo`), room for
# a worker's share of a long outage; ingest part: the whole backlog (each peer's session holds all of it).
FLEET_BROKER_QUEUE = 100_000
# Agents per FleetSim process. Each agent holds ~10 file descriptors (its MQTT socket and paho's wake-up socket
# pair, spool and nonce SQLite files with their -wal/-shm, its lock file), and paho's network loop uses
# select(), which cannot watch a descriptor >= 1024 (FD_SETSIZE): past ~100 agents in one process the later agents'
# sockets get such numbers and they reconnect forever without ever connecting (measured: 101 of 250 came online).
PER_PROCESS = 25  # fewer threads per GIL (6 per agent): at 1,000 agents 25 per process fared better than 80
STATUS_S = 0.25  # the service child writes its status this often (the peers too, fixed in PEER_RUNNER)
SAMPLE_S = 1.0  # /proc sampling period of the fleet part
SETTLE_S = 5.0  # after every agent is online, before the measured window
RATE_TOLERANCE = 0.95  # "at 1 Hz": the median device sent at least 0.95 messages per interval
_T0 = time.monotonic()

# The fleet service in a child process (argv: a JSON config file). Writes its status (counters of the ingest
# workers, controller and release server, and its own CPU seconds) to cfg["status"] once just before
# FleetService.start (its modules imported already), then every STATUS_S, and a final one after stopping on
# SIGTERM (the ingest workers flush and acknowledge what they hold).
SERVICE_RUNNER = r"""
import json, logging, os, signal, sys, threading, time
from pathlib import Path
from edgeops.fleet.service import FleetService, ServiceConfig
from edgeops.signing import load_private_key
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
cfg = json.loads(Path(sys.argv[1]).read_text())
status = Path(cfg["status"])
svc = FleetService(ServiceConfig(
    fleet=cfg["fleet"], broker_url=cfg["broker"], db=cfg["db"], release_dir=Path(cfg["releases"]),
    command_key=load_private_key(Path(cfg["key"])), http="", ingest_workers=cfg["workers"],
    rate_per_s=cfg["rate"], burst=cfg["burst"], housekeeping_s=1.0))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
import edgeops.fleet.http_server, edgeops.fleet.ingest_worker, edgeops.release_server  # start() imports them
workers, releases, controller = [], None, None
def write(final, path=status):
    t = os.times()
    doc = {"t": time.time(), "cpu_s": t.user + t.system, "final": final,
           "workers": [w.stats() for w in workers], "controller": controller.stats() if controller else None,
           "releases": releases.stats() if releases else None}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
write(False, status.with_name(status.name + ".start"))  # nothing received yet: the reference point of a drain
svc.start()
workers, releases, controller = list(svc.workers), svc.releases, svc.controller
while not stop.wait(cfg["status_s"]):
    write(False)
svc.stop()
write(True)
"""

# FleetSim in a child process (argv: a JSON config). Writes cfg["ready"] once every agent has started; SIGTERM
# stops the agents (each flushes its spool to the broker, publishes its offline state and disconnects).
SIM_RUNNER = r"""
import json, logging, os, signal, sys, threading, time
from pathlib import Path
from device_agent.sim import FleetSim
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
cfg = json.loads(sys.argv[1])
sim = FleetSim(Path(cfg["root"]), n=cfg["n"], fleet=cfg["fleet"], profile=cfg["profile"], broker_url=cfg["broker"],
               trusted_keys=[Path(cfg["release_pub"])], command_keys=[Path(cfg["command_pub"])],
               groups=lambda i: [cfg["group"]], initial_artifact=Path(cfg["artifact"]),
               telemetry_interval_s=cfg["interval"], id_prefix=cfg["prefix"], threads=1,
               extra=lambda i: {"health": {"latency_budget_factor": cfg["latency_factor"]}})
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
t0 = time.monotonic()
sim.start()
ready = Path(cfg["ready"])
ready.write_text(json.dumps({"agents": len(sim.agents), "start_s": time.monotonic() - t0}))
stop.wait()
t1 = time.monotonic()
sim.stop()
print(json.dumps({"stop_s": time.monotonic() - t1}), flush=True)
"""

# The peers (argv: kind, host, port, fleet, db, status file, expected count, client id, mode). mode "subscribe":
# create the persistent session and its subscription, then leave; mode "drain": take what the session holds until
# ``expected`` rows are stored. kind "naive": json.loads + one INSERT (5 columns) + COMMIT per message, what one
# writes first; kind "unbatched": the service's own work per message (edgeops.fleet.ingest.parse_telemetry, the
# alert rules, FleetStore.write_batch of a batch of one: the same rows, schema and indexes), one transaction per
# message: what the service's batching and pipeline are worth. Both acknowledge after the commit (paho acks a
# QoS 1 message when on_message returns), as the service does; SQLite in WAL with synchronous=NORMAL, as the store.
PEER_RUNNER = r"""
import json, os, sqlite3, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
kind, host, port, fleet, db, status, expected, client_id, mode = sys.argv[1:10]
port, expected = int(port), int(expected)
got = {"received": 0, "stored": 0}
done, subscribed = threading.Event(), threading.Event()
if kind == "naive":
    conn = sqlite3.connect(db, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS telemetry (device_id TEXT NOT NULL, seq INTEGER NOT NULL, "
                 "ts REAL NOT NULL, received_at REAL NOT NULL, raw TEXT NOT NULL, PRIMARY KEY (device_id, seq))")
    conn.commit()
    def store(msg):
        doc = json.loads(msg.payload)
        cur = conn.execute("INSERT OR IGNORE INTO telemetry VALUES (?, ?, ?, ?, ?)",
                           (doc["device"], doc["seq"], doc["ts"], time.time(), msg.payload.decode()))
        conn.commit()
        return cur.rowcount
else:
    from edgeops.fleet.alerts import AlertRules, latency_budgets_from_profiles
    from edgeops.fleet.ingest import BatchAssembler, classify_topic, parse_telemetry
    from edgeops.fleet.store import open_store
    fleet_store = open_store(db)
    rules = AlertRules(latency_budgets_ms=latency_budgets_from_profiles())
    profiles = {d.device_id: d.profile for d in fleet_store.list_devices()}
    def store(msg):
        _, device = classify_topic(fleet, msg.topic)
        now = time.time()
        row = parse_telemetry(device, msg.payload, received_at=now)
        batch = BatchAssembler()
        batch.add_telemetry(row, *rules.evaluate(row, profile=profiles.get(device), now=now))
        return sum(fleet_store.write_batch(batch.build()))
def on_connect(client, userdata, flags, rc, props):
    client.subscribe(f"edgeops/v1/{fleet}/device/+/telemetry", qos=1)
def on_subscribe(client, userdata, mid, rcs, props):
    subscribed.set()
def on_message(client, userdata, msg):
    got["received"] += 1
    got["stored"] += store(msg)
    if got["stored"] >= expected:
        done.set()
def write(final=False, path=status):
    t = os.times()
    doc = {"t": time.time(), "cpu_s": t.user + t.system, "final": final, **got}
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(doc))
    os.replace(path + ".tmp", path)
props = Properties(PacketTypes.CONNECT)
props.SessionExpiryInterval = 3600
props.ReceiveMaximum = 2000
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
write(path=status + ".start")  # nothing received yet: the reference point of a drain
client.connect(host, port, clean_start=False, properties=props)
client.loop_start()
if mode == "subscribe":
    subscribed.wait(30)
else:
    while not done.wait(0.25):
        write()
write(True)
client.disconnect()
client.loop_stop()
"""


class BenchError(RuntimeError):
    """A part could not be measured (a process died, a step timed out); the message says which."""


def say(msg: str) -> None:
    print(f"[fleet_bench {time.monotonic() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))])


# ---------------------------------------------------------------- /proc


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def proc_mem_mb(pid: int) -> dict[str, float] | None:
    """VmRSS, VmHWM (peak RSS) and Pss (shared pages divided among their users) of ``pid`` in MB."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        return None
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores; /proc/stat less idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Sample:
    t: float
    cpu_s: dict[str, float]  # group -> CPU seconds summed over its processes
    rss_mb: dict[str, float]
    pss_mb: dict[str, float]
    mem_available_mb: float
    machine_busy_s: float


class Sampler:
    """Samples CPU seconds and memory of named groups of processes every ``period`` s, in a thread."""

    def __init__(self, period: float = SAMPLE_S) -> None:
        self.groups: dict[str, list[int]] = {}
        self.samples: list[Sample] = []
        self._period = period
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def set_group(self, name: str, pids: Iterable[int]) -> None:
        with self._lock:
            self.groups[name] = list(pids)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> Sample:
        with self._lock:
            groups = {k: list(v) for k, v in self.groups.items()}
        cpu: dict[str, float] = {}
        rss: dict[str, float] = {}
        pss: dict[str, float] = {}
        for name, pids in groups.items():
            cpu[name] = sum(c for pid in pids if (c := proc_cpu_s(pid)) is not None)
            mems = [m for pid in pids if (m := proc_mem_mb(pid)) is not None]
            rss[name] = sum(m.get("VmRSS", 0.0) for m in mems)
            pss[name] = sum(m.get("Pss", 0.0) for m in mems)
        s = Sample(time.time(), cpu, rss, pss, mem_available_mb(), machine_busy_s())
        with self._lock:
            self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.sample()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """CPU % (of one core) and peak memory per group between the samples nearest t0 and t1."""
        with self._lock:
            inside = [s for s in self.samples if t0 - self._period <= s.t <= t1 + self._period]
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        out: dict[str, Any] = {"seconds": round(b.t - a.t, 1)}
        for name in b.cpu_s:
            out[name] = {
                "cpu_percent": round(100 * (b.cpu_s[name] - a.cpu_s.get(name, 0.0)) / (b.t - a.t), 1),
                "rss_mb_peak": round(max(s.rss_mb.get(name, 0.0) for s in inside), 1),
                "pss_mb_peak": round(max(s.pss_mb.get(name, 0.0) for s in inside), 1),
            }
        out["machine_mem_used_mb_peak"] = round(self.total_mb - min(s.mem_available_mb for s in inside), 1)
        busy = (b.machine_busy_s - a.machine_busy_s) / (b.t - a.t)
        ours = sum(b.cpu_s[k] - a.cpu_s.get(k, 0.0) for k in b.cpu_s) / (b.t - a.t)
        out["machine_busy_cores"] = round(busy, 2)
        out["other_processes_cores"] = round(max(0.0, busy - ours), 2)  # other jobs on the machine, and the kernel
        return out

    @property
    def total_mb(self) -> float:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
        return float("nan")


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifacts:
    release_key: Path  # signs artifacts and releases
    release_pub: Path
    command_key: Path  # the fleet service signs commands with it
    command_pub: Path
    v1: Path  # digits 1.0.0: what every agent starts on
    v2: Path  # the fine-tuned digits 2.0.0: the rollout's target, shipped as a delta from v1


def _run_quiet(cmd: list[str], what: str) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise BenchError(f"{what} failed: {(done.stderr or done.stdout).strip()[-1500:]}")


def build_artifacts(cache: Path) -> Artifacts:
    """Keys, v1 and v2, built once into ``cache`` (git-ignored) and reused while all the files are there."""
    arts = Artifacts(
        cache / "keys/release/signing.key", cache / "keys/release/signing.pub",
        cache / "keys/fleet/signing.key", cache / "keys/fleet/signing.pub",
        cache / f"v1/digits-1.0.0-{PROFILE}.edgeops", cache / f"v2/digits-2.0.0-{PROFILE}.edgeops",
    )
    if all(p.is_file() for p in (arts.release_key, arts.release_pub, arts.command_key, arts.command_pub, arts.v1,
                                 arts.v2)):
        say(f"artifacts from the cache {cache}")
        return arts
    shutil.rmtree(cache, ignore_errors=True)
    for d in (arts.release_key.parent, arts.command_key.parent):
        d.mkdir(parents=True, exist_ok=True)
        generate_keypair(d)
    base = DIGITS
    if not all((DIGITS / f).is_file() for f in DIGITS_FILES):
        base = cache / "digits"
        say(f"training the digits CNN into {base} (examples/digits/train.py)")
        _run_quiet([sys.executable, str(REPO / "examples/digits/train.py"), "--out", str(base)], "training")
    say("building digits v1 (edgeops build)")
    build_digits(base, cache / "v1", arts.release_key, "1.0.0", profiles=(PROFILE,))
    say("fine-tuning digits for v2 (examples/digits/fine_tune.py) and building it")
    tuned = cache / "tuned"
    _run_quiet([sys.executable, str(REPO / "examples/digits/fine_tune.py"), "--base", str(base), "--out", str(tuned)],
               "fine-tune")
    build_digits(tuned, cache / "v2", arts.release_key, "2.0.0", profiles=(PROFILE,))
    return arts


# ---------------------------------------------------------------- processes


def start_broker(workdir: Path, max_queued: int) -> MosquittoBroker:
    broker = MosquittoBroker(workdir, extra_config=f"max_queued_messages {max_queued}\n")
    broker.start()
    return broker


def broker_pid(broker: MosquittoBroker) -> int:
    proc = broker._proc  # the test helper keeps its Popen private; the benchmark needs the pid for /proc
    if proc is None:
        raise BenchError("mosquitto is not running")
    return int(proc.pid)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"pid {proc.pid} did not stop within {timeout:g} s: SIGKILL")
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServiceProc:
    """The fleet service in a child process (SERVICE_RUNNER) with its status file."""

    def __init__(self, workdir: Path, *, broker: str, db: Path | str, releases: Path, key: Path, workers: int,
                 rate: float, burst: float) -> None:
        self.workdir = workdir
        self.status_path = workdir / "service.status.json"
        self.log = workdir / "service.log"
        self.config = {"fleet": FLEET, "broker": broker, "db": str(db), "releases": str(releases), "key": str(key),
                       "workers": workers, "rate": rate, "burst": burst, "status": str(self.status_path),
                       "status_s": STATUS_S}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the service is not running")
        return int(self.proc.pid)

    def start(self, timeout: float = 60.0) -> None:
        self.status_path.unlink(missing_ok=True)
        cfg = self.workdir / "service.json"
        cfg.write_text(json.dumps(self.config))
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVICE_RUNNER, str(cfg)], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=REPO)
        self.wait("ingest workers subscribed", lambda s: bool(s["workers"]) and all(w["connected"]
                                                                                  for w in s["workers"]), timeout)

    def status(self) -> dict[str, Any]:
        doc = read_json(self.status_path)
        if doc is None:
            raise BenchError(f"no service status yet ({log_tail(self.log)})")
        return doc

    def wait(self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"the service exited ({self.proc.returncode}) waiting for {what}: "
                                 f"{log_tail(self.log)}")
            doc = read_json(self.status_path)
            if doc is not None and check(doc):
                return doc
            if time.monotonic() > deadline:
                raise BenchError(f"the service: no {what} within {timeout:g} s")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the workers flush), wait, return the final status."""
        if self.proc is None:
            raise BenchError("the service was not started")
        code = stop_process(self.proc, 120.0)
        doc = read_json(self.status_path)
        if code != 0 or doc is None or not doc.get("final"):
            raise BenchError(f"the service did not stop cleanly ({code}): {log_tail(self.log)}")
        return doc


def ingest_totals(status: dict[str, Any]) -> dict[str, int]:
    """The ingest workers' counters summed (received, stored, duplicates, rate_limited, rejected, pending...)."""
    total: Counter[str] = Counter()
    for w in status["workers"]:
        for key, value in w.items():
            if key == "rejected" and isinstance(value, dict):
                total["rejected"] += sum(value.values())
            elif isinstance(value, int) and not isinstance(value, bool):
                total[key] += value
    return dict(total)


# ---------------------------------------------------------------- part 1: ingest against a naive peer


def telemetry_payload(device: str, seq: int, ts: float) -> bytes:
    """A telemetry message shaped as an agent's (device_agent.telemetry_loop.TelemetryLoop.tick with the spool's
    seq; ~520 bytes like theirs), of a device serving 12 requests a second with its drift measured."""
    doc = {
        "device": device, "seq": seq, "ts": ts, "model_version": "1.0.0", "interval_s": 1.0,
        "latency_ms": {"count": 12, "max": 0.18, "p50": 0.071, "p95": 0.093, "p99": 0.12},
        "requests": 12, "errors": 0, "fallback_answers": 0,
        "resources": {"cpu_percent": 3.2, "load1": 0.41, "rss_mb": 81.4, "temperature_c": None},
        "drift": {"inputs": {"image": {"level": "ok", "psi": 0.031, "samples": 768}}, "level": "ok",
                  "outputs": {"probs": {"level": "ok", "psi": 0.012, "samples": 120}}},
        "health": "ok", "spool": {"dropped": 0, "pending": 0},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def preload(broker: MosquittoBroker, devices: Sequence[str], messages: int) -> dict[str, Any]:
    """Publish ``messages`` telemetry messages at QoS 1 round-robin over ``devices`` (seq 1, 2 ... per device);
    returns once the broker acknowledged every one."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-bench-preload", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    t0 = time.monotonic()
    outstanding: deque[Any] = deque()  # paho's message ids are 16 bits: keep well under 65,535 unacknowledged

    def settle(keep: int) -> None:
        while len(outstanding) > keep:
            info = outstanding.popleft()
            info.wait_for_publish(timeout=120)
            if not info.is_published():
                raise BenchError("the broker did not acknowledge a preloaded message within 120 s")

    try:
        now = time.time()
        for i in range(messages):
            device = devices[i % len(devices)]
            topic = f"edgeops/v1/{FLEET}/device/{device}/telemetry"
            outstanding.append(client.publish(topic, telemetry_payload(device, i // len(devices) + 1, now), qos=1))
            settle(20_000)
        settle(0)
    finally:
        client.disconnect()
        client.loop_stop()
    seconds = time.monotonic() - t0
    return {"messages": messages, "devices": len(devices), "seconds": round(seconds, 2),
            "bytes_per_message": len(telemetry_payload(devices[0], 1, time.time()))}


def drain_figures(samples: list[dict[str, Any]], expected: int, key: str) -> dict[str, Any]:
    """From status samples (t, cpu_s, ``key`` = rows stored): the last sample before anything was received and
    the first with every row stored → rows/s, CPU s, rows per CPU second."""
    before = [s for s in samples if s["received"] == 0]
    after = [s for s in samples if s[key] >= expected]
    if not before or not after:
        raise BenchError(f"drain not bracketed by status samples ({len(samples)} samples)")
    a, b = before[-1], after[0]
    wall, cpu = b["t"] - a["t"], b["cpu_s"] - a["cpu_s"]
    rows = b[key] - a[key]
    return {"rows": rows, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "rows_per_s": round(rows / wall),
            "cores_used": round(cpu / wall, 2), "rows_per_cpu_s": round(rows / cpu),
            "broker_cpu_s": round(b["broker_cpu_s"] - a["broker_cpu_s"], 2),
            "machine_busy_cores": round((b["machine_busy_s"] - a["machine_busy_s"]) / wall, 2)}


def drain_service(service: ServiceProc, broker: MosquittoBroker, expected: int, timeout: float,
                  store_cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    """Start the service and time its drain of ``expected`` queued messages; ``store_cpu``: CPU seconds of the
    database server's processes serving it (PostgreSQL), read before and at the end."""
    broker_cpu0 = proc_cpu_s(broker_pid(broker)) or 0.0  # the broker idles until a consumer connects
    busy0 = machine_busy_s()
    store_cpu0 = store_cpu() if store_cpu else 0.0
    service.start()
    first = read_json(service.status_path.with_name(service.status_path.name + ".start"))
    if first is None:
        raise BenchError("the service wrote no start status")
    samples: list[dict[str, Any]] = [{"t": first["t"], "cpu_s": first["cpu_s"], "received": 0, "stored": 0,
                                      "broker_cpu_s": broker_cpu0, "machine_busy_s": busy0}]
    peak_rss = 0.0
    deadline = time.monotonic() + timeout
    last_t = 0.0
    while True:
        doc = service.status()
        if doc["t"] != last_t:
            last_t = doc["t"]
            totals = ingest_totals(doc)
            samples.append({"t": doc["t"], "cpu_s": doc["cpu_s"], "received": totals.get("received", 0),
                            "stored": totals.get("stored", 0), "broker_cpu_s": proc_cpu_s(broker_pid(broker)) or 0.0,
                            "machine_busy_s": machine_busy_s()})
            mem = proc_mem_mb(service.pid)
            peak_rss = max(peak_rss, mem.get("VmRSS", 0.0) if mem else 0.0)
            if totals.get("stored", 0) >= expected:
                store_cpu1 = store_cpu() if store_cpu else 0.0
                break
        if time.monotonic() > deadline:
            raise BenchError(f"the service stored {samples[-1]['stored'] if samples else 0} of {expected} in "
                             f"{timeout:g} s")
        time.sleep(0.02)
    final = service.stop()
    figures = drain_figures(samples, expected, "stored")
    figures["counters"] = ingest_totals(final)
    figures["rss_mb_peak"] = round(peak_rss, 1)
    if store_cpu is not None:
        figures["store_server_cpu_s"] = round(store_cpu1 - store_cpu0, 2)
        figures["rows_per_cpu_s_with_store_server"] = round(
            figures["rows"] / (figures["cpu_s"] + store_cpu1 - store_cpu0))
    return figures


def run_peer(kind: str, broker: MosquittoBroker, work: Path, db: Path, mode: str, expected: int,
             timeout: float) -> dict[str, Any]:
    """A peer child (PEER_RUNNER): ``subscribe`` (make its session) or ``drain`` (take ``expected`` rows)."""
    status = work / f"{kind}.status.json"
    status.unlink(missing_ok=True)
    args = [sys.executable, "-c", PEER_RUNNER, kind, broker.host, str(broker.port), FLEET, str(db), str(status),
            str(expected), f"fleet-bench-{kind}", mode]
    log = work / f"{kind}.log"
    samples: list[dict[str, Any]] = []
    peak_rss = 0.0
    broker_cpu0 = proc_cpu_s(broker_pid(broker)) or 0.0  # the broker idles until a consumer connects
    busy0 = machine_busy_s()
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout
    last_t = 0.0
    while proc.poll() is None:
        doc = read_json(status)
        if doc is not None and doc["t"] != last_t:
            last_t = doc["t"]
            samples.append({**doc, "broker_cpu_s": proc_cpu_s(broker_pid(broker)) or 0.0,
                            "machine_busy_s": machine_busy_s()})
            mem = proc_mem_mb(proc.pid)
            peak_rss = max(peak_rss, mem.get("VmRSS", 0.0) if mem else 0.0)
        if time.monotonic() > deadline:
            stop_process(proc, 10)
            raise BenchError(f"the {kind} peer did not finish {mode} in {timeout:g} s: {log_tail(log)}")
        time.sleep(0.02)
    doc = read_json(status)
    start = read_json(Path(f"{status}.start"))
    if proc.returncode != 0 or doc is None or start is None:
        raise BenchError(f"the {kind} peer failed ({proc.returncode}): {log_tail(log)}")
    if mode != "drain":
        return {}
    samples = [{**start, "broker_cpu_s": broker_cpu0, "machine_busy_s": busy0}, *samples,
               {**doc, "broker_cpu_s": proc_cpu_s(broker_pid(broker)) or 0.0, "machine_busy_s": machine_busy_s()}]
    figures = drain_figures(samples, expected, "stored")
    figures["rss_mb_peak"] = round(peak_rss, 1)
    return figures


def register_devices(db: Path | str, devices: Sequence[str]) -> None:
    """Record ``devices`` online in a fleet store (so the alert rules find each one's profile, as live)."""
    store = open_store(str(db))
    try:
        now = time.time()
        for d in devices:
            store.put_device(DeviceRecord(device_id=d, online=True, last_seen=now, profile=PROFILE, groups=(GROUP,),
                                          active_version="1.0.0"))
    finally:
        store.close()


def rows_in(db: Path) -> int:
    conn = sqlite3.connect(str(db))
    try:
        return int(conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])
    finally:
        conn.close()


@contextlib.contextmanager
def pg_database(server: str) -> Iterator[tuple[str, str]]:
    """A new empty database on the PostgreSQL server at ``server`` (``postgresql://user@host:port``), dropped
    afterwards: (its URL, its name). BenchError when no server answers."""
    try:
        import psycopg
    except ImportError as exc:
        raise BenchError(f"PostgreSQL part: psycopg is not installed ({exc})") from None
    try:
        admin = psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL part: no server at {server}: {str(exc).strip()}") from None
    name = f"edgeops_fleet_bench_{secrets.token_hex(4)}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{server}/{name}", name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def pg_cpu_probe(server: str, name: str) -> Callable[[], float]:
    """CPU seconds of the PostgreSQL processes that serve database ``name``: its backends and the server's shared
    writers (WAL writer, checkpointer, background writer); read from /proc (the server runs on this machine)."""

    def probe() -> float:
        import psycopg

        with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=3) as conn:
            pids = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s OR backend_type IN "
                                "('walwriter', 'checkpointer', 'background writer')", (name,)).fetchall()
        return sum(c for (pid,) in pids if (c := proc_cpu_s(int(pid))) is not None)

    return probe


def ingest_postgres(ctx: Ctx, broker: MosquittoBroker, work: Path, devices: Sequence[str],
                    rate: float) -> dict[str, Any]:
    """The same drain into PostgreSQL: a fresh database, the service's sessions (empty by now) preloaded again."""
    n_msg = ctx.args.ingest_messages
    with pg_database(ctx.args.pg) as (url, name):
        register_devices(url, devices)
        pg_work = work / "pg"
        pg_work.mkdir(exist_ok=True)
        service = ServiceProc(pg_work, broker=broker.url, db=url, releases=work / "releases", key=ctx.arts.command_key,
                              workers=ctx.args.workers, rate=rate, burst=rate)
        say(f"ingest: preloading {n_msg} more messages for the service on PostgreSQL")
        pre = preload(broker, devices, n_msg)
        figures = drain_service(service, broker, n_msg, ctx.args.ingest_timeout, pg_cpu_probe(ctx.args.pg, name))
        store = open_store(url)
        try:
            figures["rows_in_store"] = store.telemetry_count()
        finally:
            store.close()
    figures["preload_s"] = pre["seconds"]
    figures["server"] = ctx.args.pg
    return figures


PEERS = ("naive", "unbatched")


def part_ingest(ctx: Ctx) -> dict[str, Any]:
    """The service's ingest and the peers each drain their copy of the same backlog queued at the broker."""
    work = ctx.work / "ingest"
    work.mkdir(parents=True, exist_ok=True)
    n_msg, n_dev = ctx.args.ingest_messages, ctx.args.ingest_devices
    devices = [f"ing-{i:05d}" for i in range(n_dev)]
    broker = start_broker(work / "mosquitto", n_msg + n_msg // 10)
    dbs = {"service": work / "fleet.db", "naive": work / "naive.db", "unbatched": work / "unbatched.db"}
    try:
        register_devices(dbs["service"], devices)
        register_devices(dbs["unbatched"], devices)
        # a backlog drains at thousands of messages per second from each device: the per-device rate limit
        # (5/s, burst 20 by default) would drop most of it, so it is raised here (it is still applied)
        rate = 1e6
        service = ServiceProc(work, broker=broker.url, db=dbs["service"], releases=work / "releases",
                              key=ctx.arts.command_key, workers=ctx.args.workers, rate=rate, burst=rate)
        say("ingest: creating the persistent sessions of the service and the peers")
        service.start()
        service.stop()
        for kind in PEERS:
            run_peer(kind, broker, work, dbs[kind], "subscribe", n_msg, 60)
        say(f"ingest: preloading {n_msg} telemetry messages from {n_dev} devices")
        pre = preload(broker, devices, n_msg)
        say(f"ingest: preloaded in {pre['seconds']} s; the service drains its copy")
        figures = {"service": drain_service(service, broker, n_msg, ctx.args.ingest_timeout)}
        for kind in PEERS:
            say(f"ingest: {figures[list(figures)[-1]]['rows_per_cpu_s']} rows per CPU s; the {kind} peer drains")
            figures[kind] = run_peer(kind, broker, work, dbs[kind], "drain", n_msg, ctx.args.ingest_timeout)
        for kind, db in dbs.items():
            figures[kind]["rows_in_store"] = rows_in(db)
        if ctx.args.pg:
            try:
                figures["service_postgresql"] = ingest_postgres(ctx, broker, work, devices, rate)
            except (BenchError, EdgeopsError) as exc:
                say(f"ingest: PostgreSQL not measured: {exc}")
                figures["service_postgresql"] = {"error": str(exc)}
    finally:
        broker.stop()
    edge = figures["service"]
    say("ingest: " + ", ".join(f"{k} {f.get('rows_per_cpu_s')} rows per CPU s" for k, f in figures.items()))
    return {
        "measured": "a backlog queued at the broker for each consumer, drained by one consumer at a time",
        "preload": pre,
        "workers": ctx.args.workers,
        **figures,
        "ratio_per_core": {k: round(edge["rows_per_cpu_s"] / figures[k]["rows_per_cpu_s"], 2) for k in PEERS},
        "ratio_wall": {k: round(edge["rows_per_s"] / figures[k]["rows_per_s"], 2) for k in PEERS},
        "rate_limit_used": {"rate_per_s": rate, "burst": rate},
    }


# ---------------------------------------------------------------- part 2: the fleet


@dataclass
class Ctx:
    args: argparse.Namespace
    work: Path
    arts: Artifacts
    release: PublishedRelease | None = None
    notes: list[str] = field(default_factory=list)


def start_sims(ctx: Ctx, n: int, broker_url: str, root: Path, logs: Path, *,
               prefix_base: str = "a") -> list[tuple[subprocess.Popen[bytes], Path, Path]]:
    """FleetSim children of at most ``--per-process`` agents each, sizes as even as possible; (process, ready
    file, log) of each. Device ids start with ``prefix_base`` + the child's number."""
    k_procs = -(-n // ctx.args.per_process)
    out = []
    for k in range(k_procs):
        count = n // k_procs + (1 if k < n % k_procs else 0)  # as even as possible
        prefix = f"{prefix_base}{k}"
        sim_root = root / prefix
        cfg = {"root": str(sim_root), "n": count, "fleet": FLEET, "profile": PROFILE, "broker": broker_url,
               "release_pub": str(ctx.arts.release_pub), "command_pub": str(ctx.arts.command_pub), "group": GROUP,
               "artifact": str(ctx.arts.v1), "interval": ctx.args.interval, "prefix": prefix,
               "latency_factor": ctx.args.latency_budget_factor, "ready": str(logs / f"{prefix}.ready.json")}
        log = logs / f"{prefix}.log"
        logs.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as err:
            proc = subprocess.Popen([sys.executable, "-c", SIM_RUNNER, json.dumps(cfg)], stdout=err, stderr=err,
                                    cwd=REPO)
        out.append((proc, logs / f"{prefix}.ready.json", log))
    return out


def wait_sims_ready(sims: Sequence[tuple[subprocess.Popen[bytes], Path, Path]], timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        for proc, _, log in sims:
            if proc.poll() is not None:
                raise BenchError(f"a FleetSim process exited ({proc.returncode}): {log_tail(log)}")
        docs = [read_json(ready) for _, ready, _ in sims]
        if all(docs):
            return [float(d["start_s"]) for d in docs if d]
        if time.monotonic() > deadline:
            raise BenchError(f"{sum(1 for d in docs if d)} of {len(sims)} FleetSim processes started in {timeout:g} s")
        time.sleep(0.5)


def wait_online(store: FleetStore, n: int, timeout: float) -> int:
    """Devices online in the store once all ``n`` are, or after ``timeout`` s (fewer: the size is measured as it
    is, and said so)."""
    deadline = time.monotonic() + timeout
    while (got := len(store.list_devices(online=True))) < n and time.monotonic() < deadline:
        time.sleep(1.0)
    return got


OTA_EVENTS = ("ota.started", "ota.downloaded", "ota.completed", "install.succeeded", "ota.failed", "install.rejected")


def follow_rollout(store: FleetStore, rollout_id: str, n: int, timeout: float) -> tuple[list[Any], Any]:
    """Poll the store until every execution of the rollout is terminal (or ``timeout``); (executions, rollout)."""
    deadline = time.monotonic() + timeout
    while True:
        execs = store.list_executions(rollout_id)
        if len(execs) == n and all(e.status.terminal for e in execs):
            break
        if time.monotonic() > deadline:
            say(f"rollout not terminal within {timeout:g} s: {dict(Counter(str(e.status) for e in execs))}")
            break
        time.sleep(0.5)
    return execs, store.get_rollout(rollout_id)


def ota_timeline(store: FleetStore, t_deploy: float) -> dict[str, Any]:
    """Per OTA event type: devices that reported it after the deploy, and when (s after the deploy: min, median,
    max of each device's first one)."""
    events = store.events_since(since=t_deploy, types=OTA_EVENTS)
    first: dict[str, dict[str, float]] = {}
    for e in events:
        first.setdefault(e.type, {}).setdefault(e.device_id, e.ts - t_deploy)
    out: dict[str, Any] = {}
    for kind in OTA_EVENTS:
        times = sorted(first.get(kind, {}).values())
        if times:
            out[kind] = {"devices": len(times), "min_s": round(times[0], 2),
                         "median_s": round(statistics.median(times), 2), "max_s": round(times[-1], 2)}
    return out


def rollout(ctx: Ctx, store: FleetStore, service: ServiceProc, n: int) -> dict[str, Any]:
    """Approve the release, deploy it to the group (one phase), follow it; the release server's counters."""
    rel = ctx.release
    if rel is None:
        raise BenchError("no release was built")
    delta = next(p for p in rel.meta.payloads if p.kind is PayloadKind.DELTA)
    deadline = time.monotonic() + 30
    while store.get_release(rel.meta.release_id) is None:
        if time.monotonic() > deadline:
            raise BenchError(f"the service did not register {rel.meta.release_id}")
        time.sleep(0.2)
    store.set_approval(rel.meta.release_id, Approval.APPROVED, by="fleet_bench", at=time.time())
    spec = RolloutSpec(phases=tuple(ctx.args.phases), max_failures=1.0, timeout_s=ctx.args.rollout_timeout)
    t_deploy = time.time()
    dep = deploy(store, release_id=rel.meta.release_id, group=GROUP, spec=spec, now=t_deploy)
    say(f"fleet {n}: deployed {rel.meta.release_id} to {dep.devices} devices ({len(dep.skipped)} skipped)")
    execs, final = follow_rollout(store, dep.rollout.rollout_id, n, ctx.args.rollout_timeout + 60)
    status = service.status()
    per = status["releases"]["per_payload"]
    d = per.get(delta.id, {})
    statuses = Counter(str(e.status) for e in execs)
    reasons = Counter(e.reason.split(" p95 ")[0][:80] for e in execs if e.status is not ExecStatus.SUCCEEDED)
    sent = [e.sent_at for e in execs if e.sent_at is not None]
    return {
        "release": rel.meta.release_id,
        "devices": dep.devices,
        "delta_bytes": delta.size,
        "chunk_size": rel.meta.chunk_size,
        "chunks": delta.chunk_count,
        "chunks_published": d.get("published", 0),
        "first_sends": d.get("first_sends", 0),
        "resends": d.get("resends", 0),
        "repair_requests": d.get("requests", 0),
        "full_payload_chunks_published": sum(p.get("published", 0) for pid, p in per.items() if pid != delta.id),
        "published_per_chunk": round(d.get("published", 0) / delta.chunk_count, 3),
        "commands_sent_s": [round(min(sent) - t_deploy, 2), round(max(sent) - t_deploy, 2)] if sent else None,
        "statuses": dict(statuses),
        "reasons": dict(reasons),
        "rollout_status": str(final.status) if final else None,
        "converged": statuses.get("succeeded", 0) == n,
        "converge_s": round(max(e.updated_at for e in execs) - t_deploy, 2) if execs else None,
        "timeline": ota_timeline(store, t_deploy),
        "controller": status.get("controller"),
        "t_deploy": t_deploy,
    }


SpoolNumbers = tuple[int, set[int], int]  # last seq given, seqs still spooled, messages the spool dropped


def spool_numbers(path: Path) -> SpoolNumbers:
    """(last seq given, seqs still spooled, messages the spool dropped) of one agent's spool file, read in one
    transaction (the agent may be running: WAL lets this reader in without blocking it)."""
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        conn.execute("BEGIN")
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        pending = {int(r[0]) for r in conn.execute("SELECT seq FROM messages")}
        dropped = conn.execute("SELECT value FROM meta WHERE key = 'dropped_total'").fetchone()
        conn.rollback()
    finally:
        conn.close()
    return (int(row[0]) if row else 0), pending, (int(dropped[0]) if dropped else 0)


def spool_snapshot(root: Path) -> dict[str, SpoolNumbers]:
    """Device id -> spool_numbers of every agent under ``root`` (``root/<process>/<device>/data/spool.sqlite``)."""
    return {path.parent.parent.name: spool_numbers(path) for path in sorted(root.glob("*/*/data/spool.sqlite"))}


def stored_seqs(db: Path) -> dict[str, dict[str, set[int]]]:
    """{"telemetry": device -> seqs, "events": device -> seqs} in the fleet store."""
    conn = sqlite3.connect(str(db), timeout=30)
    out: dict[str, dict[str, set[int]]] = {"telemetry": {}, "events": {}}
    try:
        for table, seqs in out.items():
            for device, seq in conn.execute(f"SELECT device_id, seq FROM {table}"):
                seqs.setdefault(device, set()).add(int(seq))
    finally:
        conn.close()
    return out


def loss_figures(spools: dict[str, SpoolNumbers], stored: dict[str, dict[str, set[int]]]) -> dict[str, Any]:
    """Per device, the numbers 1..last its spool gave: sent (no longer spooled), stored (in telemetry or events),
    lost (neither stored nor still spooled)."""
    sent = still_spooled = dropped = lost = n_tel = n_ev = 0
    with_loss: list[str] = []
    for device, (last, pending, drop) in spools.items():
        tel = {q for q in stored["telemetry"].get(device, set()) if q <= last}
        ev = {q for q in stored["events"].get(device, set()) if q <= last}
        n_tel, n_ev = n_tel + len(tel), n_ev + len(ev)
        sent += last - len(pending)
        still_spooled += len(pending)
        dropped += drop
        gone = last - len(pending | tel | ev)
        if gone:
            lost += gone
            with_loss.append(device)
    return {"agents": len(spools), "sent": sent, "stored": n_tel + n_ev, "telemetry_rows": n_tel, "event_rows": n_ev,
            "lost": lost, "still_spooled": still_spooled, "spool_dropped": dropped,
            "devices_with_loss": len(with_loss), "some_devices_with_loss": with_loss[:10]}


def count_loss(db: Path, root: Path) -> dict[str, Any]:
    """Sent (each agent's last spool seq) against stored ((device, seq) in telemetry + events), agents stopped."""
    return loss_figures(spool_snapshot(root), stored_seqs(db))


def checkpoint_loss(db: Path, root: Path, settle_s: float) -> dict[str, Any]:
    """Delivery so far with the agents running: the spools are read, then the store ``settle_s`` later. What is
    then neither stored nor spooled is ``missing``: lost, or still on its way after ``settle_s`` (the whole-run
    count after the agents stop tells which)."""
    t0 = time.monotonic()
    spools = spool_snapshot(root)
    read_s = time.monotonic() - t0
    time.sleep(settle_s)
    figures = loss_figures(spools, stored_seqs(db))
    figures["missing"] = figures.pop("lost")
    return {**figures, "settle_s": settle_s, "spools_read_s": round(read_s, 1)}


def broker_log_counts(log: Path, t0: float, t1: float) -> dict[str, int]:
    """From mosquitto's log (lines ``<unix time>: ...``) within [t0, t1]: agents connecting (first connections
    and reconnections) and clients dropped by the broker for silence past 1.5 x their keep-alive."""
    connects = timeouts = 0
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        stamp, _, text = line.partition(": ")
        if not stamp.isdigit() or not t0 <= int(stamp) <= t1:
            continue
        if "New client connected" in text and f"edgeops-{FLEET}-a" in text:
            connects += 1
        elif "has exceeded timeout" in text:
            timeouts += 1
    return {"agent_connects": connects, "keepalive_timeouts": timeouts}


def telemetry_delay(db: Path, t0: float, t1: float) -> dict[str, Any]:
    """received_at - ts (agent clock = service clock here) of the telemetry rows received in [t0, t1]."""
    conn = sqlite3.connect(str(db))
    try:
        rows = conn.execute("SELECT received_at - ts, device_id FROM telemetry WHERE received_at BETWEEN ? AND ?",
                            (t0, t1)).fetchall()
    finally:
        conn.close()
    delays = [float(r[0]) for r in rows]
    per_device = Counter(r[1] for r in rows)
    return {"rows": len(rows), "delay_s_p50": _r(pct(delays, 50)), "delay_s_p95": _r(pct(delays, 95)),
            "delay_s_max": _r(max(delays) if delays else None),
            "per_device_per_s_median": _r(statistics.median(per_device.values()) / (t1 - t0) if per_device else None)}


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def wait_drained(service: ServiceProc, quiet_s: float = 3.0, timeout: float = 120.0) -> dict[str, int]:
    """Until the ingest workers hold nothing and have received nothing new for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        totals = ingest_totals(service.status())
        if totals.get("received", 0) != last or totals.get("pending", 0):
            last, since = totals.get("received", 0), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return totals
        if time.monotonic() > deadline:
            raise BenchError(f"the ingest did not drain within {timeout:g} s: {totals}")
        time.sleep(0.2)


Sims = list[tuple[subprocess.Popen[bytes], Path, Path]]  # (process, ready file, log) per FleetSim child


def telemetry_window(ctx: Ctx, service: ServiceProc, sampler: Sampler, sims: Sims, n: int,
                     mem_before: float) -> dict[str, Any]:
    """``--duration`` s of steady telemetry: rows/s at the ingest, CPU and memory of each group of processes."""
    w0, s0 = time.time(), ingest_totals(service.status())
    _watch(sims, ctx.args.duration)
    w1, s1 = time.time(), ingest_totals(service.status())
    window = sampler.window(w0, w1)
    low = min(s.mem_available_mb for s in sampler.samples if w0 - SAMPLE_S <= s.t <= w1 + SAMPLE_S)
    return {
        "t0": w0,
        "t1": w1,
        "window_s": round(w1 - w0, 1),
        "received_per_s": round((s1.get("received", 0) - s0.get("received", 0)) / (w1 - w0), 1),
        "stored_per_s": round((s1.get("stored", 0) - s0.get("stored", 0)) / (w1 - w0), 1),
        "rate_limited": s1.get("rate_limited", 0) - s0.get("rate_limited", 0),
        "duplicates": s1.get("duplicates", 0) - s0.get("duplicates", 0),
        "resources": window,
        "agent_mem_mb_each": {"rss": round(window["agents"]["rss_mb_peak"] / n, 2),
                              "pss": round(window["agents"]["pss_mb_peak"] / n, 2),
                              "machine": round((mem_before - low) / n, 2)},
    }


def stop_sims(ctx: Ctx, sims: Sims, n: int) -> float:
    """SIGTERM every FleetSim child at once (each agent flushes its spool, says offline, disconnects); seconds."""
    t0 = time.time()
    for proc, _, _ in sims:
        proc.send_signal(signal.SIGTERM)
    for proc, _, log in sims:
        try:
            code = proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0:
            ctx.notes.append(f"fleet {n}: a FleetSim process stopped with {code}: {log_tail(log)}")
    return round(time.time() - t0, 1)


def fleet_size(ctx: Ctx, n: int) -> dict[str, Any]:
    """One fleet of ``n`` agents: start, telemetry window, loss so far, rollout, stop, drain, loss in all."""
    work = ctx.work / f"fleet-{n}"
    work.mkdir(parents=True, exist_ok=True)
    db, agents = work / "fleet.db", work / "agents"
    broker = start_broker(work / "mosquitto", FLEET_BROKER_QUEUE)
    sampler = Sampler()
    sampler.set_group("broker", [broker_pid(broker)])
    sims: Sims = []
    service = ServiceProc(work, broker=broker.url, db=db, releases=ctx.work / "releases", key=ctx.arts.command_key,
                          workers=ctx.args.workers, rate=ctx.args.rate, burst=4 * ctx.args.rate)  # as fleet serve
    out: dict[str, Any] = {"agents": n}
    store: FleetStore | None = None
    try:
        service.start()
        # one store for every read and write here, opened while the machine is idle: open_store takes SQLite's
        # write lock (ensure_schema), which under a busy ingest can take longer than a busy timeout to get
        store = open_store(str(db), busy_timeout_s=120.0)
        sampler.set_group("service", [service.pid])
        sampler.start()
        mem_before, t_start = mem_available_mb(), time.time()
        sims = start_sims(ctx, n, broker.url, agents, work / "sim-logs")
        sampler.set_group("agents", [p.pid for p, _, _ in sims])
        start_s = wait_sims_ready(sims, 120 + 1.5 * n)
        online = wait_online(store, n, 60 + 0.1 * n)
        out["start"] = {"processes": len(sims), "online": online, "all_online_s": round(time.time() - t_start, 1),
                        "per_process_start_s": [round(x, 1) for x in start_s]}
        say(f"fleet {n}: {online} of {n} agents online after {out['start']['all_online_s']} s ({len(sims)} processes)")
        if online < n:
            ctx.notes.append(f"fleet {n}: only {online} of {n} agents online {out['start']['all_online_s']} s after "
                             f"the start; measured as it was, no rollout")
        time.sleep(SETTLE_S)
        tel = out["telemetry"] = telemetry_window(ctx, service, sampler, sims, n, mem_before)
        res = tel["resources"]
        say(f"fleet {n}: telemetry {tel['stored_per_s']} rows/s stored; service {res['service']['cpu_percent']} % "
            f"CPU; agents {res['agents']['cpu_percent']} % CPU, {res['agents']['rss_mb_peak']:.0f} MB RSS")
        tel["loss_before_rollout"] = checkpoint_loss(db, agents, settle_s=10.0)
        tel["broker_log"] = broker_log_counts(broker.log_path, tel["t0"], tel["t1"])
        say(f"fleet {n}: before the rollout: sent {tel['loss_before_rollout']['sent']}, missing after 10 s "
            f"{tel['loss_before_rollout']['missing']}")
        if not ctx.args.no_rollout and online == n:
            r = out["rollout"] = rollout(ctx, store, service, n)
            r["resources"] = sampler.window(r["t_deploy"], time.time())
            r["broker_log"] = broker_log_counts(broker.log_path, r["t_deploy"], time.time())
            say(f"fleet {n}: rollout {r['statuses']} in {r['converge_s']} s; {r['chunks_published']} publishes for "
                f"{r['chunks']} chunks")
        out["stop_s"] = stop_sims(ctx, sims, n)
        out["drain"] = wait_drained(service)
        out["ingest_counters"] = ingest_totals(service.stop())
        tel["delay"] = telemetry_delay(db, tel["t0"], tel["t1"])
        out["loss"] = count_loss(db, agents)
        out["machine_mem_used_mb_peak"] = round(sampler.total_mb - min(x.mem_available_mb for x in sampler.samples), 1)
        out["broker_rss_mb_peak"] = round(max(x.rss_mb.get("broker", 0.0) for x in sampler.samples), 1)
        say(f"fleet {n}: in all sent {out['loss']['sent']}, stored {out['loss']['stored']}, lost {out['loss']['lost']}")
    finally:
        sampler.stop()
        if store is not None:
            store.close()
        for proc, _, _ in sims:
            if proc.poll() is None:
                stop_process(proc, 60)
        if service.proc is not None and service.proc.poll() is None:
            stop_process(service.proc, 60)
        broker.stop()
        if not ctx.args.keep:
            shutil.rmtree(agents, ignore_errors=True)
    return out


def _watch(sims: Sims, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for proc, _, log in sims:
            if proc.poll() is not None:
                raise BenchError(f"a FleetSim process exited ({proc.returncode}) mid-run: {log_tail(log)}")
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def part_fleet(ctx: Ctx, sizes: Sequence[int]) -> dict[str, Any]:
    key = load_private_key(ctx.arts.release_key)
    ctx.release = build_release(ctx.arts.v2, [ctx.arts.v1], fleet=FLEET, key=key, store=ctx.work / "releases",
                                chunk_size=ctx.args.chunk_size)
    out: dict[str, Any] = {}
    for n in sizes:
        say(f"fleet {n}: starting")
        try:
            out[str(n)] = fleet_size(ctx, n)
        except (BenchError, EdgeopsError) as exc:
            say(f"fleet {n} not measured: {exc}")
            out[str(n)] = {"agents": n, "error": str(exc)}
    return out


# ---------------------------------------------------------------- goals, table, main


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ing = results.get("ingest")
    if isinstance(ing, dict) and "service" in ing:
        v = ing["service"]["rows_per_cpu_s"]
        out.append({"goal": f"ingest >= {GOALS['ingest_per_core']:.0f} msg/s per core into SQLite", "value": v,
                    "met": v >= GOALS["ingest_per_core"],
                    "detail": f"{ing['service']['rows_per_s']} rows/s on {ing['service']['cores_used']} cores; "
                              f"per core x{ing['ratio_per_core']['naive']} the naive peer's "
                              f"({ing['naive']['rows_per_cpu_s']}), x{ing['ratio_per_core']['unbatched']} the "
                              f"unbatched peer's ({ing['unbatched']['rows_per_cpu_s']})"})
    for n, r in (results.get("fleet") or {}).items():
        out += fleet_goals(int(n), r, results["config"]["interval_s"])
    return out


def fleet_goals(n: int, r: dict[str, Any], interval_s: float) -> list[dict[str, Any]]:
    if "loss" not in r:
        return [{"goal": f"fleet of {n}", "value": None, "met": False, "detail": r.get("error", "?")}]
    out = []
    steady, loss, tel = r["telemetry"]["loss_before_rollout"], r["loss"], r["telemetry"]
    rate = tel["delay"]["per_device_per_s_median"] or 0.0
    online = r["start"]["online"]
    at_rate = rate >= RATE_TOLERANCE / interval_s  # the agents' loop sleeps a full interval after each tick
    out.append({"goal": f"{n} agents, telemetry at {1 / interval_s:g} Hz, zero loss (steady state)",
                "value": steady["missing"],
                "met": steady["missing"] == 0 and online == n and at_rate and steady["spool_dropped"] == 0,
                "detail": f"{online} of {n} online; {rate} msg/s per device achieved (median), "
                          f"{tel['stored_per_s']} rows/s stored; sent {steady['sent']} up to the rollout, of which "
                          f"{steady['missing']} not stored {steady['settle_s']:g} s later"})
    out.append({"goal": f"{n} agents: zero loss over the whole run (rollout and stop included)", "value": loss["lost"],
                "met": loss["lost"] == 0 and loss["still_spooled"] == 0 and loss["spool_dropped"] == 0,
                "detail": f"sent {loss['sent']}, stored {loss['stored']}, lost {loss['lost']} on "
                          f"{loss['devices_with_loss']} devices, still spooled {loss['still_spooled']}, "
                          f"rate-limited at the ingest {r['ingest_counters'].get('rate_limited', 0)}"})
    ro = r.get("rollout")
    if isinstance(ro, dict):
        out.append({"goal": f"rollout to {n}: each chunk published once (plus repairs)",
                    "value": ro["published_per_chunk"],
                    "met": ro["converged"] and ro["chunks_published"] == ro["chunks"],
                    "detail": f"{ro['chunks_published']} publishes for {ro['chunks']} chunks ({ro['resends']} "
                              f"re-sent for {ro['repair_requests']} repair requests); {ro['statuses']} in "
                              f"{ro['converge_s']} s"})
    return out


def print_table(results: dict[str, Any]) -> None:
    ing = results.get("ingest")
    if ing is not None:
        print("\nIngest (a backlog drained by one consumer at a time, same broker, same messages)")
    if isinstance(ing, dict) and "service" in ing:
        print(f"  {'consumer':<30} {'rows/s':>8} {'cores':>6} {'rows/CPU s':>11} {'broker CPU s':>13} {'stored':>9} "
              f"{'peak RSS MB':>11}")
        names = {"service": f"edgeops service ({ing['workers']} workers)", "naive": "naive: INSERT+COMMIT each",
                 "unbatched": "unbatched: service rows, 1 tx", "service_postgresql": "edgeops service, PostgreSQL"}
        for key, name in names.items():
            f = ing.get(key)
            if not isinstance(f, dict) or "rows_per_s" not in f:
                print(f"  {name:<30} not measured: {f.get('error') if isinstance(f, dict) else 'skipped'}")
                continue
            print(f"  {name:<30} {f['rows_per_s']:>8} {f['cores_used']:>6} {f['rows_per_cpu_s']:>11} "
                  f"{f['broker_cpu_s']:>13} {f['rows_in_store']:>9} {f['rss_mb_peak']:>11}")
        pg = ing.get("service_postgresql") or {}
        if "store_server_cpu_s" in pg:
            print(f"  PostgreSQL server CPU {pg['store_server_cpu_s']} s: {pg['rows_per_cpu_s_with_store_server']} "
                  "rows per CPU s of service + server")
        print(f"  service per core / peer: {ing['ratio_per_core']}; wall: {ing['ratio_wall']}")
    elif isinstance(ing, dict):
        print(f"  not measured: {ing.get('error')}")
    fleet = results.get("fleet") or {}
    if fleet:
        print("\nFleet (telemetry every {:g} s)".format(results["config"]["interval_s"]))
        print(f"  {'agents':>6} {'online':>6} {'after s':>7} {'rows/s':>7} {'delay p95':>9} {'svc CPU%':>8} "
              f"{'svc MB':>6} {'agents CPU%':>11} {'MB/agent':>8} {'broker CPU%':>11} {'missing@10s':>11} {'sent':>8} "
              f"{'lost all':>8} {'chunks pub/n':>12} {'ok/n':>9} {'converge s':>10}")
        for n, r in fleet.items():
            if "loss" not in r:
                print(f"  {n:>6} not measured: {r.get('error')}")
                continue
            t, res, ro = r["telemetry"], r["telemetry"]["resources"], r.get("rollout") or {}
            chunks = f"{ro.get('chunks_published', '-')}/{ro.get('chunks', '-')}"
            ok = f"{ro.get('statuses', {}).get('succeeded', 0)}/{n}" if ro else "-"
            print(f"  {n:>6} {r['start']['online']:>6} {r['start']['all_online_s']:>7} {t['stored_per_s']:>7} "
                  f"{t['delay']['delay_s_p95']!s:>9} {res['service']['cpu_percent']:>8} "
                  f"{res['service']['rss_mb_peak']:>6.0f} {res['agents']['cpu_percent']:>11} "
                  f"{t['agent_mem_mb_each']['pss']:>8} {res['broker']['cpu_percent']:>11} "
                  f"{t['loss_before_rollout']['missing']:>11} {r['loss']['sent']:>8} {r['loss']['lost']:>8} "
                  f"{chunks:>12} {ok:>9} {ro.get('converge_s', '-')!s:>10}")
        print("  (rows/s, CPU and memory: the steady telemetry window; MB/agent: PSS of the agents' processes / n; "
              "CPU% of one core;\n   missing@10s: sent before the rollout, not stored 10 s later; lost all: never "
              "stored, counted after the agents stopped)")
    print("\nGoals")
    for g in results["goals"]:
        print(f"  {'met   ' if g['met'] else 'MISSED'}  {g['goal']}: {g['value']} ({g['detail']})")
    for note in results.get("notes", []):
        print(f"  note: {note}")


def machine() -> dict[str, Any]:
    import paho.mqtt

    version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cores": os.cpu_count(), "cpu": cpu, "mem_total_mb": round(Sampler().total_mb),
            "python": platform.python_version(), "paho_mqtt": paho.mqtt.__version__, "sqlite": sqlite3.sqlite_version,
            "mosquitto": version[0] if version else "?", "platform": platform.platform()}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    arts = build_artifacts(CACHE)
    ctx = Ctx(args, work, arts)
    results: dict[str, Any] = {
        "benchmark": "fleet",
        "machine": machine(),
        "config": {"sizes": args.sizes, "duration_s": args.duration, "interval_s": args.interval,
                   "per_process": args.per_process, "ingest_workers": args.workers,
                   "ingest_messages": args.ingest_messages, "ingest_devices": args.ingest_devices,
                   "chunk_size": args.chunk_size, "rate_per_s": args.rate, "burst": 4 * args.rate,
                   "rollout_timeout_s": args.rollout_timeout, "rollout_phases": args.phases,
                   "latency_budget_factor": args.latency_budget_factor,
                   "broker_max_queued_messages": {"fleet": FLEET_BROKER_QUEUE, "ingest": "backlog + 10 %"},
                   "profile": PROFILE, "quick": args.quick},
    }
    if "ingest" not in args.skip:
        say("part ingest")
        try:
            results["ingest"] = part_ingest(ctx)
        except (BenchError, EdgeopsError) as exc:
            say(f"part ingest not measured: {exc}")
            results["ingest"] = {"error": str(exc)}
    if "fleet" not in args.skip:
        results["fleet"] = part_fleet(ctx, args.sizes)
    results["goals"] = goals(results)
    results["notes"] = ctx.notes
    results["seconds"] = round(time.monotonic() - _T0, 1)
    return results


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 100,500,1000, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _phases(text: str) -> list[float]:
    try:
        phases = [float(x) / 100 for x in text.split(",") if x.strip()]
        RolloutSpec(phases=tuple(phases))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected rising percentages ending at 100, got {text!r}: {exc}") from None
    return phases


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", type=_sizes, default=[100, 500, 1000], help="fleet sizes (default 100,500,1000)")
    p.add_argument("--duration", type=float, default=60.0, help="measured telemetry window per size (s, default 60)")
    p.add_argument("--interval", type=float, default=1.0, help="agents' telemetry interval (s, default 1)")
    p.add_argument("--per-process", type=int, default=PER_PROCESS,
                   help=f"most agents per FleetSim process (default {PER_PROCESS}: see PER_PROCESS)")
    p.add_argument("--workers", type=int, default=2, help="the service's ingest workers (default 2, as fleet serve)")
    p.add_argument("--rate", type=float, default=5.0,
                   help="the service's per-device rate limit, msg/s, burst 4x (default 5: `fleet serve --rate`)")
    p.add_argument("--ingest-messages", type=int, default=200_000, help="backlog of the ingest part (default 200k)")
    p.add_argument("--ingest-devices", type=int, default=1000, help="devices the backlog comes from (default 1000)")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", metavar="URL",
                   help="PostgreSQL server for the ingest part's PostgreSQL drain (a database is created and dropped; "
                        "'' to skip; default the tests' postgresql://postgres@127.0.0.1:5432)")
    p.add_argument("--ingest-timeout", type=float, default=600.0, help="longest drain (s)")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="the release's chunk size (default 2048: the ~56 kB delta spans tens of chunks)")
    p.add_argument("--latency-budget-factor", type=float, default=100.0,
                   help="agents' [health] latency_budget_factor (default 100: see the module docstring)")
    p.add_argument("--rollout-timeout", type=float, default=300.0,
                   help="the rollout's per-device timeout (s, default 300); the rollout is followed 60 s past it")
    p.add_argument("--phases", type=_phases, default=[1.0], metavar="P,P,...",
                   help="the rollout's cumulative phases in %% (default 100: every device at once; e.g. 10,50,100)")
    p.add_argument("--no-rollout", action="store_true", help="telemetry only")
    p.add_argument("--skip", action="append", default=[], choices=("ingest", "fleet"), help="leave a part out")
    p.add_argument("--quick", action="store_true", help="50 agents, 20 s, 20k ingest messages")
    p.add_argument("--keep", action="store_true", help="keep the agents' data dirs (with --work)")
    p.add_argument("--work", type=Path, help="work directory (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fleet.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.duration, args.ingest_messages = [50], 20.0, 20_000
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        results = run(args, args.work.resolve())
    else:
        work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        try:
            results = run(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, args.out)
    print_table(results)
    print(f"\nwrote {args.out} ({results['seconds']} s)")
    failed = isinstance(results.get("ingest"), dict) and "error" in results["ingest"]
    failed = failed or any("error" in r for r in (results.get("fleet") or {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
