"""`edgeops-agent` as a user runs it: the daemon under a real mosquitto (ready, infer through it, SIGTERM →
clean exit with an offline state; kill -9 → the last will marks it offline), the offline commands (infer,
batch, status, install), one daemon per data dir, and clear errors for bad configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.support.mosquitto import MosquittoBroker
from tests.support.subscriber import Collector

STATE = "edgeops/v1/testfleet/device/dev-1/state"


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent.cli", *args], capture_output=True, text=True, timeout=120
    )


def _start(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_running(cfg: Path, proc: subprocess.Popen[str]) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        out = agent_cli("status", "--config", str(cfg), "--json")
        if out.returncode == 0 and json.loads(out.stdout).get("running"):
            return json.loads(out.stdout)
        time.sleep(0.2)
    raise AssertionError("agent did not come up")


@pytest.fixture
def x_npy(tmp_path: Path, digits_dir: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.load(digits_dir / "eval_nchw.npz")["x"][:1].astype(np.float32))
    return path


def test_daemon_serves_and_stops_cleanly(
    write_config: Callable[..., Path], mosquitto: MosquittoBroker, artifacts: dict[str, Path], x_npy: Path
) -> None:
    cfg = write_config(
        broker={"url": mosquitto.url}, initial_artifact=str(artifacts["v1"]), api={"address": "127.0.0.1:18931"}
    )
    collector = Collector(mosquitto.host, mosquitto.port, [STATE])
    proc = _start(cfg)
    try:
        status = _wait_running(cfg, proc)
        assert status["slots"]["active"] == "a" and status["models"]["active"]["version"] == "1.0.0"
        out = agent_cli("infer", "--config", str(cfg), "--json", str(x_npy))
        doc = json.loads(out.stdout)
        assert doc["via"] == "agent" and doc["model_version"] == "1.0.0" and len(doc["outputs"]["probs"][0]) == 10
        second = agent_cli("install", "--config", str(cfg), str(artifacts["v1.1"]))
        assert second.returncode == 1 and "another edgeops-agent is running" in second.stderr
        collector.wait_for("/state", lambda d: d.get("online") is True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        offline = collector.wait_for("/state", lambda d: d.get("online") is False)
        assert offline["reason"] == "shutdown"
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()


def test_kill_9_triggers_the_last_will(
    write_config: Callable[..., Path], mosquitto: MosquittoBroker, artifacts: dict[str, Path]
) -> None:
    cfg = write_config(
        broker={"url": mosquitto.url}, initial_artifact=str(artifacts["v1"]), api={"address": "127.0.0.1:18932"}
    )
    collector = Collector(mosquitto.host, mosquitto.port, [STATE])
    proc = _start(cfg)
    try:
        _wait_running(cfg, proc)
        collector.wait_for("/state", lambda d: d.get("online") is True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        will = collector.wait_for("/state", lambda d: d.get("online") is False)
        assert will["reason"] == "connection lost"
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()


def test_offline_commands(
    write_config: Callable[..., Path],
    artifacts: dict[str, Path],
    x_npy: Path,
    tmp_path: Path,
    digits_dir: Path,
    keys_dir: Path,
) -> None:
    cfg = str(write_config())
    none = agent_cli("infer", "--config", cfg, str(x_npy))
    assert none.returncode == 1 and "no model installed" in none.stderr
    assert agent_cli("install", "--config", cfg, str(artifacts["v1"])).returncode == 0
    rejected = agent_cli("install", "--config", cfg, "--json", str(artifacts["bad_golden"]))
    assert rejected.returncode == 1 and json.loads(rejected.stdout)["check"] == "golden"
    pub = str(keys_dir / "signing.pub")
    check = agent_cli("check", str(artifacts["bad_golden"]), "--pubkey", pub, "--profile", "x86-gateway")
    assert check.returncode == 1 and "golden outputs differ" in check.stderr
    wrong = agent_cli("install", "--config", cfg, str(artifacts["rpi4"]))
    assert wrong.returncode == 1 and "profile" in wrong.stderr
    status = json.loads(agent_cli("status", "--config", cfg, "--json").stdout)
    assert status["running"] is False and status["slots"]["versions"]["a"] == "1.0.0"
    out = agent_cli("infer", "--config", cfg, str(x_npy))
    assert out.returncode == 0 and "model 1.0.0, local" in out.stdout
    folder = tmp_path / "batch"
    folder.mkdir()
    xs = np.load(digits_dir / "eval_nchw.npz")["x"][:6].astype(np.float32)
    for i in range(3):
        np.save(folder / f"in{i}.npy", xs[2 * i : 2 * i + 2])
    (folder / "broken.npy").write_bytes(b"not an npy")
    batch = agent_cli("batch", "--config", cfg, "--json", str(folder))
    doc = json.loads(batch.stdout)
    assert batch.returncode == 1 and doc["done"] == 3 and [f[0] for f in doc["failed"]] == ["broken.npy"]
    assert np.load(folder / "in1.out.npy").shape == (2, 10)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('device_id = "d"\n', "missing required key 'trusted_keys'"),
        ('device_id = "a/b"\nfleet = "f"\nprofile = "p"\ndata_dir = "d"\ntrusted_keys = ["k"]\n', "device_id"),
        (
            'device_id = "d"\nfleet = "f"\nprofile = "p"\ndata_dir = "d"\ntrusted_keys = ["k"]\ntelemtry = 1\n',
            "unknown key",
        ),
        ("device_id = [", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, toml: str, message: str) -> None:
    (cfg := tmp_path / "agent.toml").write_text(toml)
    out = agent_cli("status", "--config", str(cfg))
    assert out.returncode == 1 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
