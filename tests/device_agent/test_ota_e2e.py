"""The OTA must-show, end to end with real parts: a real ``edgeops-agent run`` daemon on v1 (LiteRT, rpi4), a v2
built from a fine-tuned digits model, published as a delta through a real mosquitto by the release server; the
agent is killed (SIGKILL, at a named fault point) during the download and once after the apply, restarts,
resumes without fetching again what it holds, and ends on v2 with the health gate passed; a v3 that fails its
gate leaves the device on v2 with an event that says why."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeops.protocol import parse_broker_url
from edgeops.release_builder import build_release
from edgeops.release_server import ReleaseServer
from edgeops.signing import load_private_key
from tests.support.artifacts import ROOT, build_digits, repack
from tests.support.mosquitto import MosquittoBroker
from tests.support.subscriber import Collector

pytestmark = pytest.mark.slow

PROFILE = "rpi4"
EVENTS = "edgeops/v1/testfleet/device/dev-1/event"
STATE = "edgeops/v1/testfleet/device/dev-1/state"
CHUNK = 1024  # small chunks so the digits delta spans many of them


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path, keys_dir: Path) -> dict[str, Path]:
    """v1 (the digits model), v2 (a full fine-tune of it, built the same way), v3 (v2 with wrong golden outputs)."""
    out = tmp_path_factory.mktemp("ota-artifacts")
    key = keys_dir / "signing.key"
    tuned = out / "tuned"
    subprocess.run(
        [sys.executable, str(ROOT / "examples/digits/fine_tune.py"), "--base", str(digits_dir), "--out", str(tuned)],
        check=True,
        capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    v1 = build_digits(digits_dir, out / "v1", key, "1.0.0", profiles=(PROFILE,))[PROFILE]
    v2 = build_digits(tuned, out / "v2", key, "2.0.0", profiles=(PROFILE,))[PROFILE]

    def wrong_golden(files: dict[str, bytes]) -> None:
        arr = np.load(io.BytesIO(files["golden/output_0.npy"]))
        buf = io.BytesIO()
        np.save(buf, np.roll(arr, 1, axis=-1))
        files["golden/output_0.npy"] = buf.getvalue()

    def v3_version(doc: dict) -> None:
        doc["version"] = "3.0.0"

    v3 = repack(v2, out / "digits-3.0.0-rpi4.edgeops", key, files=wrong_golden, manifest=v3_version)
    return {"v1": v1, "v2": v2, "v3": v3}


def _agent(cfg: Path, fault: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ}
    env.pop("EDGEOPS_FAULT_POINT", None)
    if fault:
        env["EDGEOPS_FAULT_POINT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _deploy(release_id: str, mosquitto: MosquittoBroker, keys_dir: Path) -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "edgeops.cli.main", "deploy", "--release", release_id, "--device", "dev-1"),
            *("--fleet", "testfleet", "--key", str(keys_dir / "signing.key"), "--broker", mosquitto.url),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def _wait_exit(proc: subprocess.Popen[str], timeout: float = 90) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"agent did not stop: {proc.communicate()[1][-2000:]}") from None


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_delta_ota_survives_kills_and_a_failing_release_keeps_v2(
    releases: dict[str, Path],
    mosquitto: MosquittoBroker,
    keys_dir: Path,
    write_config: Callable[..., Path],
    tmp_path: Path,
    agents: list[subprocess.Popen[str]],
) -> None:
    key = load_private_key(keys_dir / "signing.key")
    store = tmp_path / "releases"
    rel2 = build_release(releases["v2"], [releases["v1"]], fleet="testfleet", key=key, store=store, chunk_size=CHUNK)
    delta = next(p for p in rel2.meta.payloads if p.kind.value == "delta")
    assert delta.size < rel2.meta.target_size / 2, "the fine-tune's delta should be far smaller than the artifact"
    assert delta.chunk_count > 40
    server = ReleaseServer(parse_broker_url(mosquitto.url), "testfleet", [rel2], client_id="publisher")
    server.start()
    events = Collector(mosquitto.host, mosquitto.port, [EVENTS], client_id="events")
    state_topic = Collector(mosquitto.host, mosquitto.port, [STATE], client_id="state")
    cfg = write_config(
        profile=PROFILE,
        initial_artifact=str(releases["v1"]),
        broker={"url": mosquitto.url},
        ota={"repair_idle_s": 0.5, "repair_min_interval_s": 0.5},
    )
    data = tmp_path / "data"
    try:
        # 1. v1 serving; the download starts and the agent dies (SIGKILL) after the 20th chunk it stored.
        agents.append(_agent(cfg, fault="ota.chunk.stored@20"))
        events.wait_for("/event", lambda d: d["type"] == "agent.started", timeout=60)
        _deploy(rel2.meta.release_id, mosquitto, keys_dir)
        started = events.wait_for("/event", lambda d: d["type"] == "ota.started", timeout=30)
        assert started["payload"] == "delta" and started["base_version"] == "1.0.0"
        assert _wait_exit(agents[-1]) == -9
        bitmap = (data / "ota" / rel2.meta.release_id / "have.bitmap").read_bytes()
        assert 20 <= sum(bitmap) < delta.chunk_count, "the partial download and its flags are on disk"

        # 2. restart: resumes (the broker kept what was broadcast meanwhile), completes, applies, dies before install.
        agents.append(_agent(cfg, fault="ota.applied"))
        assert _wait_exit(agents[-1]) == -9

        # 3. restart: the complete download is applied again and installed through the health gate.
        agents.append(_agent(cfg))
        done = events.wait_for(
            "/event", lambda d: d["type"] == "install.succeeded" and d["version"] == "2.0.0", timeout=90
        )
        assert done["previous"] == "1.0.0" and done["gate"]["passed"] is True and done["source"].startswith("ota:")
        events.wait_for("/event", lambda d: d["type"] == "ota.completed" and d["version"] == "2.0.0")
        # Spooled events are all delivered by now, at least once (a kill before the PUBACK means a re-send): by seq.
        starts = list({e["seq"]: e for e in events.json("/event") if e["type"] == "ota.started"}.values())
        assert [e["resumed"] for e in starts] == [False, True, True], [(e["held"], e["seq"]) for e in starts]
        assert starts[1]["held"] >= 20 and starts[2]["held"] == delta.chunk_count
        stats = server.stats()
        assert stats["resends"] <= 2, f"at most one chunk re-sent per interruption: {stats}"
        assert not (data / "ota" / rel2.meta.release_id).exists(), "the finished download is cleaned up"

        # 4. v3 fails its health gate: the device stays on v2 and says why.
        rel3 = build_release(
            releases["v3"], [releases["v2"]], fleet="testfleet", key=key, store=store, chunk_size=CHUNK
        )
        server.add_release(rel3)
        _deploy(rel3.meta.release_id, mosquitto, keys_dir)
        failed = events.wait_for("/event", lambda d: d["type"] == "ota.failed", timeout=90)
        assert failed["reason"] == "install-failed" and failed["check"] == "golden"
        rejected = events.wait_for("/event", lambda d: d["type"] == "install.rejected" and d.get("version") == "3.0.0")
        assert rejected["check"] == "golden"
        state = state_topic.wait_for("/state", lambda d: d.get("ts", 0) > failed["ts"] and d.get("online"))
        assert state["models"]["active"]["version"] == "2.0.0" and state["ota"] is None
    finally:
        events.close()
        state_topic.close()
        server.stop()
