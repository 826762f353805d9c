"""Agent benchmark: idle memory, start-to-first-inference and serving overhead of ``edgeops-agent``.

The goals (docs: /work/shared/DESIGN.md "Performance goals"): idle RSS ≤ 70 MB with a model loaded; ≤ 1.0 s from
start to first inference; ≤ 5 % p50 overhead over the bare interpreter. Measured on the digits example model for
two profiles: x86-gateway (ONNX int8, onnxruntime) and rpi4 (TFLite int8, LiteRT). Nothing leaves the machine.

Per profile:

- **start → first inference**: the artifact is installed once (``edgeops-agent install``) in a fresh data dir;
  then ``edgeops-agent run --config agent.toml`` is spawned ``--reps`` times and timed from ``Popen`` to the
  first successful ``POST /v1/infer`` answer (the API is polled every few ms). The broker is a mosquitto started
  by this script on a free 127.0.0.1 port (so the agent connects, publishes its state and events as in
  production); three more runs point the agent at an unused port (broker away), to show that an absent broker
  does not delay serving. For comparison, a bare ``python -c "import numpy, <runtime>; load; first inference"``
  process, timed from ``Popen`` to its "ready" line.
- **idle RSS**: VmRSS (and RssAnon/RssFile) of each of those processes 3 s after its first inference; and, in a
  separate process, the RSS after each import/load step (where the agent's extra megabytes come from).
- **p50 overhead**: in this one process, up to ``--n`` single-sample inferences on each path, in ROUNDS
  interleaved rounds (every path once per round, in turn) so a noisy shared machine hits every path alike:
  ``bare`` = the runtime's own API on a prepared input (the floor); ``runner`` = ``edgeops.runtime.ModelRunner``;
  ``host`` = the agent's serving path in-process (``Agent.infer``: request checks, model lock, telemetry and
  drift observers; an in-process agent without MQTT); ``api_tcp`` = ``ApiClient.infer`` against a spawned agent
  with the default API address kind (HTTP/1.1 keep-alive on 127.0.0.1, ``.npy`` request, JSON answer);
  ``api_unix`` = the same against a second spawned agent serving on a Unix socket; ``health_tcp`` /
  ``health_unix`` = ``GET /v1/health`` on those connections (an HTTP round trip without a model). Ratios are of
  pooled p50s (the JSON also has the median of per-round ratios, and each path's added µs). A path's share of
  one round stops after ``ROUND_MAX_S`` so that a path with a fixed stall cannot stretch the run.

Writes benchmarks/results/agent.json (``--out``) and prints a table.
Run: ``.venv/bin/python benchmarks/agent_bench.py [--quick] [--reps 5] [--n 2000] [--out PATH]`` (~2 min).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from device_agent.agent import Agent  # noqa: E402
from device_agent.api_client import ApiClient  # noqa: E402
from device_agent.config import load_config  # noqa: E402
from device_agent.service import NoModelError  # noqa: E402
from edgeops.artifact import verify_artifact  # noqa: E402
from edgeops.errors import TransportError  # noqa: E402
from edgeops.runtime import ModelRunner, open_model  # noqa: E402
from edgeops.signing import generate_keypair, load_public_key  # noqa: E402
from tests.support.artifacts import build_digits  # noqa: E402
from tests.support.mosquitto import MosquittoBroker, free_port, mosquitto_binary  # noqa: E402

DIGITS = REPO / "examples" / "digits" / "out"
PROFILES = {  # profile -> (runtime, eval data in the model's caller layout)
    "x86-gateway": ("onnxruntime", "eval_nchw.npz"),
    "rpi4": ("LiteRT", "eval.npz"),
}
GOALS = {"idle_rss_mb": 70.0, "start_to_first_inference_s": 1.0, "p50_overhead": 0.05}
IDLE_S = 3.0  # RSS is read this long after the first inference
ROUNDS = 10  # interleaved rounds of the overhead measurement
PATHS = ("bare", "runner", "host", "api_tcp", "api_unix", "health_tcp", "health_unix")
ROUND_MAX_S = 0.5  # one path's share of one round stops after this long (a path with a fixed stall)

BARE = {  # argv: model file, threads. Prints "ready" after the first inference, then idles until stdin closes.
    "onnx": """import sys
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions(); opts.intra_op_num_threads = int(sys.argv[2]); opts.inter_op_num_threads = 1
opts.log_severity_level = 3
sess = ort.InferenceSession(sys.argv[1], sess_options=opts, providers=["CPUExecutionProvider"])
i = sess.get_inputs()[0]
types = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
sess.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], types[i.type])})
print("ready", flush=True)
sys.stdin.read()
""",
    "tflite": """import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interp = Interpreter(model_path=sys.argv[1], num_threads=int(sys.argv[2]))
