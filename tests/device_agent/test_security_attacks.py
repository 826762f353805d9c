"""Attacks on a device, each tried for real: a mutual-TLS mosquitto run by the fleet PKI's config and ACL, a
device agent in TUF mode, the fleet's own trust repository and release server — and an attacker holding the
broker (it publishes as the fleet identity, so the broker's ACL lets it write every fleet topic).

Every attack must be refused by the agent with a reason code on its event topic while the active model keeps
serving; the legitimate path is shown to work alongside, so a refusal is never just a broken setup.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from device_agent.agent import Agent
from device_agent.config import load_config
from edgeops.pki import init_pki, issue_device
from edgeops.protocol import device_topics, parse_broker_url, peek_nonce, release_topics, sign_command
from edgeops.release_builder import PublishedRelease, build_release
from edgeops.release_server import ReleaseServer
from edgeops.signing import load_private_key
from edgeops.trust import release_target, trust_topics
from edgeops.trust_repo import TrustRepo, init_repo
from tests.support.mosquitto import MosquittoBroker
from tests.support.subscriber import Collector

FLEET = "secfleet"
DEVICE = "dev-1"
PROFILE = "x86-gateway"
TOPICS = device_topics(FLEET, DEVICE)
TRUST = trust_topics(FLEET)
TIMESTAMP_WINDOW_S = 3600


@dataclass
class Fleet:
    """The fleet side (trust repository, release store, release server) and the broker-side attacker."""

    tmp: Path
    broker: MosquittoBroker
    pki: Path
    trust: TrustRepo
    admin: Collector
    server: ReleaseServer
    agents: list[Agent] = field(default_factory=list)

    def key(self, name: str) -> Ed25519PrivateKey:
        return load_private_key(self.trust.keys_dir / f"{name}.key")

    def release(self, artifact: Path, bases: tuple[Path, ...] = (), *, listed: bool = True) -> PublishedRelease:
        """Build a release signed with the targets key; list it in targets.json, publish the trust metadata and
        serve the release (its metadata retained, chunks on request)."""
        rel = build_release(artifact, bases, fleet=FLEET, key=self.key("targets"), store=self.tmp / "releases")
        if listed:
            self.trust.add_release(rel.meta.release_id, rel.signed, self.key("targets"))
        self.publish_trust()
        self.server.add_release(rel)
        assert self.server.flush(10)
        return rel

    def publish_trust(self, *, now: dt.datetime | None = None) -> None:
        self.trust.publish_timestamp(self.key("timestamp"), now=now)
        self.server.set_retained(self.trust.retained_messages())
        assert self.server.flush(10)

    def inject(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        """The attacker on the broker: publish anything anywhere in the fleet."""
        self.admin.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def command(self, name: str, args: dict[str, Any], *, target: str = f"device/{DEVICE}",
                key: Ed25519PrivateKey | None = None) -> bytes:
        return sign_command(key or self.key("commands"), name=name, args=args, fleet=FLEET, target=target,
                            now=time.time())

    def deploy(self, release_id: str) -> None:
        self.inject(TOPICS.cmd, self.command("ota-update", {"release_id": release_id}), retain=False)

    def event(self, kind: str, pred: Callable[[dict[str, Any]], bool] = lambda d: True, timeout: float = 30) -> dict:
        return self.admin.wait_for("/event", lambda d: d["type"] == kind and pred(d), timeout=timeout)

    def refused(self, release_id: str) -> dict[str, Any]:
        self.admin.clear()
        self.deploy(release_id)
        return self.event("ota.rejected", lambda d: d["release_id"] == release_id)

    def start_agent(self, artifact: Path | None = None) -> Agent:
        device_dir = self.pki / "devices" / DEVICE
        cfg = {
            "device_id": DEVICE,
            "fleet": FLEET,
            "profile": PROFILE,
            "data_dir": str(self.tmp / "data"),
            "groups": ["canary"],
            "initial_artifact": str(artifact) if artifact else "",
        }
        lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if v != ""]
        lines += ["[trust]", f'root = "{self.trust.root_path(1)}"']
        lines += ["[broker]", f'url = "{self.broker.tls_url}"', f'ca_file = "{device_dir / "ca.crt"}"',
                  f'cert_file = "{device_dir / "device.crt"}"', f'key_file = "{device_dir / "device.key"}"']
        lines += ["[api]", 'address = ""', "[health]", "latency_runs = 5",
                  "[ota]", "repair_idle_s = 0.3", "repair_min_interval_s = 0.3"]
        path = self.tmp / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        agent = Agent(load_config(path))
        agent.start()
        self.agents.append(agent)
        self.admin.wait_for("/state", lambda d: d.get("online") is True)
        return agent


@pytest.fixture
def fleet(tmp_path: Path, keys_dir: Path) -> Iterator[Fleet]:
    pki = tmp_path / "pki"
    init_pki(pki, fleet=FLEET)
    issue_device(pki, DEVICE, groups=["canary"])
    issue_device(pki, "dev-2")
    broker = MosquittoBroker.tls(tmp_path / "broker", pki)
    broker.start()
    trust = init_repo(tmp_path / "trust", fleet=FLEET, artifacts_key=keys_dir / "signing.pub",
                      settings={"timestamp_expiry_s": TIMESTAMP_WINDOW_S})
    fleet_id = (pki / "ca.crt", pki / "fleet.crt", pki / "fleet.key")
    admin = Collector(broker.host, broker.port, [f"edgeops/v1/{FLEET}/device/+/+"], client_id="attacker",
                      tls=fleet_id)
    addr = parse_broker_url(broker.tls_url)
    server = ReleaseServer(addr, FLEET, [], client_id="release-server", ca_certs=fleet_id[0], cert_file=fleet_id[1],
                           key_file=fleet_id[2])
    server.start()
    env = Fleet(tmp_path, broker, pki, trust, admin, server)
    env.publish_trust()
    yield env
    for agent in env.agents:
        agent.stop()
    server.stop()
    admin.close()
    broker.stop()


def _serves(agent: Agent, digits_dir: Path, version: str) -> None:
    x = np.load(digits_dir / "eval_nchw.npz")["x"][:1].astype(np.float32)
    assert agent.infer({"image": x}).version == version
    assert agent.active_version() == version


def _sign(md: Metadata[Any], *keys: Ed25519PrivateKey) -> bytes:
    from securesystemslib.signer import CryptoSigner

    md.signatures.clear()
    for k in keys:
        md.sign(CryptoSigner(k), append=True)
    return md.to_bytes(JSONSerializer(compact=True))


def _forge_chain(fleet: Fleet, rel: PublishedRelease, targets_key: Ed25519PrivateKey,
                 timestamp_key: Ed25519PrivateKey) -> None:
    """What an attacker holding a targets key and the timestamp key publishes: targets listing ``rel``, with the
    snapshot and timestamp that name it (versions ahead of the repository's)."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    targets: Metadata[Targets] = Metadata.from_bytes(fleet.trust.role_bytes("targets") or b"")
    path = release_target(rel.meta.release_id)
    targets.signed.targets[path] = TargetFile.from_data(path, rel.signed, ["sha256"])
    targets.signed.version += 10
    targets_raw = _sign(targets, targets_key)
    snap: Metadata[Snapshot] = Metadata.from_bytes(fleet.trust.role_bytes("snapshot") or b"")
    snap.signed.version += 10
    snap.signed.meta["targets.json"] = MetaFile.from_data(targets.signed.version, targets_raw, ["sha256"])
    snap_raw = _sign(snap, timestamp_key)
    ts: Metadata[Timestamp] = Metadata.from_bytes(fleet.trust.role_bytes("timestamp") or b"")
    ts.signed.version += 10
    ts.signed.expires = now + dt.timedelta(hours=1)
    ts.signed.snapshot_meta = MetaFile.from_data(snap.signed.version, snap_raw, ["sha256"])
    ts_raw = _sign(ts, timestamp_key)
    for topic, raw in ((TRUST.targets, targets_raw), (TRUST.snapshot, snap_raw), (TRUST.timestamp, ts_raw)):
        fleet.inject(topic, raw)
    fleet.inject(release_topics(FLEET, rel.meta.release_id).manifest, rel.signed)


def test_release_attacks_are_refused_and_the_model_keeps_serving(
    fleet: Fleet, artifacts: dict[str, Path], digits_dir: Path
) -> None:
    agent = fleet.start_agent(artifacts["v1"])
    _serves(agent, digits_dir, "1.0.0")

    # the legitimate path: listed in targets, fresh timestamp, served by the release server -> installed
    v11 = fleet.release(artifacts["v1.1"], (artifacts["v1"],))
    fleet.admin.clear()
    fleet.deploy(v11.meta.release_id)
    fleet.event("install.succeeded", lambda d: d.get("version") == "1.1.0", timeout=60)
    _serves(agent, digits_dir, "1.1.0")

    # unsigned release: metadata on its topic that no targets.json lists
    unlisted = fleet.release(artifacts["v1.2"], (artifacts["v1.1"],), listed=False)
    assert fleet.refused(unlisted.meta.release_id)["reason"] == "not-in-targets"
    # ... and a forged targets.json that lists it, signed by the attacker's own keys
    attacker = Ed25519PrivateKey.generate()
    _forge_chain(fleet, unlisted, attacker, attacker)
    assert fleet.refused(unlisted.meta.release_id)["reason"] == "untrusted-metadata"
    fleet.publish_trust()  # the repository's metadata again (the device kept the genuine one meanwhile)
    _serves(agent, digits_dir, "1.1.0")

    # rollback: a genuinely listed older release, and an old timestamp replayed over the current one
    assert fleet.refused(fleet.release(artifacts["v1"]).meta.release_id)["reason"] == "not-newer"
    old_timestamp = fleet.trust.role_bytes("timestamp") or b""
    fleet.publish_trust()
    assert fleet.refused(unlisted.meta.release_id)["reason"] == "not-in-targets"  # trusts the newer timestamp now
    fleet.inject(TRUST.timestamp, old_timestamp)
    assert fleet.refused(unlisted.meta.release_id)["reason"] == "metadata-rollback"
    fleet.publish_trust()

    # a release for another profile, listed and signed: refused by the device's own profile check
    rpi4 = fleet.release(artifacts["rpi4"])
    assert fleet.refused(rpi4.meta.release_id)["reason"] == "wrong-profile"

    # mix-and-match: another release's (genuine, listed) metadata on this release's topic
    listed_v12 = fleet.release(artifacts["v1.2"], (artifacts["v1.1"],))
    fleet.inject(release_topics(FLEET, listed_v12.meta.release_id).manifest, rpi4.signed)
    assert fleet.refused(listed_v12.meta.release_id)["reason"] == "metadata-mismatch"
    # ... and an earlier signing of the same release (other payloads) that targets no longer lists
    earlier = build_release(artifacts["v1.2"], (), fleet=FLEET, key=fleet.key("targets"), store=fleet.tmp / "old",
                            now=time.time() - 3600)
    fleet.inject(release_topics(FLEET, listed_v12.meta.release_id).manifest, earlier.signed)
    assert fleet.refused(listed_v12.meta.release_id)["reason"] == "metadata-mismatch"
    _serves(agent, digits_dir, "1.1.0")
    assert not any((Path(agent.cfg.data_dir) / "ota").iterdir()), "nothing left of a refused download"


def test_revoked_targets_key_and_freeze(fleet: Fleet, artifacts: dict[str, Path], digits_dir: Path) -> None:
    agent = fleet.start_agent(artifacts["v1"])
    old_targets = fleet.key("targets")
    # the release key is rotated (root v2); the device follows the new root as soon as it is published
    new_targets = Ed25519PrivateKey.generate()
    fleet.trust.rotate("targets", [new_targets.public_key()], [fleet.key("root-1"), fleet.key("root-2")],
                       targets_key=new_targets)
    (fleet.trust.keys_dir / "targets.key").write_bytes(_pem(new_targets))
    fleet.admin.clear()
    fleet.publish_trust()
    fleet.event("trust.root", lambda d: d["version"] == 2)

    # a release re-signed with the revoked key, with a snapshot and timestamp from a stolen timestamp key
    evil = build_release(artifacts["v1.2"], (), fleet=FLEET, key=old_targets, store=fleet.tmp / "evil")
    _forge_chain(fleet, evil, old_targets, fleet.key("timestamp"))
    assert fleet.refused(evil.meta.release_id)["reason"] == "untrusted-metadata"
    _serves(agent, digits_dir, "1.0.0")

    # freeze: the last timestamp the device can get expires; updates stop, inference does not
    rel = fleet.release(artifacts["v1.1"], (artifacts["v1"],))  # re-signs targets with the new key
    expiring = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=TIMESTAMP_WINDOW_S - 3)
    fleet.publish_trust(now=expiring)  # valid for 3 more seconds, then withheld by the attacker
    time.sleep(3.5)
    event = fleet.refused(rel.meta.release_id)
    assert event["reason"] == "expired-metadata" and "timestamp" in event["detail"]
    _serves(agent, digits_dir, "1.0.0")
    assert agent.status()["trust"]["last_error"].startswith("expired-metadata")
    fleet.publish_trust()  # the attacker is gone: a fresh timestamp reaches the device
    fleet.admin.clear()
    fleet.deploy(rel.meta.release_id)
    fleet.event("install.succeeded", lambda d: d.get("version") == "1.1.0", timeout=60)
    _serves(agent, digits_dir, "1.1.0")
    trust = agent.status()["trust"]
    assert trust["root_version"] == 2 and trust["last_error"] is None and trust["metadata_expires"]


