"""The whole fleet service on PostgreSQL (`--db postgresql://...`): a real mosquitto, real agents, the service's
controller, two ingest workers and release server on the machine's PostgreSQL server — registry, a canary rollout
to success, telemetry and events stored. Skips only when no PostgreSQL server answers on 127.0.0.1:5432."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.sim import FleetSim
from edgeops.fleet import deployments
from edgeops.fleet.model import Approval, ExecStatus, RolloutSpec, RolloutStatus
from edgeops.fleet.service import FleetService, ServiceConfig
from edgeops.fleet.store import FleetStore, open_store
from edgeops.release_builder import build_release
from edgeops.signing import generate_keypair, load_private_key
from tests.support.artifacts import build_digits, repack
from tests.support.mosquitto import MosquittoBroker
from tests.support.postgres import fresh_database
from tests.support.waiting import wait_for

FLEET = "pgfleet"
PROFILE = "x86-gateway"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def test_service_runs_a_rollout_and_ingests_on_postgresql(
    tmp_path: Path, digits_dir: Path, keys_dir: Path, mosquitto: MosquittoBroker, pg_url: str
) -> None:
    key = keys_dir / "signing.key"
    fleet_keys = tmp_path / "fleet-keys"
    fleet_keys.mkdir()
    generate_keypair(fleet_keys)
    v1 = build_digits(digits_dir, tmp_path / "art", key, "1.0.0", profiles=(PROFILE,))[PROFILE]

    def to_v2(doc: dict[str, Any]) -> None:
        doc["version"] = "2.0.0"

    v2 = repack(v1, tmp_path / "art" / "v2.edgeops", key, manifest=to_v2)
    rel = build_release(v2, [v1], fleet=FLEET, key=load_private_key(key), store=tmp_path / "releases")
    service = FleetService(ServiceConfig(fleet=FLEET, broker_url=mosquitto.url, db=pg_url,
                                         release_dir=tmp_path / "releases", http="", housekeeping_s=1.0,
                                         command_key=load_private_key(fleet_keys / "signing.key")))
    sim = FleetSim(tmp_path / "sim", n=4, fleet=FLEET, profile=PROFILE, broker_url=mosquitto.url,
                   trusted_keys=[keys_dir / "signing.pub"], command_keys=[fleet_keys / "signing.pub"],
                   initial_artifact=v1, groups=lambda i: ["g"], telemetry_interval_s=1.0)
    service.start()
    store: FleetStore = open_store(pg_url)
    try:
        with sim:
            wait_for("4 devices", lambda: len(store.list_devices(group="g", online=True)) == 4)
            wait_for("release registered", lambda: store.get_release(rel.meta.release_id))
            store.set_approval(rel.meta.release_id, Approval.APPROVED, by="ci", at=time.time())
            dep = deployments.deploy(store, release_id=rel.meta.release_id, group="g",
                                     spec=RolloutSpec(phases=(0.25, 1.0)), now=time.time())
            rid = dep.rollout.rollout_id
            wait_for("rollout succeeded", lambda: store.get_rollout(rid).status is RolloutStatus.SUCCEEDED)  # type: ignore[union-attr]
            assert all(e.status is ExecStatus.SUCCEEDED for e in store.list_executions(rid))
            assert {d.active_version for d in store.list_devices(group="g")} == {"2.0.0"}
            wait_for("telemetry rows", lambda: store.telemetry_count() >= 4)
            installs = store.events_since(since=0.0, types=["install.succeeded"])
            assert {e.device_id for e in installs if e.body.get("version") == "2.0.0"} == {
                d.device_id for d in sim.devices}
    finally:
        store.close()
        service.stop()
