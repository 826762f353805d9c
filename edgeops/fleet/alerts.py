"""Per-row alert rules (sans-I/O): one telemetry row → alerts to open and alerts to close.

Three rules, each judged on one row (one telemetry interval of one device):

- **drift**: the agent's overall drift level ``warn`` / ``alert`` opens a DRIFT alert of that level; ``ok``
  closes it; ``insufficient`` or no drift section says nothing (too few values to judge).
- **error rate**: with at least ``min_requests`` requests in the interval, errors / requests above
  ``error_rate`` opens an ERROR_RATE alert (level alert); at or below it, closes it. Fewer requests say nothing.
- **latency**: with at least ``min_requests`` timed requests and a latency budget for the device's profile,
  a p95 above the budget opens a LATENCY alert (level warn); at or below it, closes it. No profile, no budget
  or too few samples say nothing (a p95 of three requests is noise).

Guarantees: :meth:`AlertRules.evaluate` never raises for a row that ``edgeops.fleet.ingest`` produced; it
returns at most one decision per alert kind. It does not know which alerts are open: the store skips an open
for a (device, kind) that is already open and a close for one that is not. OFFLINE alerts come from the
registry, not from here. The detail strings are for a human on the dashboard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeops.errors import ProfileError
from edgeops.fleet.model import Alert, AlertKind, AlertLevel, TelemetryRow

__all__ = ["AlertRules", "RecentCloses", "latency_budgets_from_profiles"]

log = logging.getLogger(__name__)

_DRIFT_LEVELS = {"warn": AlertLevel.WARN, "alert": AlertLevel.ALERT}

Close = tuple[str, AlertKind, float]
_Verdict = tuple[AlertLevel, str] | Literal[False] | None  # open (level, detail) / close / nothing to say


@dataclass(frozen=True)
class AlertRules:
    error_rate: float = 0.05  # fraction of the interval's requests that failed; above it: an alert
    min_requests: int = 20  # requests (and latency samples) an interval needs before it is judged
    latency_budgets_ms: Mapping[str, float] = field(default_factory=dict, hash=False)  # p95 budget by profile

    def __post_init__(self) -> None:
        if not (math.isfinite(self.error_rate) and 0.0 <= self.error_rate < 1.0):
            raise ValueError(f"error_rate must be within [0, 1), got {self.error_rate}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")
        for profile, budget in self.latency_budgets_ms.items():
            if not (math.isfinite(budget) and budget > 0):
                raise ValueError(f"latency budget of {profile!r} must be a finite number > 0, got {budget}")
        object.__setattr__(self, "latency_budgets_ms", dict(self.latency_budgets_ms))

    def evaluate(self, row: TelemetryRow, *, profile: str | None, now: float) -> tuple[list[Alert], list[Close]]:
        """(alerts to open, ``(device_id, kind, closed_at)`` to close) for one telemetry row at time ``now``."""
        opens: list[Alert] = []
        closes: list[Close] = []
        for kind, verdict in (
            (AlertKind.DRIFT, self._drift(row)),
            (AlertKind.ERROR_RATE, self._error_rate(row)),
            (AlertKind.LATENCY, self._latency(row, profile)),
        ):
            if verdict is None:
                continue
            if verdict is False:
                closes.append((row.device_id, kind, now))
            else:
                level, detail = verdict
                opens.append(Alert(row.device_id, kind, level, now, detail, version=row.model_version))
        return opens, closes

    # each rule: None = nothing to say, False = healthy (close), (level, detail) = open

    def _drift(self, row: TelemetryRow) -> _Verdict:
        if row.drift_level == "ok":
            return False
        level = _DRIFT_LEVELS.get(row.drift_level or "")
        if level is None:
            return None
        worst = _worst_tensor(row.raw.get("drift"))
        if worst is None:
            psi = f" psi {row.drift_psi_max:.2f}" if row.drift_psi_max is not None else ""
            return level, f"drift {level.value}:{psi}".rstrip(":")
        return level, f"drift {level.value}: {worst[0]} psi {worst[1]:.2f}"

    def _error_rate(self, row: TelemetryRow) -> _Verdict:
        if row.requests < self.min_requests:
            return None
        rate = row.errors / row.requests
        if rate <= self.error_rate:
            return False
        return AlertLevel.ALERT, f"error rate {rate * 100:.1f}% over {row.requests} requests"

    def _latency(self, row: TelemetryRow, profile: str | None) -> _Verdict:
        budget = self.latency_budgets_ms.get(profile) if profile is not None else None
        if budget is None or row.p95_ms is None or row.latency_count < self.min_requests:
            return None
        if row.p95_ms <= budget:
            return False
        return AlertLevel.WARN, f"p95 {row.p95_ms:.1f} ms > budget {budget:g} ms"


class RecentCloses:
    """Which ``(device, kind)`` closes were sent in the last ``ttl_s`` seconds, so that not every healthy row of
    every device asks the store to close three alerts that are not open (a third of the ingest's SQL otherwise).

    An open decision forgets its ``(device, kind)``, so the next healthy row closes it at once. An alert opened
    elsewhere (another worker on the shared subscription) is closed by the worker that opened it at its next
    healthy row of that device, or by any worker within ``ttl_s``. At most ``max_entries`` are kept (the memory
    starts over past it, which only costs repeated closes). Owned by one thread."""

    def __init__(self, ttl_s: float = 60.0, *, max_entries: int = 200_000) -> None:
        """Raises ValueError for a ttl_s < 0 (0 sends every close) or max_entries < 1."""
        if not (math.isfinite(ttl_s) and ttl_s >= 0) or max_entries < 1:
            raise ValueError("ttl_s must be a finite number >= 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._until: dict[tuple[str, AlertKind], float] = {}

    def needed(self, opens: Sequence[Alert], closes: Sequence[Close], now: float) -> list[Close]:
        """The ``closes`` worth sending at ``now`` (one rule evaluation's ``opens`` and ``closes``)."""
        for alert in opens:
            self._until.pop((alert.device_id, alert.kind), None)
        out: list[Close] = []
        for close in closes:
            key = (close[0], close[1])
            if self._until.get(key, -math.inf) > now:
                continue
            if len(self._until) >= self.max_entries:
                self._until.clear()
            self._until[key] = now + self.ttl_s
            out.append(close)
        return out


def _worst_tensor(drift: Any) -> tuple[str, float] | None:
    """(name, psi) of the monitored tensor with the largest psi in a telemetry ``drift`` section, if any."""
    if not isinstance(drift, dict):
        return None
    worst: tuple[str, float] | None = None
    for kind in ("inputs", "outputs"):
        tensors = drift.get(kind)
        if not isinstance(tensors, dict):
            continue
        for name, entry in tensors.items():
            psi = entry.get("psi") if isinstance(entry, dict) else None
            if isinstance(psi, bool) or not isinstance(psi, (int, float)) or not math.isfinite(psi):
                continue
            if worst is None or psi > worst[1]:
                worst = (str(name), float(psi))
    return worst


def latency_budgets_from_profiles(extra_dirs: Sequence[Path] = ()) -> dict[str, float]:
    """``{profile: budgets.latency_p95_ms}`` of every hardware profile that sets one (built-in ``hw_profiles/``,
    ``EDGEOPS_PROFILES_DIR``, then ``extra_dirs``). A profile that fails to load is logged and left out, so one
    bad file does not stop the ingest; raises nothing."""
    from edgeops.profiles import list_profiles, load_profile

    budgets: dict[str, float] = {}
    for name in list_profiles(extra_dirs):
        try:
            budget = load_profile(name, extra_dirs).budgets.latency_p95_ms
        except ProfileError as exc:
            log.warning("alerts: profile %s left out of the latency budgets: %s", name, exc)
            continue
        if budget is not None and math.isfinite(budget) and budget > 0:
            budgets[name] = float(budget)
    return budgets