def _pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_command_attacks_and_command_key_rotation(fleet: Fleet, artifacts: dict[str, Path], digits_dir: Path) -> None:
    agent = fleet.start_agent(artifacts["v1"])

    def outcome(raw: bytes, topic: str = TOPICS.cmd) -> dict[str, Any]:
        nonce = peek_nonce(raw)
        fleet.admin.clear()
        fleet.inject(topic, raw, retain=False)
        ends = ("command.done", "command.rejected")
        return fleet.admin.wait_for("/event", lambda d: d.get("nonce") == nonce and d["type"] in ends, timeout=30)

    status = fleet.command("status", {})
    assert outcome(status)["type"] == "command.done"
    replayed = outcome(status)
    assert (replayed["type"], replayed["reason"]) == ("command.rejected", "replayed")
    other = outcome(fleet.command("rollback", {}, target="device/dev-2"))
    assert (other["type"], other["reason"]) == ("command.rejected", "wrong-target")
    group = outcome(fleet.command("status", {}, target="group/canary"), f"edgeops/v1/{FLEET}/group/canary/cmd")
    assert group["type"] == "command.done"

    # the command key is rotated through the root of trust; the old key stops working at once
    old = fleet.key("commands")
    new = Ed25519PrivateKey.generate()
    fleet.trust.rotate("commands", [new.public_key()], [fleet.key("root-2"), fleet.key("root-3")])
    fleet.admin.clear()
    fleet.publish_trust()
    fleet.event("trust.root", lambda d: d["version"] == 2)
    stale = outcome(fleet.command("rollback", {}, key=old))
    assert (stale["type"], stale["reason"]) == ("command.rejected", "untrusted-key")
    assert outcome(fleet.command("status", {}, key=new))["type"] == "command.done"
    _serves(agent, digits_dir, "1.0.0")


