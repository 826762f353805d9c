"""``FleetService``: the parts of ``edgeops fleet serve`` started and stopped together.

- the rollout controller (registry from retained states, rollouts, signed commands),
- N ingest workers on the shared subscription (telemetry and events → store, alerts),
- the release server (retained release metadata, chunks, repairs) fed by the release store,
- the dashboard / JSON API / Prometheus ``/metrics`` on ``http`` (empty: none),
- housekeeping every ``housekeeping_s``: newly built releases registered and served, telemetry compacted.

Guarantees: ``start`` either starts every part or stops the ones it started and raises; ``stop`` stops every
part even when one fails (ingest workers flush and acknowledge what they committed). All state is in the store,
so a service stopped (or killed) and started again goes on where it was. Raises StorageError (store),
TransportError (broker), OSError (HTTP address in use).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops.errors import ConfigError, EdgeopsError
from edgeops.fleet.controller import FleetController
from edgeops.fleet.release_registry import sync_releases
from edgeops.fleet.store import open_store
from edgeops.protocol import parse_broker_url
from edgeops.trust_repo import TrustFeed

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from edgeops.fleet.http_server import DashboardServer
    from edgeops.fleet.ingest_worker import IngestWorker
    from edgeops.release_server import ReleaseServer

__all__ = ["FleetService", "ServiceConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    fleet: str
    broker_url: str
    db: str  # a SQLite path or URL, or postgresql://...
    release_dir: Path
    command_key: Ed25519PrivateKey  # signs the commands sent to devices
    trusted_release_keys: tuple[Ed25519PublicKey, ...] | None = None  # None: each release's recorded signer
    http: str = "127.0.0.1:8080"  # "" for no dashboard
    ingest_workers: int = 2
    tick_s: float = 0.5
    offline_after_s: float = 0.0
    housekeeping_s: float = 5.0
    raw_retention_s: float = 7 * 86400.0
    rollup_s: float = 300.0
    rollup_retention_s: float = 90 * 86400.0
    compact_every_s: float = 3600.0
    rate_per_s: float = 5.0  # telemetry + events per device per second, sustained
    burst: float = 20.0
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    ca_certs: Path | None = None
    cert_file: Path | None = None  # client certificate for mutual TLS (the PKI's fleet.crt)
    key_file: Path | None = None
    trust_dir: Path | None = None  # TUF trust directory: its metadata is kept published retained
    timestamp_key: Path | None = None  # the online timestamp key: re-sign snapshot/timestamp before they expire


class FleetService:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.controller: FleetController | None = None
        self.workers: list[IngestWorker] = []
        self.releases: ReleaseServer | None = None
        self.dashboard: DashboardServer | None = None
        self._served: set[str] = set()
        self._stop = threading.Event()
        self._house: threading.Thread | None = None
        self._last_compact = 0.0
        self._trust: TrustFeed | None = None

    @property
    def url(self) -> str | None:
        return self.dashboard.url if self.dashboard else None

    def start(self) -> None:
        try:
            self._start_parts()
        except BaseException:
            self.stop()
            raise
        self._house = threading.Thread(target=self._housekeeping, name="fleet-housekeeping", daemon=True)
        self._house.start()

    def _start_parts(self) -> None:
        from edgeops.fleet.http_server import DashboardServer
        from edgeops.fleet.ingest_worker import IngestWorker
        from edgeops.release_server import ReleaseServer

        c = self.config
        if c.timestamp_key is not None and c.trust_dir is None:
            raise ConfigError("a timestamp key needs a trust directory (--trust-dir)")
        broker = parse_broker_url(c.broker_url)
        self.controller = FleetController(
            broker=broker, fleet=c.fleet, store_url=c.db, command_key=c.command_key, tick_s=c.tick_s,
            offline_after_s=c.offline_after_s, client_id=f"edgeops-controller-{c.fleet}", ca_certs=c.ca_certs,
            username=c.username, password=c.password, cert_file=c.cert_file, key_file=c.key_file,
        )
        synced = self._sync()
        self.releases = ReleaseServer(broker, c.fleet, list(synced), client_id=f"edgeops-releases-{c.fleet}",
                                      ca_certs=c.ca_certs, username=c.username, password=c.password,
                                      cert_file=c.cert_file, key_file=c.key_file)
        self._served = {r.meta.release_id for r in synced}
        if c.trust_dir is not None:
            self._trust = TrustFeed(c.trust_dir, c.fleet, c.timestamp_key)
            self.releases.set_retained(self._trust.messages())
        self.releases.start()
        for i in range(c.ingest_workers):
            worker = IngestWorker(broker_url=c.broker_url, fleet=c.fleet, store_url=c.db,
                                  client_id=f"edgeops-ingest-{c.fleet}-{i}", rate_per_s=c.rate_per_s, burst=c.burst,
                                  ca=c.ca_certs, username=c.username, password=c.password,
                                  cert_file=c.cert_file, key_file=c.key_file)
            self.workers.append(worker)
            worker.start()
        self.controller.start()
        if c.http:
            self.dashboard = DashboardServer(c.db, address=c.http, counters=self.counters)
            self.dashboard.start()

    def _sync(self) -> list[Any]:
        """The releases of the release store not served yet, registered in the fleet store."""
        store = open_store(self.config.db)
        try:
            result = sync_releases(store, self.config.release_dir, fleet=self.config.fleet,
                                   trusted=self.config.trusted_release_keys, skip=self._served)
        finally:
            store.close()
        for line in result.errors:
            log.warning("release store: %s", line)
        for rid in result.added:
            log.info("release %s registered (pending approval)", rid)
        return list(result.releases)

    def _housekeeping(self) -> None:
        while not self._stop.wait(self.config.housekeeping_s):
            try:
                self._house_once(time.time())
            except EdgeopsError as exc:
                log.warning("housekeeping: %s", exc)

    def _house_once(self, now: float) -> None:
        if self._trust is not None and self.releases is not None:
            self.releases.set_retained(self._trust.messages())
        for rel in self._sync():
            if rel.meta.release_id not in self._served and self.releases is not None:
                self.releases.add_release(rel)
                self._served.add(rel.meta.release_id)
        c = self.config
        if now - self._last_compact >= c.compact_every_s:
            self._last_compact = now
            store = open_store(c.db)
            try:
                stats = store.compact(now=now, raw_retention_s=c.raw_retention_s, rollup_s=c.rollup_s,
                                      rollup_retention_s=c.rollup_retention_s)
            finally:
                store.close()
            if any(stats.values()):
                log.info("telemetry compacted: %s", stats)

    def counters(self) -> Mapping[str, float]:
        """Ingest counters summed over the workers, plus the controller's and the release server's (for /metrics)."""
        total: dict[str, float] = {}
        for worker in self.workers:
            for key, value in _flat(worker.stats()).items():
                total[key] = total.get(key, 0.0) + value
        if self.controller is not None:
            for key, value in self.controller.counters.items():
                total[f"controller_{key}"] = float(value)
        if self.releases is not None:  # chunks published, resends, repair requests: passes, not devices
            for key, value in _flat(self.releases.stats()).items():
                total[f"releases_{key}"] = value
        return total

    def stop(self) -> None:
        """Stop every part (dashboard, controller, workers with a final flush, release server); raises the first
        failure after trying them all."""
        self._stop.set()
        if self._house is not None:
            self._house.join(timeout=30)
        first: BaseException | None = None
        parts: list[Any] = [self.dashboard, self.controller, *self.workers, self.releases]
        for part in parts:
            if part is None:
                continue
            try:
                part.stop()
            except Exception as exc:  # every part gets its stop; the first failure is raised after
                log.exception("stopping %s failed", type(part).__name__)
                first = first or exc
        self.dashboard, self.controller, self.workers, self.releases = None, None, [], None
        if first is not None:
            raise first


def _flat(stats: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