interp.allocate_tensors()
d = interp.get_input_details()[0]
interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
interp.invoke()
interp.get_tensor(interp.get_output_details()[0]["index"])
print("ready", flush=True)
sys.stdin.read()
""",
}

BREAKDOWN = """import json, sys
def rss(label):
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon", "RssFile")))
    steps.append((label, {k: round(int(v.split()[0]) / 1024, 1) for k, v in f.items()}))
steps = []
rss("python")
import numpy as np
rss("+ numpy")
fmt, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if fmt == "onnx":
    import onnxruntime as ort
    rss("+ onnxruntime import")
    opts = ort.SessionOptions(); opts.intra_op_num_threads = threads; opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    i = sess.get_inputs()[0]
    sess.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)})
else:
    from ai_edge_litert.interpreter import Interpreter
    rss("+ ai_edge_litert import")
    interp = Interpreter(model_path=model, num_threads=threads)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    interp.invoke()
rss("+ model loaded, 1 inference (= the bare process)")
import edgeops.artifact, edgeops.signing
rss("+ edgeops light core (artifact, signing: cryptography/OpenSSL)")
import paho.mqtt.client
rss("+ paho-mqtt (ssl, ...)")
import device_agent.agent, device_agent.cli
rss("+ device_agent modules (http.server, sqlite3, ...)")
print(json.dumps(steps))
"""


# ---------------------------------------------------------------- process helpers


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of a process, in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "edgeops-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "device_agent.cli"]


class AgentProcess:
    """``edgeops-agent run --config CONFIG`` in a subprocess, logging to ``log``; ``started`` = just before Popen."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self._offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as err:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen([*agent_command(), "run", "--config", str(config)], stdout=err, stderr=err)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def first_inference(self, client: ApiClient, x: np.ndarray) -> float:
        """Poll ``/v1/infer`` every ~3 ms until it answers; seconds from Popen to that answer."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                client.infer(x)
                return time.perf_counter() - self.started
            except (TransportError, NoModelError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the agent exited with {self.proc.returncode}: {self.tail()}") from None
                time.sleep(0.003)
        raise RuntimeError(f"no inference answer within 60 s: {self.tail()}")

    def wait_up(self) -> None:
        """Wait for the "agent ... up" log line. (A SIGTERM before it can deadlock the agent: see the README.)"""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            with self.log.open("rb") as f:
                f.seek(self._offset)
                if b" up: model " in f.read():
                    return
            time.sleep(0.01)
        raise RuntimeError(f"the agent did not log that it is up: {self.tail()}")

    def rss(self) -> dict[str, float]:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM and wait; RuntimeError when it does not stop within 30 s (then killed) or exits non-zero."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the agent did not stop on SIGTERM within 30 s: {self.tail()}") from None
        if rc != 0:
            raise RuntimeError(f"the agent stopped with exit code {rc}: {self.tail()}")


def time_agent(config: Path, address: str, x: np.ndarray, log: Path, *, idle_s: float | None) -> dict[str, Any]:
    """Spawn the agent, time Popen → first /v1/infer answer, optionally read its RSS after ``idle_s``, stop it."""
    agent = AgentProcess(config, log)
    try:
        with ApiClient(address, timeout=2.0) as client:
            seconds = agent.first_inference(client, x)
        rss = None
        if idle_s is not None:
            time.sleep(idle_s)
            rss = agent.rss()
        agent.wait_up()
    finally:
        agent.stop()
    return {"seconds": seconds, "rss_mb": rss}


def time_bare(fmt: str, model: Path, threads: int, *, idle_s: float) -> dict[str, Any]:
    """A bare runtime process: Popen → its "ready" line (after the first inference); its RSS after ``idle_s``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", BARE[fmt], str(model), str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stdin is not None  # both were asked for: PIPE
    try:
        line = proc.stdout.readline()
        seconds = time.perf_counter() - t0
        if line.strip() != b"ready":
            raise RuntimeError(f"bare {fmt} process failed (exit {proc.wait()})")
        time.sleep(idle_s)
        rss = rss_mb(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    return {"seconds": seconds, "rss_mb": rss}


def rss_breakdown(fmt: str, model: Path, threads: int) -> list[tuple[str, dict[str, float]]]:
    out = subprocess.run([sys.executable, "-c", BREAKDOWN, fmt, str(model), str(threads)], check=True,
                         capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return [(name, r) for name, r in json.loads(out.stdout)]


# ---------------------------------------------------------------- set-up


def write_config(path: Path, *, device: str, profile: str, data_dir: Path, pub: Path, broker: str, api: str,
                 initial: Path | None = None) -> Path:
    lines = [f'device_id = "{device}"', 'fleet = "bench"', f'profile = "{profile}"', f'data_dir = "{data_dir}"',
             f'trusted_keys = ["{pub}"]']
    if initial is not None:
        lines.append(f'initial_artifact = "{initial}"')
    lines += ["[broker]", f'url = "{broker}"', "[telemetry]", "interval_s = 60", "[api]", f'address = "{api}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def model_file(artifact: Path, pub: Path, out: Path) -> tuple[Path, str, int]:
    """The artifact's model file written to ``out`` (for the bare runtime); its format and thread count."""
    verified = verify_artifact(artifact, [load_public_key(pub)])
    m = verified.manifest
    path = out / m.model_file
    path.write_bytes(verified.read(m.model_file))
    return path, m.format, int(m.runtime_config.get("threads") or 1)


def install(config: Path, artifact: Path) -> None:
    subprocess.run([*agent_command(), "install", "--config", str(config), str(artifact)], check=True,
                   capture_output=True)


# ---------------------------------------------------------------- overhead


def bare_call(fmt: str, model: Path, threads: int, xs: np.ndarray) -> tuple[Callable[[int], Any], str]:
    """A call running sample i through the runtime's own API (input prepared once, as the model takes it)."""
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        name, outs = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
        samples = [xs[i : i + 1] for i in range(len(xs))]
        return (lambda i: sess.run(outs, {name: samples[i % len(samples)]})), f"onnxruntime {ort.__version__}"
    from ai_edge_litert import __version__ as litert_version
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model), num_threads=threads)
    interp.allocate_tensors()
    d, o = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zp = d["quantization"]
    q = xs if not scale else np.clip(np.round(xs / scale) + zp, -128, 127)
    samples = [np.ascontiguousarray(q[i : i + 1].astype(d["dtype"])) for i in range(len(q))]

    def run(i: int) -> Any:
        interp.set_tensor(d["index"], samples[i % len(samples)])
        interp.invoke()
        return interp.get_tensor(o["index"])

    return run, f"ai-edge-litert {litert_version}"


def _time_round(call: Callable[[int], Any], start: int, count: int) -> list[float]:
    """Up to ``count`` timed calls (ms), stopping early after ROUND_MAX_S (a path with a fixed stall)."""
    times: list[float] = []
    deadline = time.perf_counter() + ROUND_MAX_S
    for i in range(start, start + count):
        t0 = time.perf_counter_ns()
        call(i)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        if time.perf_counter() > deadline:
            break
    return times


def overhead(calls: dict[str, Callable[[int], Any]], n: int) -> dict[str, Any]:
    """Time up to n calls of each path in ROUNDS interleaved rounds; p50/p95 (ms) per path, ratios to bare."""
    for call in calls.values():  # warm-up: connections, caches, allocator
        _time_round(call, 0, 50)
    per_round = max(1, n // ROUNDS)
    samples: dict[str, list[float]] = {k: [] for k in calls}
    rounds: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(ROUNDS):
        for name, call in calls.items():
            times = _time_round(call, r * per_round, per_round)
            samples[name] += times
            rounds[name].append(float(np.percentile(times, 50)))
    p50 = {k: float(np.percentile(v, 50)) for k, v in samples.items()}
    lat = {k: {"p50": round(p50[k], 4), "p95": round(float(np.percentile(v, 95)), 4), "n": len(v),
               "p50_rounds": [round(x, 4) for x in rounds[k]]} for k, v in samples.items()}
    others = [k for k in calls if k != "bare"]
    return {
        "latency_ms": lat,
        "ratios": {f"{k}/bare": round(p50[k] / p50["bare"], 3) for k in others},
        "ratios_median_of_rounds": {
            f"{k}/bare": round(statistics.median(a / b for a, b in zip(rounds[k], rounds["bare"])), 3) for k in others
        },
        "added_p50_us": {k: round((p50[k] - p50["bare"]) * 1e3, 1) for k in others},
        # the fixed cost a path adds is below 5 % of the model's own time for models slower than this
        "model_ms_for_5pct": {k: round(max(0.0, p50[k] - p50["bare"]) / GOALS["p50_overhead"], 2) for k in others},
    }


def measure_overhead(work: Path, profile: str, artifact: Path, pub: Path, apis: dict[str, str], model: Path,
                     fmt: str, threads: int, xs: np.ndarray, n: int) -> dict[str, Any]:
    """Every path in this process, interleaved: bare, runner, host (in-process agent), API over TCP and Unix."""
    backend = open_model(model, fmt, threads=threads)
    runner = ModelRunner(backend)
    name = backend.inputs[0].name
    cfg = write_config(work / "inproc.toml", device="inproc", profile=profile, data_dir=work / "inproc-data",
                       pub=pub, broker="mqtt://127.0.0.1:1", api="", initial=artifact)
    agent = Agent(load_config(cfg), connect=False, serve_api=False)
    agent.start()
    tcp, unix = ApiClient(apis["tcp"], timeout=10.0), ApiClient(apis["unix"], timeout=10.0)
    samples = [xs[i : i + 1] for i in range(len(xs))]
    bare, runtime = bare_call(fmt, model, threads, xs)
    try:
        calls: dict[str, Callable[[int], Any]] = {
            "bare": bare,
            "runner": lambda i: runner.run({name: samples[i % len(samples)]}),
            "host": lambda i: agent.infer({name: samples[i % len(samples)]}),
            "api_tcp": lambda i: tcp.infer(samples[i % len(samples)]),
            "api_unix": lambda i: unix.infer(samples[i % len(samples)]),
            "health_tcp": lambda i: tcp.health(),
            "health_unix": lambda i: unix.health(),
        }
        result = overhead(calls, n)
    finally:
        tcp.close()
        unix.close()
        agent.stop()
    return {"runtime": runtime, **result}


# ---------------------------------------------------------------- one profile


def stats(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "runs": [round(v, 4) for v in values]}


def rss_stats(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]} | {"runs": runs}


def serve_and_measure(work: Path, profile: str, artifact: Path, pub: Path, cfg: Path, api: str, model: Path,
                      fmt: str, threads: int, xs: np.ndarray, n: int) -> dict[str, Any]:
    """Two agent processes (API on TCP, and on a Unix socket), the overhead rounds, their RSS after them."""
    unix_cfg = write_config(work / "agent-unix.toml", device="bench-unix", profile=profile,
                            data_dir=work / "data-unix", pub=pub, broker="mqtt://127.0.0.1:1",
                            api=f"unix:{work / 'agent.sock'}", initial=artifact)
    agents = {"tcp": AgentProcess(cfg, work / "agent.log"), "unix": AgentProcess(unix_cfg, work / "agent-unix.log")}
    try:
        for a in agents.values():
            a.wait_up()
        apis = {"tcp": api, "unix": f"unix:{work / 'agent.sock'}"}
        result = measure_overhead(work, profile, artifact, pub, apis, model, fmt, threads, xs, n)
        result["rss_after_rounds_mb"] = {k: a.rss() for k, a in agents.items()}
    finally:
        for a in agents.values():
            a.stop()
    return result


def bench_profile(work: Path, profile: str, artifact: Path, pub: Path, broker: str, reps: int, n: int,
                  ) -> dict[str, Any]:
    work.mkdir(parents=True)
    xs = np.load(DIGITS / PROFILES[profile][1])["x"].astype(np.float32)
    model, fmt, threads = model_file(artifact, pub, work)
    api = f"127.0.0.1:{free_port()}"
    common: dict[str, Any] = {"device": f"bench-{profile}", "profile": profile, "data_dir": work / "data", "pub": pub,
                              "api": api}
    cfg = write_config(work / "agent.toml", broker=broker, **common)
    away = write_config(work / "agent-away.toml", broker=f"mqtt://127.0.0.1:{free_port()}", **common)
    install(cfg, artifact)
    log = work / "agent.log"
    agent_runs = [time_agent(cfg, api, xs[:1], log, idle_s=IDLE_S) for _ in range(reps)]
    away_runs = [time_agent(away, api, xs[:1], log, idle_s=None) for _ in range(min(reps, 3))]
    bare_runs = [time_bare(fmt, model, threads, idle_s=IDLE_S) for _ in range(reps)]
    print(f"  {profile}: start-up and idle RSS done", flush=True)
    over = serve_and_measure(work, profile, artifact, pub, cfg, api, model, fmt, threads, xs, n)
    return {
        "format": fmt, "runtime": over.pop("runtime"), "threads": threads, "artifact_bytes": artifact.stat().st_size,
        "start_to_first_inference_s": {"agent": stats([r["seconds"] for r in agent_runs]),
                                       "agent_broker_away": stats([r["seconds"] for r in away_runs]),
                                       "bare_runtime": stats([r["seconds"] for r in bare_runs])},
        "idle_rss_mb": {"agent": rss_stats([r["rss_mb"] for r in agent_runs]),
                        "bare_runtime": rss_stats([r["rss_mb"] for r in bare_runs])},
        "rss_breakdown_mb": rss_breakdown(fmt, model, threads),
        **over,
    }


def _rss_why(p: dict[str, Any]) -> str:
    steps = p["rss_breakdown_mb"]
    agent_steps = [(b[0], b[1]["VmRSS"] - a[1]["VmRSS"]) for a, b in itertools.pairwise(steps)
                   if any(k in b[0] for k in ("edgeops", "paho", "device_agent"))]
    return (f"the bare runtime with the model is {p['idle_rss_mb']['bare_runtime']['VmRSS']} MB; the agent's imports "
            "add: " + ", ".join(f"{name} {mb:+.1f} MB" for name, mb in agent_steps))


def goals(p: dict[str, Any]) -> dict[str, Any]:
    """Each goal: value, threshold, passed, and (when missed) what the measurements say holds it back."""
    lat, added, floor = p["latency_ms"], p["added_p50_us"], p["model_ms_for_5pct"]
    bare = lat["bare"]["p50"]

    def goal(value: float, limit: float, why: str) -> dict[str, Any]:
        return {"value": value, "goal": f"<= {limit}", "passed": value <= limit} | ({} if value <= limit else
                                                                                    {"why": why})

    def fixed(path: str) -> str:
        return (f"{path} adds a fixed {added[path]} us per call to a {bare:.3f} ms model; that is under 5 % only "
                f"for models slower than {floor[path]} ms")

    stall = lat["health_tcp"]["p50"] > 10 * lat["health_unix"]["p50"]
    return {
        "idle_rss_mb": goal(p["idle_rss_mb"]["agent"]["VmRSS"], GOALS["idle_rss_mb"], _rss_why(p)),
        "start_to_first_inference_s": goal(p["start_to_first_inference_s"]["agent"]["median"],
                                           GOALS["start_to_first_inference_s"], "see start_to_first_inference_s"),
        "p50_overhead_api_tcp": goal(round(p["ratios"]["api_tcp/bare"] - 1, 3), GOALS["p50_overhead"],
                                     (f"every HTTP round trip on TCP takes ~{lat['health_tcp']['p50']:.0f} ms, "
                                      "GET /v1/health as well: the server sends headers and body in two writes "
                                      "without TCP_NODELAY (Nagle + the client's delayed ACK); " if stall else "")
                                     + fixed("api_tcp")),
        "p50_overhead_api_unix": goal(round(p["ratios"]["api_unix/bare"] - 1, 3), GOALS["p50_overhead"],
                                      fixed("api_unix") + f" (an HTTP round trip alone: {added['health_unix']} us)"),
        "p50_overhead_host": goal(round(p["ratios"]["host/bare"] - 1, 3), GOALS["p50_overhead"], fixed("host")),
    }


# ---------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in ("edgeops", "numpy", "onnxruntime", "ai-edge-litert", "paho-mqtt", "cryptography"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None)
    mosq = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {"platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "versions": versions, "mosquitto": mosq[0] if mosq else None}


def _cells(p: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, cell) rows of the table for one profile's results."""
    s, rss, lat, g = p["start_to_first_inference_s"], p["idle_rss_mb"], p["latency_ms"], p["goals"]
    cells = [
        ("start→1st inference, agent (median / min)", f"{s['agent']['median']:.3f} / {s['agent']['min']:.3f} s"),
        ("  agent, broker away (median / min)",
         f"{s['agent_broker_away']['median']:.3f} / {s['agent_broker_away']['min']:.3f} s"),
        ("  bare runtime process (median / min)",
         f"{s['bare_runtime']['median']:.3f} / {s['bare_runtime']['min']:.3f} s"),
        ("idle RSS, agent (VmRSS / anon)", f"{rss['agent']['VmRSS']} / {rss['agent']['RssAnon']} MB"),
        ("idle RSS, bare runtime (VmRSS / anon)",
         f"{rss['bare_runtime']['VmRSS']} / {rss['bare_runtime']['RssAnon']} MB"),
    ]
    cells += [(f"latency p50 / p95, {k}", f"{lat[k]['p50']:.3f} / {lat[k]['p95']:.3f} ms") for k in PATHS]
    cells += [(f"p50 ratio {k} (median of rounds)", f"{p['ratios'][k]:.2f} ({p['ratios_median_of_rounds'][k]:.2f})")
              for k in ("runner/bare", "host/bare", "api_tcp/bare", "api_unix/bare")]
    cells += [(f"goal {k} {v['goal']}", f"{v['value']} {'met' if v['passed'] else 'MISSED'}") for k, v in g.items()]
    return cells


def table(profiles: dict[str, dict[str, Any]]) -> str:
    columns = [_cells(p) for p in profiles.values()]
    rows = [("", *profiles)] + [(label, *(c[i][1] for c in columns)) for i, (label, _) in enumerate(columns[0])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="agent / bare process starts per profile")
    parser.add_argument("--n", type=int, default=2000, help="inferences per path in the overhead rounds")
    parser.add_argument("--quick", action="store_true", help="2 starts, 500 inferences per path")
    parser.add_argument("--no-broker", action="store_true", help="point the timed agents at an unused port")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "agent.json")
    args = parser.parse_args(argv)
    reps, n = (2, 500) if args.quick else (args.reps, args.n)
    if not (DIGITS / "digits.onnx").is_file():
        subprocess.run([sys.executable, str(REPO / "examples/digits/train.py"), "--out", str(DIGITS)], check=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeops-agent-bench-") as tmp:
        work = Path(tmp)
        generate_keypair(work / "keys")
        pub = work / "keys" / "signing.pub"
        arts = build_digits(DIGITS, work / "art", work / "keys" / "signing.key", "1.0.0", profiles=tuple(PROFILES))
        print(f"built {', '.join(arts)} in {time.perf_counter() - t0:.0f} s", flush=True)
        broker = MosquittoBroker(work / "broker")
        broker.start()
        try:
            url = f"mqtt://127.0.0.1:{free_port()}" if args.no_broker else broker.url
            results = {p: bench_profile(work / p, p, a, pub, url, reps, n) for p, a in arts.items()}
        finally:
            broker.stop()
    for p in results.values():
        p["goals"] = goals(p)
    doc = {"benchmark": "agent", "seconds": round(time.perf_counter() - t0, 1), "machine": machine(),
           "broker": "none (an unused port)" if args.no_broker else "mosquitto on a free 127.0.0.1 port, started "
           "by the benchmark; the broker_away runs point at an unused port",
           "settings": {"reps": reps, "n": n, "rounds": ROUNDS, "idle_s": IDLE_S, "model": "examples/digits"},
           "goal_thresholds": GOALS, "profiles": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp_out, args.out)
    print("\n" + table(results) + f"\n\nwrote {args.out} in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