def test_root_rotation_followed_by_a_device_that_was_offline(
    fleet: Fleet, artifacts: dict[str, Path], digits_dir: Path
) -> None:
    agent = fleet.start_agent(artifacts["v1"])
    agent.stop()
    fleet.agents.remove(agent)
    # while the device is off: the targets key changes (root v2), then the root keys themselves (v3, signed by
    # 2 of the 3 old root keys and 2 of the 3 new ones)
    new_targets = Ed25519PrivateKey.generate()
    fleet.trust.rotate("targets", [new_targets.public_key()], [fleet.key("root-1"), fleet.key("root-3")],
                       targets_key=new_targets)
    new_roots = [Ed25519PrivateKey.generate() for _ in range(3)]
    fleet.trust.rotate("root", [k.public_key() for k in new_roots],
                       [fleet.key("root-1"), fleet.key("root-2"), new_roots[0], new_roots[1]], threshold=2)
    (fleet.trust.keys_dir / "targets.key").write_bytes(_pem(new_targets))
    rel = fleet.release(artifacts["v1.1"], (artifacts["v1"],))

    fleet.admin.clear()
    agent = fleet.start_agent()
    fleet.event("trust.root", lambda d: d["version"] == 3)
    assert agent.trust is not None and agent.trust.root_version == 3
    fleet.deploy(rel.meta.release_id)
    fleet.event("install.succeeded", lambda d: d.get("version") == "1.1.0", timeout=60)
    _serves(agent, digits_dir, "1.1.0")
    stored = Metadata.from_bytes((Path(agent.cfg.data_dir) / "trust" / "root.json").read_bytes())
    assert stored.signed.version == 3
