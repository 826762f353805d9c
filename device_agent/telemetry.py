"""Telemetry core: latency percentiles, PSI drift against the manifest's reference histograms, resource probes.

Guarantees:

- :class:`LatencyWindow` and :class:`DriftMonitor` are thread-safe (the API threads record, the telemetry loop
  snapshots) and bounded in memory whatever the request rate: a latency window keeps at most ``capacity``
  samples per interval (reservoir sampling) while counting every request; a drift monitor keeps one counter
  per reference bin.
- A snapshot resets the interval, so each telemetry message describes one interval only.
- A malformed drift reference (from a manifest) is skipped and logged, never raised: a model without usable
  histograms is served without drift monitoring.

Not done here: publishing (the agent puts snapshots on the spool), alert decisions beyond the level names,
and any clock or thread of its own. :class:`ResourceProbe` is the one piece that reads files (/proc, /sys).
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DriftLevel", "DriftMonitor", "LatencyWindow", "ResourceProbe", "bin_counts", "psi"]

log = logging.getLogger(__name__)

MAX_DRIFT_VALUES = 100_000  # values binned per observe() call; larger arrays are subsampled with a stride
_KINDS = ("inputs", "outputs")


class DriftLevel(str, Enum):
    """A drift verdict as it goes on the wire (telemetry and drift events)."""

    INSUFFICIENT = "insufficient"  # fewer than min_samples values in the interval: no verdict
    OK = "ok"
    WARN = "warn"
    ALERT = "alert"

    def __str__(self) -> str:
        return self.value


_RANK = {DriftLevel.INSUFFICIENT: 0, DriftLevel.OK: 1, DriftLevel.WARN: 2, DriftLevel.ALERT: 3}


class LatencyWindow:
    """Latencies (ms) of one telemetry interval: exact count and max, percentiles from a bounded reservoir."""

    def __init__(self, capacity: int = 4096, *, rng: random.Random | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._samples: list[float] = []
        self._count = 0
        self._max = -math.inf

    def add(self, ms: float) -> None:
        """Record one latency in milliseconds (Algorithm R keeps a uniform sample of the interval)."""
        value = float(ms)
        with self._lock:
            self._count += 1
            self._max = max(self._max, value)
            if len(self._samples) < self._capacity:
                self._samples.append(value)
            else:
                j = self._rng.randrange(self._count)
                if j < self._capacity:
                    self._samples[j] = value

    def snapshot_and_reset(self) -> dict[str, Any]:
        """``{"count", "p50", "p95", "p99", "max"}`` of the interval (ms; None when empty) and start a new one."""
        with self._lock:
            samples, count, peak = self._samples, self._count, self._max
            self._samples, self._count, self._max = [], 0, -math.inf
        if not samples:
            return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
        p50, p95, p99 = np.percentile(np.asarray(samples, dtype=np.float64), [50, 95, 99])
        return {"count": count, "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(peak)}


def psi(expected: Sequence[float] | np.ndarray, actual_counts: Sequence[int] | np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of observed bin counts against reference bin fractions.

    ``sum((a - e) * ln(a / e))`` with both fractions clipped below at ``eps`` so an empty bin stays finite.
    Raises ValueError when the lengths differ, nothing was counted, or a count is negative.
    """
    e = np.asarray(expected, dtype=np.float64)
    counts = np.asarray(actual_counts, dtype=np.float64)
    if e.shape != counts.shape or e.ndim != 1:
        raise ValueError(f"{counts.size} counts for {e.size} reference bins")
    total = counts.sum()
    if total <= 0 or np.any(counts < 0):
        raise ValueError("psi needs non-negative counts with a positive total")
    a = np.clip(counts / total, eps, None)
    e = np.clip(e, eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def bin_counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins ``edges`` delimits (like np.histogram); outside values go to the end bins.

    NaN values are not counted. ``edges`` must be strictly increasing with at least two entries.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    flat = flat[~np.isnan(flat)]
    idx = np.searchsorted(edges[1:-1], flat, side="right")
    return np.bincount(idx, minlength=edges.size - 1)


class _Histogram:
    """One reference histogram and the counts observed against it in the current interval."""

    def __init__(self, edges: np.ndarray, fractions: np.ndarray) -> None:
        self.edges = edges
        self.fractions = fractions
        self.counts = np.zeros(fractions.size, dtype=np.int64)


def _parse_reference(key: str, entry: Any) -> _Histogram | None:
    """A reference histogram from a manifest entry, or None (logged) when it is malformed."""
    if not isinstance(entry, Mapping):
        log.warning("drift reference %s is not an object; not monitored", key)
        return None
    try:
        edges = np.asarray(entry.get("edges"), dtype=np.float64)
        fractions = np.asarray(entry.get("fractions"), dtype=np.float64)
    except (TypeError, ValueError):
        log.warning("drift reference %s has non-numeric edges or fractions; not monitored", key)
        return None
    ok = (
        edges.ndim == 1
        and fractions.ndim == 1
        and edges.size >= 2
        and fractions.size == edges.size - 1
        and bool(np.all(np.isfinite(edges)))
        and bool(np.all(np.diff(edges) > 0))
        and bool(np.all(np.isfinite(fractions)))
        and bool(np.all(fractions >= 0))
        and float(fractions.sum()) > 0
    )
    if not ok:
        log.warning("drift reference %s is malformed (edges/fractions); not monitored", key)
        return None
    return _Histogram(edges, fractions / fractions.sum())


class DriftMonitor:
    """Counts served inputs/outputs into the manifest's reference bins and scores each interval with PSI.

    ``reference`` is a manifest's ``drift`` section, ``{"inputs": {name: {"edges", "fractions"}}, "outputs":
    {...}}``; an empty or missing section means no monitoring (:attr:`enabled` is False).
    """

    def __init__(
        self, reference: Mapping[str, Any], *, warn: float = 0.1, alert: float = 0.25, min_samples: int = 200
    ) -> None:
        self.warn, self.alert, self.min_samples = warn, alert, min_samples
        self._lock = threading.Lock()
        self._hists: dict[str, dict[str, _Histogram]] = {kind: {} for kind in _KINDS}
        ref = reference if isinstance(reference, Mapping) else {}
        for kind in _KINDS:
            section = ref.get(kind) or {}
            if not isinstance(section, Mapping):
                log.warning("drift reference %s is not an object; not monitored", kind)
                continue
            for name, entry in section.items():
                hist = _parse_reference(f"{kind}/{name}", entry)
                if hist is not None:
                    self._hists[kind][str(name)] = hist

    @property
    def enabled(self) -> bool:
        """Whether at least one usable reference histogram was given."""
        return any(self._hists[kind] for kind in _KINDS)

    def observe(self, kind: str, name: str, values: np.ndarray) -> None:
        """Count ``values`` (any shape) for input/output ``name``; names without a reference are ignored.

        ``kind`` is "inputs" or "outputs" (ValueError otherwise). Values that are not numeric are logged and
        skipped: observing never fails a request.
        """
        if kind not in _KINDS:
            raise ValueError(f"drift kind must be 'inputs' or 'outputs', not {kind!r}")
        hist = self._hists[kind].get(name)
        if hist is None:
            return
        try:
            flat = np.asarray(values).reshape(-1)
            if flat.size > MAX_DRIFT_VALUES:
                flat = flat[:: flat.size // MAX_DRIFT_VALUES + 1]
            counts = bin_counts(hist.edges, flat)
        except (TypeError, ValueError) as exc:
            log.warning("drift: cannot bin %s/%s: %s", kind, name, exc)
            return
        with self._lock:
            hist.counts += counts

    def snapshot_and_reset(self) -> dict[str, Any]:
        """Scores of the interval, then zero the counts.

        ``{"inputs": {name: {"psi", "level", "samples"}}, "outputs": {...}, "level": worst}``: a histogram with
        fewer than ``min_samples`` values has level "insufficient" and psi None; the overall level is the worst
        of ok < warn < alert, or "insufficient" when no histogram had enough values (or none is monitored).
        """
        with self._lock:
            taken = {kind: {n: h.counts.copy() for n, h in hists.items()} for kind, hists in self._hists.items()}
            for hists in self._hists.values():
                for h in hists.values():
                    h.counts[:] = 0
        out: dict[str, Any] = {}
        worst = DriftLevel.INSUFFICIENT
        for kind in _KINDS:
            out[kind] = {}
            for name, counts in taken[kind].items():
                entry = self._score(self._hists[kind][name].fractions, counts)
                out[kind][name] = entry
                level = DriftLevel(entry["level"])
                worst = level if _RANK[level] > _RANK[worst] else worst
        out["level"] = worst.value
        return out

    def _score(self, fractions: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
        samples = int(counts.sum())
        if samples < max(self.min_samples, 1):
            return {"psi": None, "level": DriftLevel.INSUFFICIENT.value, "samples": samples}
        value = psi(fractions, counts)
        level = DriftLevel.ALERT if value >= self.alert else DriftLevel.WARN if value >= self.warn else DriftLevel.OK
        return {"psi": round(value, 6), "level": level.value, "samples": samples}


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ResourceProbe:
    """CPU, memory, temperature and load of this process/device, read from /proc and /sys on each sample.

    Every figure is None when the platform does not provide it; sampling never raises.
    """

    def __init__(
        self,
        thermal_root: Path = Path("/sys/class/thermal"),
        proc_root: Path = Path("/proc"),
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_time: Callable[[], float] = _process_cpu_s,
    ) -> None:
        self._thermal_root = thermal_root
        self._proc_root = proc_root
        self._clock = clock
        self._cpu_time = cpu_time
        self._last = (clock(), cpu_time())

    def sample(self) -> dict[str, float | None]:
        """``{"cpu_percent", "rss_mb", "temperature_c", "load1"}``; cpu_percent covers the time since the
        previous sample (or since construction) and may exceed 100 on several cores."""
        now, cpu = self._clock(), self._cpu_time()
        wall = now - self._last[0]
        cpu_percent = round((cpu - self._last[1]) / wall * 100.0, 2) if wall > 0 else None
        self._last = (now, cpu)
        return {
            "cpu_percent": cpu_percent,
            "rss_mb": self._rss_mb(),
            "temperature_c": self._temperature_c(),
            "load1": self._load1(),
        }

    def _rss_mb(self) -> float | None:
        try:
            fields = (self._proc_root / "self" / "statm").read_text().split()
            return round(int(fields[1]) * _page_size() / 2**20, 2)
        except (OSError, ValueError, IndexError) as exc:
            log.debug("no %s/self/statm (%s): RSS from getrusage (peak)", self._proc_root, exc)
        try:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        except (OSError, ValueError):
            return None
        return round(maxrss / 1024, 2) if maxrss > 0 else None

    def _temperature_c(self) -> float | None:
        temps: list[float] = []
        try:
            zones = sorted(self._thermal_root.glob("thermal_zone*/temp"))
        except OSError:
            return None
        for zone in zones:
            try:
                temps.append(int(zone.read_text().strip()) / 1000.0)
            except (OSError, ValueError):
                continue  # a zone that cannot be read (sensor off, permission) is left out
        return round(max(temps), 2) if temps else None

    @staticmethod
    def _load1() -> float | None:
        try:
            return round(os.getloadavg()[0], 3)
        except (OSError, AttributeError):
            return None
