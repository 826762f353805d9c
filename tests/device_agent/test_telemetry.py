"""The telemetry core: latency percentiles, PSI drift against quantile-edged references, resource probes.

Sans-I/O: no socket; ResourceProbe reads fake /proc and /sys folders, and this machine's once.
"""

from __future__ import annotations

import math
import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.validate import histogram  # the reference the build signs into a manifest's drift section
from device_agent.telemetry import DriftMonitor, LatencyWindow, ResourceProbe, psi

# --- latency ---------------------------------------------------------------------------------------------------


def test_latency_percentiles_match_numpy_and_reset() -> None:
    data = np.random.default_rng(0).gamma(2.0, 3.0, size=1000)
    window = LatencyWindow()
    for ms in data:
        window.add(float(ms))
    snap = window.snapshot_and_reset()
    assert snap["count"] == 1000
    for key, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        assert snap[key] == pytest.approx(float(np.percentile(data, q)), rel=1e-12)
    assert snap["max"] == pytest.approx(float(data.max()))
    assert window.snapshot_and_reset() == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}


def test_latency_reservoir_is_bounded_but_counts_everything() -> None:
    window = LatencyWindow(capacity=256, rng=random.Random(1))
    values = np.random.default_rng(1).uniform(0, 100, size=50_000)
    for ms in values:
        window.add(float(ms))
    assert len(window._samples) == 256  # memory stays bounded whatever the request rate
    snap = window.snapshot_and_reset()
    assert snap["count"] == 50_000
    assert snap["max"] == pytest.approx(float(values.max()))  # exact, not sampled
    assert snap["p50"] == pytest.approx(50, abs=10)  # a uniform sample of the interval
    assert snap["p95"] == pytest.approx(95, abs=5)


def test_latency_window_counts_every_add_from_many_threads() -> None:
    window = LatencyWindow(capacity=64)

    def worker() -> None:
        for i in range(5000):
            window.add(float(i % 17))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = window.snapshot_and_reset()
    assert snap["count"] == 40_000
    assert snap["max"] == 16.0


# --- PSI -------------------------------------------------------------------------------------------------------


def test_psi_formula_and_clipping() -> None:
    assert psi([0.25, 0.25, 0.5], [25, 25, 50]) == pytest.approx(0.0, abs=1e-12)
    want = (0.5 - 0.25) * math.log(0.5 / 0.25) + (0.5 - 0.75) * math.log(0.5 / 0.75)
    assert psi([0.25, 0.75], [10, 10]) == pytest.approx(want)
    # an empty observed bin is clipped to eps, so the index stays finite (and large)
    assert math.isfinite(psi([0.5, 0.5], [100, 0])) and psi([0.5, 0.5], [100, 0]) > 2
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1, 2, 3])
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [0, 0])


def _reference(rng: np.random.Generator) -> dict[str, object]:
    return {
        "inputs": {"image": histogram(rng.normal(0.0, 1.0, size=20_000), 10)},
        "outputs": {"probs": histogram(rng.uniform(0.0, 1.0, size=20_000), 10)},
    }


def test_drift_is_ok_on_the_reference_distribution_and_alerts_on_a_shift() -> None:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(_reference(rng), min_samples=200)
    assert monitor.enabled
    monitor.observe("inputs", "image", rng.normal(0.0, 1.0, size=(50, 1, 8, 8)))  # 3200 values, any shape
    monitor.observe("outputs", "probs", rng.uniform(0.0, 1.0, size=(400, 10)))
    snap = monitor.snapshot_and_reset()
    assert snap["inputs"]["image"]["samples"] == 3200
    assert snap["inputs"]["image"]["psi"] < 0.02
    assert snap["inputs"]["image"]["level"] == "ok"
    assert snap["outputs"]["probs"]["level"] == "ok"
    assert snap["level"] == "ok"

    monitor.observe("inputs", "image", rng.normal(1.0, 1.0, size=5000))  # the sensor drifted by one sigma
    monitor.observe("outputs", "probs", rng.uniform(0.0, 1.0, size=5000))
    snap = monitor.snapshot_and_reset()
    assert snap["inputs"]["image"]["psi"] > 0.25
    assert snap["inputs"]["image"]["level"] == "alert"
    assert snap["outputs"]["probs"]["level"] == "ok"
    assert snap["level"] == "alert"  # the worst of all monitored tensors


def test_drift_warn_level_between_thresholds() -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor({"inputs": {"x": histogram(rng.normal(0, 1, 20_000), 10)}}, warn=0.1, alert=0.25)
    monitor.observe("inputs", "x", rng.normal(0.4, 1.0, size=20_000))
    entry = monitor.snapshot_and_reset()["inputs"]["x"]
    assert 0.1 <= entry["psi"] < 0.25
    assert entry["level"] == "warn"


def test_drift_needs_min_samples_and_resets_each_interval() -> None:
    rng = np.random.default_rng(4)
    monitor = DriftMonitor(_reference(rng), min_samples=200)
    monitor.observe("inputs", "image", rng.normal(5.0, 1.0, size=150))  # shifted, but too few to judge
    snap = monitor.snapshot_and_reset()
    assert snap["inputs"]["image"] == {"psi": None, "level": "insufficient", "samples": 150}
    assert snap["outputs"]["probs"] == {"psi": None, "level": "insufficient", "samples": 0}
    assert snap["level"] == "insufficient"
    monitor.observe("inputs", "image", rng.normal(5.0, 1.0, size=150))  # the previous 150 were reset
    assert monitor.snapshot_and_reset()["inputs"]["image"]["samples"] == 150


