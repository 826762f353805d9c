"""The fleet simulator against a real mosquitto: N real agents, each with its own MQTT session and data dir,
seen by an ordinary subscriber as N devices (retained birth state, telemetry, clean offline state at stop)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from device_agent.sim import FleetSim, main
from tests.support.mosquitto import MosquittoBroker
from tests.support.subscriber import Collector

FLEET = "simfleet"
N = 5


def _retained(collector: Collector, suffix: str) -> dict[str, dict[str, Any]]:
    """The last retained message on each ``.../<device>/<suffix>`` topic, by device id."""
    return {t.split("/")[-2]: json.loads(p) for t, p, retained in collector.messages if retained and t.endswith(suffix)}


def _from(device: str, **want: object) -> Callable[[dict[str, Any]], bool]:
    """A predicate: the message comes from ``device`` and has the ``want`` values."""
    return lambda d: d.get("device") == device and all(d.get(k) == v for k, v in want.items())


def test_five_agents_report_as_five_devices(
    mosquitto: MosquittoBroker, artifacts: dict[str, Path], keys_dir: Path, tmp_path: Path
) -> None:
    live = Collector(mosquitto.host, mosquitto.port, [f"edgeops/v1/{FLEET}/device/+/#"], client_id="sim-live")
    sim = FleetSim(
        tmp_path / "fleet", n=N, fleet=FLEET, profile="x86-gateway", broker_url=mosquitto.url,
        trusted_keys=[keys_dir / "signing.pub"], groups=lambda i: ["even" if i % 2 == 0 else "odd"],
        initial_artifact=artifacts["v1"], telemetry_interval_s=0.5,
    )
    ids = [d.device_id for d in sim.devices]
    try:
        sim.start()
        assert len(sim.agents) == N and len(set(ids)) == N
        assert len({a.cfg.data_dir for a in sim.agents}) == N  # one data dir (slots, spool) per device
        assert all((d.data_dir / "slots" / "state.json").is_file() for d in sim.devices)
        for device in ids:
            live.wait_for("/telemetry", _from(device, model_version="1.0.0"))
        assert sim.wait_connected(10) and sim.connected_count() == N
        late = Collector(mosquitto.host, mosquitto.port, [f"edgeops/v1/{FLEET}/device/+/state"], client_id="sim-late")
        try:
            late.wait_for("/state", lambda d: len(_retained(late, "/state")) == N)
            states = _retained(late, "/state")  # what a dashboard starting now would see
        finally:
            late.close()
        assert sorted(states) == ids
        assert all(s["online"] is True and s["models"]["active"]["version"] == "1.0.0" for s in states.values())
        assert {tuple(s["groups"]) for s in states.values()} == {("even",), ("odd",)}
    finally:
        sim.stop()
    assert sim.agents == []
    for device in ids:
        live.wait_for("/state", _from(device, online=False))
    after = Collector(mosquitto.host, mosquitto.port, [f"edgeops/v1/{FLEET}/device/+/state"], client_id="sim-after")
    try:
        after.wait_for("/state", lambda d: len(_retained(after, "/state")) == N)
        final = _retained(after, "/state")
    finally:
        after.close()
        live.close()
    assert sorted(final) == ids
    assert all(s["online"] is False and s["reason"] == "shutdown" for s in final.values())


def test_command_line_runs_for_its_duration_and_summarises(
    mosquitto: MosquittoBroker, artifacts: dict[str, Path], keys_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(["--n", "2", "--broker", mosquitto.url, "--fleet", FLEET, "--profile", "x86-gateway",
               "--pubkey", str(keys_dir / "signing.pub"), "--artifact", str(artifacts["v1"]),
               "--root", str(tmp_path / "cli"), "--duration", "1.5", "--id-prefix", "cli"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[-1].startswith("sim: 2 agents started, 2 connected, spool pending ")
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["cli-0000", "cli-0001"]
