"""OTA benchmark: goodput against raw paho, wire bytes, interrupted transfers, and one release to a fleet.

The goals (/work/shared/DESIGN.md "Performance goals", issue 4): goodput ≥ 0.5 × raw paho QoS 1 throughput through
the same broker in the same run; wire bytes ≤ 1.03 × payload bytes; at most one chunk re-sent per interruption;
a rollout publishes each chunk once per release (plus repairs). Everything is real and local: a private mosquitto
(default configuration) on a free 127.0.0.1 port, ``edgeops.release_server.ReleaseServer`` in this process (a
fresh one per measurement, so its counters are that measurement's), real agents (``python -m device_agent.cli
run`` subprocesses; FleetSim in one subprocess for the fleet), artifacts built by the real ``edgeops build`` from
the digits example (x86-gateway: ONNX int8) and signed with a key made for the run.

Parts (``--skip`` leaves one out):

- **goodput** (also gives **wire**): a ``--size-mb`` MiB update to one agent on v1. The release's target is the
  v1 digits artifact repacked as v3.0.0 with an extra member of random float32 "weights" (signed, verifies, and
  its health gate runs the digits model), released with no base, so the agent downloads the full artifact. Per
  rep, a fresh agent (own device id and data dir); the ``ota-update`` command is signed and published here.
  Timed: the agent's own ``ota.downloaded`` ``seconds`` (metadata verified → every chunk checked, written and
  fsynced: what the goal is judged on); the server's first chunk publish → ``ota.downloaded`` (the stretch raw
  paho is timed on); command → ``ota.downloaded``; and the gaps between (command → ``ota.started`` → the first
  repair request → the first chunk). Beside it, in the same run and broker, ``RAW_PER_REP`` runs per rep:
  **raw paho** — one paho client here publishing the same payload bytes cut in the same chunk size at QoS 1 (at
  most 20 unacknowledged: paho's default, and mosquitto's Receive Maximum, which the release server keeps to), to
  one paho subscriber (QoS 1) in a subprocess (as the agent is); timed from the first publish to the
  subscriber's last message. Ratios are of medians over ``--reps``.
- **wire**: per goodput rep, the MQTT bytes of the transfer over the payload size: chunk frames the server
  published (``stats()["bytes_published"]``) plus each PUBLISH's MQTT 5 header and topic and its PUBACK
  (computed), plus the device's repair requests (observed on its ota topic, with the same overhead); the retained
  metadata and the command apart. Cross-check: the agent's TCP socket counters (``ss -ti``: bytes received +
  sent, every MQTT byte the device exchanged up to ``ota.completed``).
- **interrupted**: the same update to an agent subprocess killed by SIGKILL twice during the download
  (``EDGEOPS_FAULT_POINT=ota.chunk.stored@N``: after its N-th stored chunk, N = chunks / 3 in the first and in the
  restarted process), restarted at once each time, then left to finish. Figure: chunks the server re-sent
  (``stats()["resends"]``) per interruption.
- **fleet**: ``--devices`` agents in one FleetSim process (1 runtime thread each; see SIM_RUNNER) on v1, one
  delta release v1 → v2 (v2 = examples/digits/fine_tune.py, a full fine-tune, built the same way), chunked at
  ``--fleet-chunk-size`` so the small delta spans tens of chunks; one signed group ``ota-update``; done when every
  device reported ``ota.completed`` (or failed). Figures: chunks published vs the payload's chunk count (first
  sends, resends, chunks asked again in repeated requests), when the devices' first requests came, time to
  converge.

Writes benchmarks/results/ota.json (``--out``), prints a table and the goals met/missed; progress on stderr. Exit
status 1 when a part could not be measured (a missed goal is a result, not a failure).
Run: ``.venv/bin/python benchmarks/ota_bench.py`` (~1 min; ``--size-mb 20 --devices 50 --reps 5 --fleet-reps 3
--skip PART --gather-s S --agent-ota KEY=VALUE --work DIR --out PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgeops.protocol import (  # noqa: E402
    device_target,
    device_topics,
    group_cmd_topic,
    group_target,
    parse_broker_url,
    release_topics,
    sign_command,
)
from edgeops.release import DEFAULT_CHUNK_SIZE, PayloadKind, parse_repair  # noqa: E402
from edgeops.release_builder import PublishedRelease, build_release  # noqa: E402
from edgeops.release_server import DEFAULT_GATHER_S, ReleaseServer  # noqa: E402
from edgeops.signing import generate_keypair, load_private_key  # noqa: E402
from tests.support.artifacts import build_digits, repack  # noqa: E402
from tests.support.mosquitto import MosquittoBroker  # noqa: E402
from tests.support.subscriber import Collector  # noqa: E402

DIGITS = REPO / "examples" / "digits" / "out"
FLEET = "bench"
PROFILE = "x86-gateway"  # ONNX int8 built from digits.onnx: the quickest build, runs in onnxruntime
GROUP = "rollout"
SERVER_INFLIGHT = 64  # the release server's max_inflight (its default); it keeps to the broker's Receive Maximum
RAW_INFLIGHT = 20  # the raw publisher's window: paho's default, and mosquitto's Receive Maximum (what the server gets)
RAW_PER_REP = 3  # raw paho runs per goodput rep (each takes well under a second)
PARTS = ("goodput", "interrupted", "fleet")
GOALS = {"goodput_ratio": 0.5, "wire_ratio": 1.03, "resends_per_interruption": 1.0}
WAIT_S = 180.0  # the longest any one step may take before the part is reported failed
_T0 = time.monotonic()

FLEET_LATENCY_BUDGET_FACTOR = 50.0  # the fleet's health gate: x the profile's p95 budget (see SIM_RUNNER)

# FleetSim in a subprocess (argv: root, n, fleet, profile, broker URL, pubkey, artifact, group, latency factor,
# device id prefix).
# Each agent.toml gets [health] latency_budget_factor: with every agent of the fleet on 2 shared cores and one GIL,
# the gate's latency check measures the contention (p95 of 20-90 ms against a 20 ms budget), not the model; the
# golden-output check and everything else stay as shipped.
SIM_RUNNER = """import signal, sys, threading
from pathlib import Path
from device_agent.sim import FleetSim
root, n, fleet, profile, broker, pub, artifact, group, factor, prefix = sys.argv[1:11]
sim = FleetSim(Path(root), n=int(n), fleet=fleet, profile=profile, broker_url=broker, trusted_keys=[Path(pub)],
               groups=lambda i: [group], initial_artifact=Path(artifact), id_prefix=prefix, threads=1)
