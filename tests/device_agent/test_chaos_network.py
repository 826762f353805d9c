"""Network chaos against the real agent: OTA through a lossy, cut and restarted network, and a day offline.

Each test drives one scenario of benchmarks/chaos/network.py (the harness the reliability benchmark runs too):
a real mosquitto, the loss-injecting proxy of tests/support/mqtt_proxy.py between the agent and the broker, the
real ReleaseServer, and a real in-process Agent on the digits v1 artifact updating to v1.1 (the full artifact
in dozens of 4 KiB chunks). What a user would notice: the device ends on the new version with exactly the
signed bytes, the faults really happened (the proxy's counters), corrupt chunks were refused (the agent's
``ota.completed`` stats), and after a day offline the fleet receives every message the spool kept, once, in
order, with inference answering throughout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.chaos.network import Setup, run_offline_day, run_ota


@pytest.fixture
def setup(artifacts: dict[str, Path], keys_dir: Path, tmp_path: Path) -> Setup:
    return Setup(work=tmp_path, base=artifacts["v1"], target=artifacts["v1.1"], keys_dir=keys_dir)


def test_ota_converges_through_dropped_duplicated_reordered_and_corrupt_chunks(setup: Setup) -> None:
    run = run_ota(setup, "ota-faults", seed=1)
    assert run.converged, run.detail
    assert not run.corrupted_install, "the active slot must hold exactly the signed target bytes"
    assert run.chunks >= 24, "a multi-chunk payload"
    p = run.proxy
    for fault in ("dropped", "duplicated", "reordered", "corrupted"):
        assert p[fault] >= 1, f"the proxy never {fault} a chunk: {p}"
    assert p["acks_injected"] == p["dropped"], "every dropped chunk was acknowledged upstream (end-to-end loss)"
    assert p["acks_swallowed"] == p["duplicated"], "the broker saw one PUBACK per chunk it sent"
    assert p["corrupted"] == run.forged + run.flipped
    # the forged chunks parse and reach the signed-hash check, which refuses them and counts them
    assert run.forged >= 1 and 1 <= run.agent_corrupt <= run.forged, run
    assert run.server["resends"] >= 1 and run.server["requests"] >= 2, "lost chunks were asked for again, re-sent"
    assert run.server["rejected"] == {}
    assert "ota.completed" in run.mqtt_events, "the operator sees the outcome on the event topic"
    assert "ota.failed" not in run.events and "install.rejected" not in run.events


@pytest.mark.parametrize("persistence", [False, True], ids=["broker-forgets", "broker-persists"])
def test_broker_restart_in_the_middle_of_a_transfer(setup: Setup, persistence: bool) -> None:
    scenario = "broker-restart-persistent" if persistence else "broker-restart"
    run = run_ota(setup, scenario, seed=2)
    assert run.converged, run.detail
    assert not run.corrupted_install
    assert len(run.held_at_fault) == 1 and 0 < run.held_at_fault[0] < run.chunks, "restarted mid-transfer"
    assert run.server["connects"] == 2 and run.proxy["connections"] >= 2, "both sides reconnected"
    if not persistence:  # the broker forgot the session and its queue: the device asked again for what it lacked
        assert run.server["requests"] >= 2 and run.server["resends"] >= 1, run.server
    assert "ota.completed" in run.mqtt_events


def test_repeated_connection_cuts_during_a_transfer(setup: Setup) -> None:
    run = run_ota(setup, "cuts", seed=3)
    assert run.converged, run.detail
    assert not run.corrupted_install
    assert run.proxy["cuts"] == 5 and run.proxy["connections"] >= 6, run.proxy
    held = run.held_at_fault
    assert len(held) == 5 and held == sorted(held) and held[0] > 0 and held[-1] < run.chunks, held
    assert "ota.completed" in run.mqtt_events


@pytest.mark.slow
def test_a_day_offline_keeps_inference_and_delivers_the_spool_once_in_order(setup: Setup) -> None:
    """8,640 telemetry messages (a day at 10 s) with the network down and a 5,000-message spool."""
    run = run_offline_day(setup, seed=4, messages=8640, interval_s=0.001, bound=5000)
    assert run.telemetry_offline >= 8640
    assert run.infer_ok > 0 and run.infer_failed == 0, "inference answered throughout (in process and HTTP)"
    assert run.max_pending <= run.bound, "the spool never held more than its bound"
    assert run.dropped >= run.spooled_offline - run.bound > 0, "the oldest beyond the bound were dropped, counted"
    # nothing is missing beyond what the spool counted as dropped (the oldest pending each time it was full; while
    # it drains after the reconnect with telemetry still arriving, that can be a second run of old messages)
    assert run.lost == 0, "only messages the spool reported as dropped are missing"
    # at-least-once: a batch whose PUBACKs time out (10 s, a loaded machine) is sent again; seq identifies a re-send
    assert run.out_of_order == 0 and run.duplicated <= 64, "every kept message delivered in order, re-sends bounded"
    assert run.delivered >= run.bound