def test_values_outside_the_reference_edges_count_in_the_end_bins() -> None:
    monitor = DriftMonitor({"inputs": {"x": {"edges": [0.0, 1.0, 2.0], "fractions": [0.5, 0.5]}}}, min_samples=1)
    monitor.observe("inputs", "x", np.full(300, 100.0))
    monitor.observe("inputs", "x", np.full(100, -100.0))
    entry = monitor.snapshot_and_reset()["inputs"]["x"]
    assert entry["samples"] == 400
    assert entry["psi"] == pytest.approx(psi([0.5, 0.5], [100, 300]), abs=1e-6)


def test_large_arrays_are_subsampled() -> None:
    rng = np.random.default_rng(5)
    monitor = DriftMonitor({"outputs": {"y": histogram(rng.normal(0, 1, 20_000), 10)}})
    monitor.observe("outputs", "y", rng.normal(0, 1, size=1_000_000))
    entry = monitor.snapshot_and_reset()["outputs"]["y"]
    assert 50_000 <= entry["samples"] <= 100_000
    assert entry["level"] == "ok"


def test_malformed_reference_entries_are_skipped_not_raised() -> None:
    reference = {
        "inputs": {
            "good": {"edges": [0.0, 1.0, 2.0], "fractions": [0.5, 0.5]},
            "not_increasing": {"edges": [0.0, 2.0, 1.0], "fractions": [0.5, 0.5]},
            "wrong_length": {"edges": [0.0, 1.0], "fractions": [0.5, 0.5]},
            "text": {"edges": ["a", "b"], "fractions": [1.0]},
            "missing": {"edges": [0.0, 1.0]},
            "negative": {"edges": [0.0, 1.0, 2.0], "fractions": [1.5, -0.5]},
            "not_an_object": [1, 2, 3],
        },
        "outputs": "garbage",
    }
    monitor = DriftMonitor(reference, min_samples=1)
    monitor.observe("inputs", "good", np.array([0.5, 1.5]))
    monitor.observe("inputs", "text", np.array([0.5]))  # not monitored: ignored
    monitor.observe("inputs", "unknown", np.array([0.5]))
    snap = monitor.snapshot_and_reset()
    assert list(snap["inputs"]) == ["good"]
    assert snap["outputs"] == {}
    assert snap["inputs"]["good"]["psi"] == pytest.approx(0.0, abs=1e-9)


def test_empty_reference_means_no_monitoring() -> None:
    references: list[dict[str, Any]] = [{}, {"inputs": {}, "outputs": {}}]
    for reference in references:
        monitor = DriftMonitor(reference)
        assert not monitor.enabled
        monitor.observe("inputs", "x", np.ones(1000))
        assert monitor.snapshot_and_reset() == {"inputs": {}, "outputs": {}, "level": "insufficient"}
    with pytest.raises(ValueError):
        DriftMonitor({}).observe("input", "x", np.ones(3))


def test_drift_monitor_counts_observations_from_many_threads() -> None:
    monitor = DriftMonitor({"inputs": {"x": {"edges": [0.0, 1.0, 2.0], "fractions": [0.5, 0.5]}}})

    def worker() -> None:
        for _ in range(200):
            monitor.observe("inputs", "x", np.array([0.5, 1.5, 0.25, 1.75]))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entry = monitor.snapshot_and_reset()["inputs"]["x"]
    assert entry["samples"] == 8 * 200 * 4
    assert entry["psi"] == pytest.approx(0.0, abs=1e-9)


# --- resources -------------------------------------------------------------------------------------------------


def _fake_roots(tmp_path: Path) -> tuple[Path, Path]:
    thermal, proc = tmp_path / "thermal", tmp_path / "proc"
    for zone, text in (("thermal_zone0", "45000\n"), ("thermal_zone1", "61500\n"), ("thermal_zone2", "n/a\n")):
        (thermal / zone).mkdir(parents=True)
        (thermal / zone / "temp").write_text(text)
    (thermal / "cooling_device0").mkdir()
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "statm").write_text("12000 2560 300 10 0 900 0\n")
    return thermal, proc


def test_resource_probe_reads_fake_sys_and_proc(tmp_path: Path) -> None:
    thermal, proc = _fake_roots(tmp_path)
    ticks = iter([100.0, 102.0, 103.0])
    cpu = iter([5.0, 6.0, 6.0])
    probe = ResourceProbe(thermal, proc, clock=lambda: next(ticks), cpu_time=lambda: next(cpu))
    first = probe.sample()
    assert first["cpu_percent"] == pytest.approx(50.0)  # 1 s of CPU over 2 s of wall time
    assert first["temperature_c"] == pytest.approx(61.5)  # the hottest readable zone
    assert first["rss_mb"] == pytest.approx(2560 * os.sysconf("SC_PAGE_SIZE") / 2**20, abs=0.01)
    assert probe.sample()["cpu_percent"] == pytest.approx(0.0)  # idle since the previous sample


def test_resource_probe_without_sensors(tmp_path: Path) -> None:
    probe = ResourceProbe(tmp_path / "no-thermal", tmp_path / "no-proc")
    sample = probe.sample()
    assert sample["temperature_c"] is None
    assert sample["rss_mb"] is not None and sample["rss_mb"] > 0  # getrusage fallback


def test_resource_probe_on_this_machine() -> None:
    probe = ResourceProbe()
    _ = np.ones(1_000_000).sum()
    sample = probe.sample()
    assert sample["rss_mb"] is not None and sample["rss_mb"] > 10  # numpy alone is more than 10 MB
    assert sample["cpu_percent"] is not None and sample["cpu_percent"] >= 0
    assert sample["load1"] is not None and sample["load1"] >= 0