for device in sim.devices:
    with device.config_path.open("a") as f:
        f.write(f"\\n[health]\\nlatency_budget_factor = {float(factor)}\\n")
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
sim.start()
print(f"sim: {sim.summary()}", flush=True)
done.wait()
sim.stop()
print("sim: stopped", flush=True)
"""

RAW_SUBSCRIBER = """import json, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic, count, client_id = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
got = {"messages": 0, "bytes": 0, "first": None, "last": None}
done = threading.Event()
def on_connect(client, userdata, flags, rc, props):
    client.subscribe(topic, qos=1)
def on_subscribe(client, userdata, mid, rcs, props):
    print("ready", flush=True)
def on_message(client, userdata, msg):
    now = time.time()
    got["first"] = got["first"] or now
    got["messages"] += 1
    got["bytes"] += len(msg.payload)
    if got["messages"] >= count:
        got["last"] = now
        done.set()
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
client.connect(host, port)
client.loop_start()
done.wait(float(sys.argv[6]))
print(json.dumps(got), flush=True)
client.disconnect()
client.loop_stop()
"""


class BenchError(RuntimeError):
    """A part could not be measured (an agent did not answer, a step timed out); the message says which."""


def say(msg: str) -> None:
    print(f"[ota_bench {time.monotonic() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifacts:
    key: Path
    pub: Path
    v1: Path  # digits 1.0.0, what every agent starts on
    big: Path | None  # v1 + a random-weights member, 3.0.0: the ~size-mb update
    v2: Path | None  # the fine-tuned digits 2.0.0: the fleet's delta target


def _add_weights(size: int) -> Callable[[dict[str, bytes]], None]:
    def add(files: dict[str, bytes]) -> None:
        rng = np.random.default_rng(20)
        files["extra/weights.bin"] = rng.standard_normal(size // 4, dtype=np.float32).tobytes()

    return add


def _set_version(version: str) -> Callable[[dict[str, Any]], None]:
    def set_version(doc: dict[str, Any]) -> None:
        doc["version"] = version

    return set_version


def build_artifacts(work: Path, *, size_mb: float, big: bool, v2: bool) -> Artifacts:
    """Keys, v1, and (when asked) the big update and the fine-tuned v2, all signed by the run's key."""
    keys = work / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    key, pub = generate_keypair(keys, overwrite=True)
    say("building digits v1 (edgeops build)")
    v1 = build_digits(DIGITS, work / "v1", key, "1.0.0", profiles=(PROFILE,))[PROFILE]
    big_path = None
    if big:
        extra = max(0, int(size_mb * 2**20) - v1.stat().st_size)
        big_path = repack(
            v1, work / f"digits-3.0.0-{PROFILE}.edgeops", key, files=_add_weights(extra), manifest=_set_version("3.0.0")
        )
        say(f"big update: {big_path.stat().st_size / 2**20:.1f} MiB (v1 + {extra} bytes of random weights)")
    v2_path = None
    if v2:
        say("fine-tuning digits for v2 (examples/digits/fine_tune.py) and building it")
        tuned = work / "tuned"
        subprocess.run(
            [sys.executable, str(REPO / "examples/digits/fine_tune.py"), "--base", str(DIGITS), "--out", str(tuned)],
            check=True,
            capture_output=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        v2_path = build_digits(tuned, work / "v2", key, "2.0.0", profiles=(PROFILE,))[PROFILE]
    return Artifacts(key, pub, v1, big_path, v2_path)


# ---------------------------------------------------------------- MQTT sizes


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def mqtt_message_bytes(topic: str, payload_len: int) -> int:
    """Bytes on the wire of one MQTT 5 QoS 1 PUBLISH without properties, and its 4-byte PUBACK."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + payload_len  # topic length + topic, packet id, properties length
    return 1 + _varint_len(remaining) + remaining + 4


def socket_bytes(pid: int, broker_port: int) -> dict[str, int] | None:
    """TCP payload bytes received and sent by ``pid``'s connection to the broker (``ss -ti``), None if unseen."""
    try:
        out = subprocess.run(
            ["ss", "-tinpH", "state", "established", "dst", f"127.0.0.1:{broker_port}"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    records = re.split(r"\n(?=\S)", out)
    for record in records:
        if f"pid={pid}," not in record:
            continue
        fields = {k: int(v) for k, v in re.findall(r"\b(bytes_received|bytes_sent):(\d+)", record)}
        return {"received": fields.get("bytes_received", 0), "sent": fields.get("bytes_sent", 0)}
    return None


# ---------------------------------------------------------------- agents and commands


@dataclass(frozen=True)
class Bench:
    """What every part runs against: the broker, the event collector, the artifacts, a work dir, agent overrides."""

    broker: MosquittoBroker
    events: Events
    arts: Artifacts
    work: Path
    agent_ota: dict[str, float | int]  # [ota] settings of the single agents' agent.toml (none: the defaults)
    gather_s: float  # the release servers' gather window (seconds)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_agent_config(folder: Path, device_id: str, bench: Bench) -> Path:
    """``folder/agent.toml`` for one agent on v1 (API off; OTA settings at their defaults unless overridden)."""
    folder.mkdir(parents=True, exist_ok=True)
    arts = bench.arts
    top: dict[str, object] = {
        "device_id": device_id,
        "fleet": FLEET,
        "profile": PROFILE,
        "groups": [GROUP],
        "data_dir": str(folder / "data"),
        "trusted_keys": [str(arts.pub)],
        "initial_artifact": str(arts.v1),
    }
    sections: dict[str, dict[str, object]] = {
        "broker": {"url": bench.broker.url},
        "telemetry": {"interval_s": 60},
        "api": {"address": ""},
        "ota": dict(bench.agent_ota),
    }
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, section in sections.items():
        lines += [f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in section.items())]
    path = folder / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_agent(config: Path, log: Path, fault: str | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPS_FAULT_POINT"}
    if fault:
        env["EDGEOPS_FAULT_POINT"] = fault
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "device_agent.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=REPO,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class TimedCollector(Collector):
    """A Collector that also stamps (wall clock) when each message arrived."""

    def __init__(self, host: str, port: int, topics: list[str], *, client_id: str) -> None:
        self.received_at: list[float] = []
        super().__init__(host, port, topics, client_id=client_id)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.received_at.append(time.time())
            self._cond.notify_all()

    def timed(self, topic: str) -> list[tuple[float, bytes]]:
        """(arrival time, payload) of every message received on ``topic``."""
        with self._cond:
            return [(at, p) for (t, p, _), at in zip(self.messages, self.received_at) if t == topic]


class Events:
    """Events, states and repair requests of every device of the fleet, collected by one paho subscriber."""

    def __init__(self, broker: MosquittoBroker) -> None:
        base = f"edgeops/v1/{FLEET}/device/+"
        self.collector = TimedCollector(
            broker.host, broker.port, [f"{base}/event", f"{base}/state", f"{base}/ota"], client_id="bench-events"
        )

    def close(self) -> None:
        self.collector.close()

    def events(self, device: str | None = None, kind: str | None = None, after: float = 0.0) -> list[dict[str, Any]]:
        return [
            e
            for e in self.collector.json("/event")
            if (device is None or e.get("device") == device)
            and (kind is None or e.get("type") == kind)
            and e.get("ts", 0) >= after
        ]

    def wait_event(self, device: str, kinds: Sequence[str], after: float, timeout: float = WAIT_S) -> dict[str, Any]:
        """The first event of ``device`` of one of ``kinds`` stamped at or after ``after``; BenchError on timeout."""

        def match(e: dict[str, Any]) -> bool:
            return e.get("device") == device and e.get("type") in kinds and e.get("ts", 0) >= after

        try:
            return self.collector.wait_for("/event", match, timeout=timeout)
        except AssertionError:
            seen = [e.get("type") for e in self.events(device, after=after)]
            raise BenchError(f"{device}: no {'/'.join(kinds)} within {timeout:g} s (events: {seen})") from None

    def wait_online(self, devices: Sequence[str], version: str, proc: subprocess.Popen[bytes]) -> None:
        """Until every device's retained state says online on ``version`` (it is then subscribed to its commands).

        Raises BenchError when ``proc`` (the agent or the fleet) exits first, or after WAIT_S seconds."""
        deadline = time.monotonic() + WAIT_S
        while True:
            online = {
                d.get("device")
                for d in self.collector.json("/state")
                if d.get("online") is True and ((d.get("models") or {}).get("active") or {}).get("version") == version
            }
            missing = [d for d in devices if d not in online]
            if not missing:
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.returncode is not None else f"{WAIT_S:g} s passed"
                raise BenchError(f"{len(missing)} of {len(devices)} agents not online on {version} ({why})")
            time.sleep(0.05)

    def repair_requests(self, device: str) -> list[tuple[float, bytes]]:
        """(arrival time, bytes) of every repair request ``device`` published."""
        return self.collector.timed(device_topics(FLEET, device).ota)

    def send(self, topic: str, payload: bytes) -> None:
        self.collector.publish(topic, payload)


def ota_command(key_path: Path, release_id: str, *, device: str | None = None, group: str | None = None) -> bytes:
    target = device_target(device) if device is not None else group_target(group or GROUP)
    return sign_command(
        load_private_key(key_path),
        name="ota-update",
        args={"release_id": release_id},
        fleet=FLEET,
        target=target,
        now=time.time(),
    )


class PublishClock:
    """Polls a release server's counters to stamp (wall clock) its first chunk publish."""

    def __init__(self, server: ReleaseServer, period_s: float = 0.002) -> None:
        self.first: float | None = None
        self._server, self._period = server, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publish-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.first is None and not self._stop.wait(self._period):
            if self._server.stats()["chunks_published"] > 0:
                self.first = time.time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def serving(bench: Bench, releases: Sequence[PublishedRelease], name: str) -> Iterator[ReleaseServer]:
    """A fresh release server (its counters start at zero) for one measurement."""
    address = parse_broker_url(bench.broker.url)
    server = ReleaseServer(
        address, FLEET, releases, client_id=f"bench-{name}", max_inflight=SERVER_INFLIGHT, gather_s=bench.gather_s
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- raw paho baseline


def raw_paho(broker: MosquittoBroker, payload: Path, chunk_size: int, tag: str) -> dict[str, Any]:
    """One paho publisher (here) → broker → one paho subscriber (a subprocess), QoS 1, the payload in chunks."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    data = payload.read_bytes()
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    topic = f"bench/raw/{tag}/chunk"
    args = [sys.executable, "-c", RAW_SUBSCRIBER, broker.host, str(broker.port), topic, str(len(chunks))]
    sub = subprocess.Popen([*args, f"raw-sub-{tag}", str(WAIT_S)], stdout=subprocess.PIPE, text=True)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{tag}", protocol=mqtt.MQTTv5)
    try:
        if sub.stdout is None or sub.stdout.readline().strip() != "ready":
            raise BenchError("the raw paho subscriber did not subscribe")
        connected = threading.Event()
        pub.on_connect = lambda *_a: connected.set()
        pub.max_inflight_messages_set(RAW_INFLIGHT)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        if not connected.wait(10):
            raise BenchError("the raw paho publisher did not connect")
        t0 = time.time()
        infos = [pub.publish(topic, c, qos=1) for c in chunks]
        for info in infos:
            info.wait_for_publish(WAIT_S)
        acked = time.time()
        got = json.loads(sub.communicate(timeout=WAIT_S)[0].strip().splitlines()[-1])
    finally:
        pub.disconnect()
        pub.loop_stop()
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    if got["messages"] < len(chunks) or got["last"] is None:
        raise BenchError(f"the raw subscriber got {got['messages']} of {len(chunks)} messages")
    seconds = got["last"] - t0
    return {
        "bytes": len(data),
        "messages": len(chunks),
        "seconds": round(seconds, 4),
        "publisher_acked_s": round(acked - t0, 4),
        "bytes_per_s": len(data) / seconds,
    }


# ---------------------------------------------------------------- part 1 and 2: goodput and wire bytes


def wire_breakdown(
    rel: PublishedRelease, stats: dict[str, Any], requests: Sequence[bytes], device: str, command: bytes
) -> dict[str, Any]:
    """MQTT bytes of one device's transfer (computed from what was published), over the payload size."""
    payload = rel.meta.full()
    if payload is None:
        raise BenchError(f"release {rel.meta.release_id} has no full payload")
    topics = release_topics(FLEET, rel.meta.release_id)
    n = stats["chunks_published"]
    frame_avg = stats["bytes_published"] // max(1, n)
    chunk_bytes = stats["bytes_published"] + n * (mqtt_message_bytes(topics.chunk, frame_avg) - frame_avg)
    ota_topic = device_topics(FLEET, device).ota
    repair_bytes = sum(mqtt_message_bytes(ota_topic, len(r)) for r in requests)
    metadata_bytes = mqtt_message_bytes(topics.manifest, len(rel.signed))
    command_bytes = mqtt_message_bytes(device_topics(FLEET, device).cmd, len(command))
    return {
        "payload_bytes": payload.size,
        "chunk_messages": n,
        "chunk_frame_bytes": stats["bytes_published"],
        "chunk_wire_bytes": chunk_bytes,
        "repair_requests": len(requests),
        "repair_wire_bytes": repair_bytes,
        "metadata_wire_bytes": metadata_bytes,
        "command_wire_bytes": command_bytes,
        "ratio": (chunk_bytes + repair_bytes) / payload.size,
        "ratio_with_metadata_and_command": (chunk_bytes + repair_bytes + metadata_bytes + command_bytes) / payload.size,
    }


def edgeops_download(bench: Bench, rel: PublishedRelease, device: str) -> dict[str, Any]:
    """One agent on v1 fetches ``rel`` (the full big artifact) through a fresh release server; timed."""
    broker, events, arts = bench.broker, bench.events, bench.arts
    config = write_agent_config(bench.work / device, device, bench)
    with serving(bench, [rel], device) as server:
        proc = start_agent(config, bench.work / f"{device}.log")
        clock = PublishClock(server)
        try:
            events.wait_online([device], "1.0.0", proc)
            command = ota_command(arts.key, rel.meta.release_id, device=device)
            t_cmd = time.time()
            events.send(device_topics(FLEET, device).cmd, command)
            started = events.wait_event(device, ["ota.started", "ota.rejected", "ota.failed"], t_cmd)
            done = events.wait_event(device, ["ota.downloaded", "ota.rejected", "ota.failed"], t_cmd)
            if done["type"] != "ota.downloaded":
                raise BenchError(f"{device}: {done['type']}: {done.get('reason')}: {done.get('detail')}")
            end = events.wait_event(device, ["ota.completed", "ota.failed", "ota.rejected"], t_cmd)
            sockets = socket_bytes(proc.pid, broker.port)
            stats = server.stats()
        finally:
            clock.close()
            stop_process(proc)
    size = started["size"]
    first = clock.first or float("nan")
    requests = events.repair_requests(device)
    return {
        "device": device,
        "payload": started["payload"],
        "payload_bytes": size,
        "chunks": started["chunks"],
        "agent_seconds": done["seconds"],
        "first_publish_to_downloaded_s": round(done["ts"] - first, 4),
        "command_to_downloaded_s": round(done["ts"] - t_cmd, 4),
        "command_to_started_s": round(started["ts"] - t_cmd, 4),
        "started_to_first_request_s": round(requests[0][0] - started["ts"], 4) if requests else None,
        "first_request_to_first_publish_s": round(first - requests[0][0], 4) if requests else None,
        "bytes_per_s": size / done["seconds"],
        "bytes_per_s_from_first_publish": size / (done["ts"] - first),
        "bytes_per_s_from_command": size / (done["ts"] - t_cmd),
        "install": {"outcome": end["type"], "seconds_after_download": round(end["ts"] - done["ts"], 3)},
        "server": {
            k: stats[k] for k in ("chunks_published", "first_sends", "resends", "requests", "rejected", "window")
        },
        "wire": wire_breakdown(rel, stats, [r for _, r in requests], device, command),
        "socket_bytes": sockets,
        "socket_ratio": (sockets["received"] + sockets["sent"]) / size if sockets else None,
    }


def part_goodput(bench: Bench, rel: PublishedRelease, reps: int) -> dict[str, Any]:
    """``reps`` downloads of ``rel`` by fresh agents, each after RAW_PER_REP raw paho runs of the same bytes."""
    payload = rel.payload_file(rel.meta.payloads[0].id)
    raw_runs, ota_runs = [], []
    for rep in range(reps):
        for k in range(RAW_PER_REP):
            raw = raw_paho(bench.broker, payload, rel.meta.chunk_size, f"r{rep}-{k}")
            say(f"goodput rep {rep + 1}/{reps}: raw paho {raw['bytes_per_s'] / 1e6:.1f} MB/s ({raw['seconds']:.2f} s)")
            raw_runs.append(raw)
        run = edgeops_download(bench, rel, f"dl-{rep}")
        say(
            f"goodput rep {rep + 1}/{reps}: edgeops {run['bytes_per_s'] / 1e6:.1f} MB/s ({run['agent_seconds']:.2f} s"
            f" agent; {run['first_publish_to_downloaded_s']:.2f} s from first publish), install {run['install']}"
        )
        ota_runs.append(run)
    raw_bps = median([r["bytes_per_s"] for r in raw_runs])

    def ratio(key: str) -> float:
        return median([r[key] for r in ota_runs]) / raw_bps

    return {
        "measured": "full-artifact payload to one agent: ota.started (metadata verified) -> ota.downloaded (every "
        "chunk hash-checked, written, fsynced); raw: first publish -> subscriber has every message",
        "payload_bytes": ota_runs[0]["payload_bytes"],
        "chunk_size": rel.meta.chunk_size,
        "raw": raw_runs,
        "edgeops": ota_runs,
        "raw_bytes_per_s": raw_bps,
        "edgeops_bytes_per_s": median([r["bytes_per_s"] for r in ota_runs]),
        "ratio": ratio("bytes_per_s"),
        "ratio_from_first_publish": ratio("bytes_per_s_from_first_publish"),
        "ratio_from_command": ratio("bytes_per_s_from_command"),
        "median_s": {
            k: median([r[k] for r in ota_runs if r[k] is not None])
            for k in (
                "command_to_started_s",
                "started_to_first_request_s",
                "first_request_to_first_publish_s",
                "first_publish_to_downloaded_s",
                "agent_seconds",
            )
        },
        "raw_median_s": median([r["seconds"] for r in raw_runs]),
    }


# ---------------------------------------------------------------- part 3: interrupted transfer


def part_interrupted(bench: Bench, rel: PublishedRelease) -> dict[str, Any]:
    """Kill the agent twice mid-download (SIGKILL at a fault point), restart it each time, let it finish."""
    events, arts, work = bench.events, bench.arts, bench.work
    device = "killed"
    config = write_agent_config(work / device, device, bench)
    log = work / f"{device}.log"
    count = rel.meta.payloads[0].chunk_count
    faults = [count // 3, count // 3]
    bitmap = work / device / "data" / "ota" / rel.meta.release_id / "have.bitmap"
    held_on_disk = []
    with serving(bench, [rel], device) as server:
        proc = start_agent(config, log, fault=f"ota.chunk.stored@{faults[0]}")
        try:
            events.wait_online([device], "1.0.0", proc)
            t_cmd = time.time()
            events.send(device_topics(FLEET, device).cmd, ota_command(arts.key, rel.meta.release_id, device=device))
            for i, n in enumerate(faults):
                code = proc.wait(WAIT_S)
                if code != -signal.SIGKILL:
                    raise BenchError(f"the agent exited with {code}, not killed at ota.chunk.stored@{n}")
                held_on_disk.append(sum(bitmap.read_bytes()))
                say(f"interrupted: kill {i + 1} after {n} stored chunks; {held_on_disk[-1]}/{count} chunks on disk")
                t_start = time.time()
                nxt = f"ota.chunk.stored@{faults[i + 1]}" if i + 1 < len(faults) else None
                proc = start_agent(config, log, fault=nxt)  # its events may go out only after its own restart
            done = events.wait_event(device, ["ota.downloaded", "ota.failed", "ota.rejected"], t_start)
            end = events.wait_event(device, ["ota.completed", "ota.failed", "ota.rejected"], t_start)
            stats = server.stats()
        finally:
            stop_process(proc)
    if done["type"] != "ota.downloaded":
        raise BenchError(f"{device}: {done['type']}: {done.get('reason')}: {done.get('detail')}")
    return {
        "measured": "the big update; agent killed (SIGKILL) after its N-th stored chunk, restarted at once, twice",
        "chunks": count,
        "kills_after_stored_chunks": faults,
        "chunks_on_disk_after_kill": held_on_disk,
        "started_with_held": [e["held"] for e in events.events(device, "ota.started", t_cmd)],
        "interruptions": len(faults),
        "resends": stats["resends"],
        "resends_per_interruption": stats["resends"] / len(faults),
        "server": {k: stats[k] for k in ("chunks_published", "first_sends", "resends", "requests", "rejected")},
        "command_to_downloaded_s": round(done["ts"] - t_cmd, 3),
        "last_run_agent_seconds": done["seconds"],
        "outcome": end["type"],
    }


# ---------------------------------------------------------------- part 4: one release, a fleet


def start_fleet(bench: Bench, n: int, prefix: str) -> subprocess.Popen[bytes]:
    """FleetSim with ``n`` agents (``{prefix}-0000``...) on v1 in one subprocess (SIM_RUNNER); SIGTERM stops it."""
    args = [sys.executable, "-c", SIM_RUNNER, str(bench.work / prefix), str(n), FLEET, PROFILE, bench.broker.url]
    args += [str(bench.arts.pub), str(bench.arts.v1), GROUP, str(FLEET_LATENCY_BUDGET_FACTOR), prefix]
    with (bench.work / f"{prefix}.log").open("ab") as err:
        return subprocess.Popen(args, stdout=err, stderr=err, cwd=REPO)


def first_events(events: Events, kinds: Sequence[str], after: float) -> dict[str, dict[str, Any]]:
    """Device id -> its first event of one of ``kinds`` stamped at or after ``after``."""
    seen: dict[str, dict[str, Any]] = {}
    for e in events.events(after=after):
        if e.get("type") in kinds:
            seen.setdefault(str(e.get("device")), e)
    return seen


def wait_fleet(events: Events, devices: Sequence[str], kinds: Sequence[str], after: float) -> dict[str, dict[str, Any]]:
    """The first event of ``kinds`` per device after ``after``, once every device has one (BenchError on timeout)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        seen = first_events(events, kinds, after)
        if all(d in seen for d in devices):
            return seen
        if time.monotonic() > deadline:
            raise BenchError(f"{len(seen)} of {len(devices)} devices reported {'/'.join(kinds)} within {WAIT_S:g} s")
        time.sleep(0.1)


def request_spread(events: Events, devices: Sequence[str], t_cmd: float) -> dict[str, float]:
    """When the devices' first repair requests reached the broker (seen here), in seconds after the command."""
    firsts = sorted(min(t for t, _ in reqs) - t_cmd for d in devices if (reqs := events.repair_requests(d)))
    if not firsts:
        return {}
    return {"min": round(firsts[0], 3), "median": round(median(firsts), 3), "max": round(firsts[-1], 3)}


def repaired_chunks(events: Events, devices: Sequence[str]) -> int:
    """Chunks asked for in repair requests after each device's first request (repairs, not first asks)."""
    return sum(len(parse_repair(raw).missing) for d in devices for _, raw in events.repair_requests(d)[1:])


def fleet_run(bench: Bench, rel: PublishedRelease, n: int, rep: int) -> dict[str, Any]:
    """A fresh fleet of ``n`` agents on v1 (one FleetSim process) and a fresh server; one group command."""
    events, arts = bench.events, bench.arts
    delta = next(p for p in rel.meta.payloads if p.kind is PayloadKind.DELTA)
    prefix = f"sim{rep}"
    devices = [f"{prefix}-{i:04d}" for i in range(n)]
    t0 = time.time()
    sim = start_fleet(bench, n, prefix)
    try:
        events.wait_online(devices, "1.0.0", sim)
        say(f"fleet rep {rep + 1}: {n} agents online in {time.time() - t0:.1f} s; group ota-update")
        with serving(bench, [rel], prefix) as server:
            t_cmd = time.time()
            events.send(group_cmd_topic(FLEET, GROUP), ota_command(arts.key, rel.meta.release_id, group=GROUP))
            ends = wait_fleet(events, devices, ["ota.completed", "ota.failed", "ota.rejected"], t_cmd)
            stats = server.stats()
    finally:
        stop_process(sim, timeout=120)
    ends = {d: e for d, e in ends.items() if d in devices}
    started = first_events(events, ["ota.started"], t_cmd)
    downloaded = [e for d, e in first_events(events, ["ota.downloaded"], t_cmd).items() if d in devices]
    per = stats["per_payload"][delta.id]
    outcomes = Counter(e["type"] for e in ends.values())
    failures = Counter(
        f"{e.get('reason')}: {str(e.get('detail'))[:160]}" for e in ends.values() if e["type"] != "ota.completed"
    )
    return {
        "payload_kinds_taken": sorted({e["payload"] for d, e in started.items() if d in devices}),
        "completed": outcomes["ota.completed"],
        "outcomes": dict(sorted(outcomes.items())),
        "failure_reasons": dict(failures),
        "chunks_published": per["published"],
        "first_sends": per["first_sends"],
        "resends": per["resends"],
        "repair_requests": per["requests"],
        "repaired_chunks_asked": repaired_chunks(events, devices),
        "published_per_chunk": per["published"] / delta.chunk_count,
        "published_per_device_chunk": per["published"] / (delta.chunk_count * n),
        "wire_ratio_broadcast": per["bytes_published"] / delta.size,
        "first_request_after_command_s": request_spread(events, devices, t_cmd),
        "all_downloaded_s": round(max(e["ts"] for e in downloaded) - t_cmd, 2) if downloaded else None,
        "download_seconds_median": median([e["seconds"] for e in downloaded]),
        "first_completed_s": round(min(e["ts"] for e in ends.values()) - t_cmd, 2),
        "converge_s": round(max(e["ts"] for e in ends.values()) - t_cmd, 2),
        "server_rejected": stats["rejected"],
    }


def part_fleet(bench: Bench, n: int, chunk: int, reps: int) -> dict[str, Any]:
    """The delta release v1 -> v2 to ``n`` agents by one group command, ``reps`` times (a fresh fleet each)."""
    arts = bench.arts
    if arts.v2 is None:
        raise BenchError("no v2 artifact was built")
    key = load_private_key(arts.key)
    rel = build_release(arts.v2, [arts.v1], fleet=FLEET, key=key, store=bench.work / "releases", chunk_size=chunk)
    delta = next(p for p in rel.meta.payloads if p.kind is PayloadKind.DELTA)
    runs = []
    for rep in range(reps):
        run = fleet_run(bench, rel, n, rep)
        say(
            f"fleet rep {rep + 1}: {run['chunks_published']} publishes for {delta.chunk_count} chunks, "
            f"{run['completed']}/{n} completed in {run['converge_s']} s"
        )
        runs.append(run)
    return {
        "measured": f"{n} agents in one FleetSim process (1 runtime thread each), one group command, {reps} fleets",
        "devices": n,
        "payload": {
            "kind": "delta",
            "bytes": delta.size,
            "target_bytes": rel.meta.target_size,
            "chunk_size": chunk,
            "chunks": delta.chunk_count,
            "codec": delta.codec,
        },
        "runs": runs,
        "published_per_chunk_median": median([r["published_per_chunk"] for r in runs]),
        "converge_s_median": median([r["converge_s"] for r in runs]),
    }


# ---------------------------------------------------------------- goals, table, main


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    g = results.get("goodput")
    if isinstance(g, dict) and "ratio" in g:
        out.append(
            {
                "goal": "goodput >= 0.5 x raw paho QoS 1",
                "value": round(g["ratio"], 3),
                "met": g["ratio"] >= GOALS["goodput_ratio"],
                "detail": f"from first publish {g['ratio_from_first_publish']:.3f}, "
                f"from command {g['ratio_from_command']:.3f}",
            }
        )
        worst = max(r["wire"]["ratio"] for r in g["edgeops"])
        out.append(
            {
                "goal": "wire bytes <= 1.03 x payload",
                "value": round(worst, 5),
                "met": worst <= GOALS["wire_ratio"],
                "detail": "worst rep, chunks + repair requests",
            }
        )
    i = results.get("interrupted")
    if isinstance(i, dict) and "resends" in i:
        out.append(
            {
                "goal": "<= 1 chunk re-sent per interruption",
                "value": i["resends_per_interruption"],
                "met": i["resends_per_interruption"] <= GOALS["resends_per_interruption"],
                "detail": f"{i['resends']} resends over {i['interruptions']} kills",
            }
        )
    f = results.get("fleet")
    if isinstance(f, dict) and "runs" in f:
        runs, chunks = f["runs"], f["payload"]["chunks"]
        # a resend is a repair when the devices asked again for at least that many chunks after their first request
        explained = all(r["resends"] <= r["repaired_chunks_asked"] for r in runs)
        done = all(r["completed"] == f["devices"] for r in runs)
        out.append(
            {
                "goal": "one release to a fleet: each chunk published once (plus repairs)",
                "value": round(max(r["published_per_chunk"] for r in runs), 3),
                "met": explained and done,
                "detail": "publishes per chunk in the worst fleet; all: "
                + ", ".join(
                    f"{r['chunks_published']}/{chunks} ({r['resends']} resends, {r['repaired_chunks_asked']} chunks "
                    f"asked again; {r['completed']}/{f['devices']} completed)"
                    for r in runs
                ),
            }
        )
    return out


def print_table(results: dict[str, Any]) -> None:
    g, i, f = results.get("goodput"), results.get("interrupted"), results.get("fleet")
    rows: list[tuple[str, str]] = []
    if isinstance(g, dict) and "ratio" in g:
        rows += [
            ("payload", f"{g['payload_bytes'] / 2**20:.1f} MiB in {g['chunk_size'] // 1024} KiB chunks"),
            ("raw paho QoS 1 (median)", f"{g['raw_bytes_per_s'] / 1e6:.1f} MB/s"),
            ("edgeops agent download (median)", f"{g['edgeops_bytes_per_s'] / 1e6:.1f} MB/s"),
            (
                "goodput ratio (agent / raw)",
                f"{g['ratio']:.3f}  (from first publish {g['ratio_from_first_publish']:.3f},"
                f" from command {g['ratio_from_command']:.3f})",
            ),
            ("wire / payload", ", ".join(f"{r['wire']['ratio']:.5f}" for r in g["edgeops"])),
            (
                "socket bytes / payload",
                ", ".join(f"{r['socket_ratio']:.5f}" for r in g["edgeops"] if r["socket_ratio"]),
            ),
        ]
    elif isinstance(g, dict):
        rows.append(("goodput", f"not measured: {g.get('error')}"))
    if isinstance(i, dict) and "resends" in i:
        rows.append(
            (
                "interrupted: resends / kills",
                f"{i['resends']} / {i['interruptions']} (held at each start {i['started_with_held']} of {i['chunks']})",
            )
        )
    elif isinstance(i, dict):
        rows.append(("interrupted", f"not measured: {i.get('error')}"))
    if isinstance(f, dict) and "runs" in f:
        for k, r in enumerate(f["runs"]):
            spread = r["first_request_after_command_s"]
            rows.append(
                (
                    f"fleet {k + 1} of {f['devices']}: publishes / chunks",
                    f"{r['chunks_published']} / {f['payload']['chunks']} ({r['resends']} re-sent), "
                    f"{r['completed']} completed in {r['converge_s']} s; first requests {spread.get('min')}-"
                    f"{spread.get('max')} s after the command",
                )
            )
    elif isinstance(f, dict):
        rows.append(("fleet", f"not measured: {f.get('error')}"))
    width = max((len(a) for a, _ in rows), default=0)
    print("\nOTA benchmark")
    for a, b in rows:
        print(f"  {a:<{width}}  {b}")
    print("\nGoals")
    for goal in results["goals"]:
        print(f"  {'met   ' if goal['met'] else 'MISSED'}  {goal['goal']}: {goal['value']} ({goal['detail']})")


def machine() -> dict[str, Any]:
    import paho.mqtt

    version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()
    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "paho_mqtt": paho.mqtt.__version__,
        "mosquitto": version[0] if version else "?",
        "platform": platform.platform(),
    }


def run_part(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    say(f"part {name}")
    try:
        return fn()
    except BenchError as exc:
        say(f"part {name} not measured: {exc}")
        return {"error": str(exc)}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    need_big = "goodput" not in args.skip or "interrupted" not in args.skip
    arts = build_artifacts(work, size_mb=args.size_mb, big=need_big, v2="fleet" not in args.skip)
    agent_ota = dict(args.agent_ota)
    results: dict[str, Any] = {
        "benchmark": "ota",
        "machine": machine(),
        "config": {
            "size_mb": args.size_mb,
            "chunk_size": args.chunk_size,
            "reps": args.reps,
            "devices": args.devices,
            "fleet_chunk_size": args.fleet_chunk_size,
            "fleet_reps": args.fleet_reps,
            "profile": PROFILE,
            "server_max_inflight": SERVER_INFLIGHT,
            "raw_publisher_max_inflight": RAW_INFLIGHT,
            "server_gather_s": args.gather_s,
            "fleet_latency_budget_factor": FLEET_LATENCY_BUDGET_FACTOR,
            "agent_ota": agent_ota or "defaults (repair_idle_s 2, repair_min_interval_s 2, sync_every_chunks 32)",
            "skip": args.skip,
        },
    }
    broker = MosquittoBroker(work / "mosquitto")
    broker.start()
    events = Events(broker)
    bench = Bench(broker, events, arts, work, agent_ota, args.gather_s)
    try:
        big = None
        if arts.big is not None:
            key = load_private_key(arts.key)
            big = build_release(arts.big, [], fleet=FLEET, key=key, store=work / "releases", chunk_size=args.chunk_size)
        if big is not None and "goodput" not in args.skip:
            results["goodput"] = run_part("goodput", lambda: part_goodput(bench, big, args.reps))
        if big is not None and "interrupted" not in args.skip:
            results["interrupted"] = run_part("interrupted", lambda: part_interrupted(bench, big))
        if "fleet" not in args.skip:
            results["fleet"] = run_part(
                "fleet", lambda: part_fleet(bench, args.devices, args.fleet_chunk_size, args.fleet_reps)
            )
    finally:
        events.close()
        broker.stop()
    results["goals"] = goals(results)
    results["seconds"] = round(time.monotonic() - _T0, 1)
    return results


def _ota_setting(text: str) -> tuple[str, float | int]:
    key, sep, value = text.partition("=")
    if not sep or key not in {"max_download_bytes", "repair_idle_s", "repair_min_interval_s", "sync_every_chunks"}:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with an [ota] key, got {text!r}")
    number = float(value)
    return key, int(number) if key in ("max_download_bytes", "sync_every_chunks") else number


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=20.0, help="size of the single-device update (MiB, default 20)")
    p.add_argument("--devices", type=int, default=50, help="agents in the fleet part (default 50)")
    p.add_argument("--reps", type=int, default=5, help="goodput repetitions, interleaved with raw paho (default 5)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="chunk size of the big update")
    p.add_argument("--fleet-chunk-size", type=int, default=2048, help="chunk size of the fleet's delta release")
    p.add_argument("--fleet-reps", type=int, default=3, help="fleets started, one rollout each (default 3)")
    p.add_argument("--skip", action="append", default=[], choices=PARTS, help="leave a part out (repeatable)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ota.json")
    p.add_argument(
        "--gather-s",
        type=float,
        default=DEFAULT_GATHER_S,
        help=f"the release servers' gather window (default {DEFAULT_GATHER_S:g} s, the server's default)",
    )
    p.add_argument(
        "--agent-ota",
        type=_ota_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an [ota] setting of the single agents' agent.toml, e.g. sync_every_chunks=1000 (repeatable; the "
        "fleet's agents keep the defaults)",
    )
    p.add_argument("--work", type=Path, help="keep artifacts, configs and logs here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        results = run(args, args.work.resolve())
    else:
        work = Path(tempfile.mkdtemp(prefix="ota-bench-"))
        try:
            results = run(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print_table(results)
    print(f"\nwrote {args.out} ({results['seconds']} s)")
    failed = [name for name in PARTS if isinstance(results.get(name), dict) and "error" in results[name]]
    return 1 if failed else 0  # a missed goal is a result; a part that could not be measured is a failure


if __name__ == "__main__":
    raise SystemExit(main())
