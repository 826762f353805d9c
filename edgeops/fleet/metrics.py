"""Prometheus metrics of the fleet, read from the store at scrape time.

:class:`FleetCollector` is a prometheus-client custom collector: each scrape reads the registry, the latest
telemetry row of every device, open alerts and the shown rollouts (see ``views.rollouts_shown``), so the figures
are those of the store, whichever process wrote them. :func:`build_registry` puts it in a private
``CollectorRegistry`` (never the process-global one, so that two servers in one process do not collide).

Series (gauges unless said)::

    edgeops_store_up                                   1 when the store answered this scrape, else 0
    edgeops_devices{state="online|offline"}
    edgeops_devices_by_version{version}                active model version; "none" for no model
    edgeops_device_online{device}                      1 / 0
    edgeops_device_latency_ms{device,version,quantile="0.5|0.95|0.99"}   latest telemetry row
    edgeops_device_requests{device,version}            requests of the latest telemetry interval
    edgeops_device_errors{device,version}              errors of the latest telemetry interval
    edgeops_device_drift_psi{device,version}           highest PSI of the latest telemetry row
    edgeops_alerts_open{kind}                          every AlertKind, 0 included
    edgeops_rollout_executions{rollout,status}         every ExecStatus per shown rollout, 0 included
    edgeops_rollout_phase{rollout,group,status}        index of the phase being sent / watched
    edgeops_telemetry_rows                             raw telemetry rows stored
    edgeops_ingest_messages_total{outcome}             counter, from the ``counters`` callable

A device's ``version`` label is the model version of its latest telemetry row (its registry version when the
row has none). A quantile or PSI the device did not report is left out, not exported as NaN.

Guarantees: a scrape never raises for a store that is down: it exports ``edgeops_store_up 0`` and the ingest
counters, and logs the error. It does not cache between scrapes and does not keep history (Prometheus does).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgeops.errors import StorageError
from edgeops.fleet.model import AlertKind, ExecStatus
from edgeops.fleet.views import NO_VERSION, rollouts_shown

if TYPE_CHECKING:
    from edgeops.fleet.store import FleetStore

__all__ = ["FleetCollector", "build_registry"]

log = logging.getLogger(__name__)

QUANTILES = (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))


class FleetCollector:
    """A custom collector over ``store``; ``counters`` (optional) gives the ingest counters by outcome."""

    def __init__(self, store: FleetStore, counters: Callable[[], Mapping[str, float]] | None = None) -> None:
        self._store = store
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("edgeops_store_up", "1 when the fleet store answered this scrape, else 0")
        try:
            families = self._store_families()
        except StorageError as exc:
            log.warning("metrics scrape: the fleet store is unavailable: %s", exc)
            up.add_metric([], 0.0)
            families = []
        else:
            up.add_metric([], 1.0)
        yield up
        yield from families
        if self._counters is not None:
            ingest = CounterMetricFamily(
                "edgeops_ingest_messages", "Messages taken by the ingest workers, by outcome", labels=["outcome"]
            )
            for outcome, value in sorted(self._counters().items()):
                ingest.add_metric([outcome], float(value))
            yield ingest

    def _store_families(self) -> list[Metric]:
        """Every store-backed family, read in full before any is yielded (so a failing read yields none).

        Raises StorageError when the store is down."""
        store = self._store
        devices = store.list_devices()
        latest = store.latest_telemetry()
        online = sum(1 for d in devices if d.online)
        by_state = GaugeMetricFamily("edgeops_devices", "Devices known to the registry, by state", labels=["state"])
        by_state.add_metric(["online"], float(online))
        by_state.add_metric(["offline"], float(len(devices) - online))
        by_version = GaugeMetricFamily(
            "edgeops_devices_by_version", "Devices by active model version", labels=["version"]
        )
        for version, n in sorted(Counter(d.active_version or NO_VERSION for d in devices).items()):
            by_version.add_metric([version], float(n))
        dev_online = GaugeMetricFamily("edgeops_device_online", "1 when the device is online", labels=["device"])
        latency = GaugeMetricFamily(
            "edgeops_device_latency_ms",
            "Inference latency of the device's latest telemetry interval (ms)",
            labels=["device", "version", "quantile"],
        )
        requests = GaugeMetricFamily(
            "edgeops_device_requests", "Requests in the latest telemetry interval", labels=["device", "version"]
        )
        errors = GaugeMetricFamily(
            "edgeops_device_errors", "Errors in the latest telemetry interval", labels=["device", "version"]
        )
        drift = GaugeMetricFamily(
            "edgeops_device_drift_psi", "Highest drift PSI of the latest telemetry row", labels=["device", "version"]
        )
        for d in devices:
            dev_online.add_metric([d.device_id], 1.0 if d.online else 0.0)
            row = latest.get(d.device_id)
            if row is None:
                continue
            labels = [d.device_id, row.model_version or d.active_version or NO_VERSION]
            for q, attr in QUANTILES:
                value = getattr(row, attr)
                if value is not None:
                    latency.add_metric([*labels, q], float(value))
            requests.add_metric(labels, float(row.requests))
            errors.add_metric(labels, float(row.errors))
            if row.drift_psi_max is not None:
                drift.add_metric(labels, float(row.drift_psi_max))
        families: list[Metric] = [by_state, by_version, dev_online, latency, requests, errors, drift]
        families.extend(self._alert_and_rollout_families())
        rows = GaugeMetricFamily("edgeops_telemetry_rows", "Raw telemetry rows in the store")
        rows.add_metric([], float(store.telemetry_count()))
        families.append(rows)
        return families

    def _alert_and_rollout_families(self) -> list[Metric]:
        store = self._store
        alerts = GaugeMetricFamily("edgeops_alerts_open", "Open alerts by kind", labels=["kind"])
        open_by_kind = Counter(a.kind.value for a in store.list_alerts(open_only=True))
        for kind in AlertKind:
            alerts.add_metric([kind.value], float(open_by_kind.get(kind.value, 0)))
        executions = GaugeMetricFamily(
            "edgeops_rollout_executions", "Executions of a rollout by status", labels=["rollout", "status"]
        )
        phase = GaugeMetricFamily(
            "edgeops_rollout_phase",
            "Index of the phase a rollout sends or watches",
            labels=["rollout", "group", "status"],
        )
        for r in rollouts_shown(store.list_rollouts()):
            by_status = Counter(e.status.value for e in store.list_executions(r.rollout_id))
            for status in ExecStatus:
                executions.add_metric([r.rollout_id, status.value], float(by_status.get(status.value, 0)))
            phase.add_metric([r.rollout_id, r.group, r.status.value], float(r.phase))
        return [alerts, executions, phase]


def build_registry(store: FleetStore, counters: Callable[[], Mapping[str, float]] | None = None) -> CollectorRegistry:
    """A private registry holding one :class:`FleetCollector` (nothing is read from the store until a scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store, counters))
    return registry
