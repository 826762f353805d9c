"""OTA bad input against a real agent in-process and a real mosquitto: a broker-side attacker (or a broken
publisher) publishes release metadata and chunks directly. Each refusal is an ``ota.rejected``/``ota.failed``
event with its reason code, the active model keeps serving, and no download is left behind; a corrupt chunk is
dropped and asked for again in a repair request."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.agent import Agent
from device_agent.config import load_config
from edgeops.delta import make_delta
from edgeops.protocol import device_topics, release_topics, sign_command
from edgeops.release import (
    Payload,
    PayloadKind,
    ReleaseMetadata,
    chunk_hashes_of,
    encode_chunk,
    parse_repair,
    sign_release,
)
from edgeops.signing import load_private_key
from tests.support.mosquitto import MosquittoBroker
from tests.support.subscriber import Collector

FLEET, DEVICE, PROFILE = "testfleet", "dev-1", "x86-gateway"
T = device_topics(FLEET, DEVICE)
CS = 4096


def _payload(data: bytes, kind: PayloadKind, base: bytes | None = None, base_version: str = "1.0.0") -> Payload:
    sha = hashlib.sha256(data).hexdigest()
    hashes = chunk_hashes_of(data[i : i + CS] for i in range(0, max(len(data), 1), CS))
    if kind is PayloadKind.FULL:
        return Payload(sha[:16], kind, sha, len(data), hashes)
    base_sha = hashlib.sha256(base or b"").hexdigest()
    return Payload(sha[:16], kind, sha, len(data), hashes, base_version, base_sha, "test")


def _meta(target: bytes, payloads: tuple[Payload, ...], *, version: str, profile: str = PROFILE) -> ReleaseMetadata:
    return ReleaseMetadata(
        release_id=f"digits-{version}-{profile}",
        fleet=FLEET,
        name="digits",
        version=version,
        profile=profile,
        created_at=time.time(),
        target_sha256=hashlib.sha256(target).hexdigest(),
        target_size=len(target),
        chunk_size=CS,
        payloads=payloads,
    )


class Publisher:
    """Publishes what a (possibly hostile) release publisher would, straight onto the broker."""

    def __init__(self, broker: MosquittoBroker, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self.client = Collector(broker.host, broker.port, [T.event, T.ota, T.state], client_id="publisher")

    def announce(self, meta: ReleaseMetadata, key: Ed25519PrivateKey | None = None, raw: bytes | None = None) -> None:
        signed = raw if raw is not None else sign_release(key or load_private_key(self.keys_dir / "signing.key"), meta)
        topic = release_topics(FLEET, meta.release_id).manifest
        self.client.client.publish(topic, signed, qos=1, retain=True).wait_for_publish(5)

    def deploy(self, release_id: str) -> None:
        cmd = sign_command(
            load_private_key(self.keys_dir / "signing.key"),
            name="ota-update",
            args={"release_id": release_id},
            fleet=FLEET,
            target=f"device/{DEVICE}",
            now=time.time(),
        )
        self.client.publish(T.cmd, cmd)

    def chunk(self, meta: ReleaseMetadata, payload: Payload, data: bytes, index: int) -> None:
        frame = encode_chunk(meta.release_id, payload.id, index, data[index * CS : (index + 1) * CS])
        self.client.publish(release_topics(FLEET, meta.release_id).chunk, frame)

    def event(self, kind: str, timeout: float = 20) -> dict:
        return self.client.wait_for("/event", lambda d: d["type"] == kind, timeout=timeout)


@pytest.fixture
def agent_and_publisher(
    write_config: Callable[..., Path], mosquitto: MosquittoBroker, artifacts: dict[str, Path], keys_dir: Path
) -> Iterator[tuple[Agent, Publisher]]:
    publisher = Publisher(mosquitto, keys_dir)
    cfg = write_config(
        broker={"url": mosquitto.url},
        initial_artifact=str(artifacts["v1"]),
        ota={"repair_idle_s": 0.3, "repair_min_interval_s": 0.3, "max_download_bytes": 2_000_000},
    )
    agent = Agent(load_config(cfg))
    agent.start()
    publisher.client.wait_for("/state", lambda d: d.get("online") is True)
    yield agent, publisher
    agent.stop()
    publisher.client.close()


def _still_serving(agent: Agent, digits_dir: Path) -> None:
    x = np.load(digits_dir / "eval_nchw.npz")["x"][:1].astype(np.float32)
    assert agent.infer({"image": x}).version == "1.0.0"
    assert not any((Path(agent.cfg.data_dir) / "ota").iterdir()), "nothing left of a refused download"


def _refused(publisher: Publisher, meta: ReleaseMetadata, **announce: object) -> dict:
    publisher.announce(meta, **announce)  # type: ignore[arg-type]
    publisher.deploy(meta.release_id)
    return publisher.event("ota.rejected")


def test_metadata_refusals(
    agent_and_publisher: tuple[Agent, Publisher], artifacts: dict[str, Path], digits_dir: Path
) -> None:
    agent, publisher = agent_and_publisher
    v11 = artifacts["v1.1"].read_bytes()
    good = _meta(v11, (_payload(v11, PayloadKind.FULL),), version="1.1.0")
    cases = [
        ("untrusted-key", _meta(v11, good.payloads, version="1.1.0"), {"key": Ed25519PrivateKey.generate()}),
        ("wrong-profile", _meta(v11, good.payloads, version="1.1.1", profile="rpi4"), {}),
        ("not-newer", _meta(v11, good.payloads, version="0.9.0"), {}),
        ("not-newer", _meta(v11, good.payloads, version="1.0.0"), {}),
    ]
    for reason, meta, extra in cases:
        publisher.client.clear()
        event = _refused(publisher, meta, **extra)
        assert event["reason"] == reason, event
        _still_serving(agent, digits_dir)
    # unsigned: the envelope with its signature removed
    publisher.client.clear()
    signed = sign_release(load_private_key(publisher.keys_dir / "signing.key"), good)
    payload = base64.b64encode(base64.b64decode(json.loads(signed)["payload"])).decode()
    unsigned = ('{"v":1,"payload":"' + payload + '","signatures":[]}').encode()
    assert _refused(publisher, good, raw=unsigned)["reason"] == "unsigned"
    # oversized for this device (max_download_bytes = 2 MB)
    publisher.client.clear()
    big = bytes(3_000_000)
    event = _refused(publisher, _meta(big, (_payload(big, PayloadKind.FULL),), version="1.2.0"))
    assert event["reason"] == "too-large" and "2000000" in event["detail"]
    _still_serving(agent, digits_dir)


def test_delta_whose_result_is_not_the_announced_target_is_refused(
    agent_and_publisher: tuple[Agent, Publisher], artifacts: dict[str, Path], digits_dir: Path, tmp_path: Path
) -> None:
    agent, publisher = agent_and_publisher
    v1, v11, v12 = (artifacts[k].read_bytes() for k in ("v1", "v1.1", "v1.2"))
    make_delta(artifacts["v1"], artifacts["v1.1"], tmp_path / "d.patch")
    patch = (tmp_path / "d.patch").read_bytes()
    delta = _payload(patch, PayloadKind.DELTA, base=v1)
    meta = _meta(v12, (delta,), version="1.2.0")  # announces v1.2, the delta makes v1.1
    publisher.announce(meta)
    publisher.deploy(meta.release_id)
    publisher.event("ota.started")
    for i in range(delta.chunk_count):
        publisher.chunk(meta, delta, patch, i)
    event = publisher.event("ota.rejected")
    assert event["reason"] == "result-mismatch", event
    _still_serving(agent, digits_dir)
    assert v11 != v12


def test_corrupt_chunk_is_dropped_and_asked_for_again(
    agent_and_publisher: tuple[Agent, Publisher], artifacts: dict[str, Path]
) -> None:
    agent, publisher = agent_and_publisher
    v11 = artifacts["v1.1"].read_bytes()
    full = _payload(v11, PayloadKind.FULL)
    meta = _meta(v11, (full,), version="1.1.0")
    publisher.announce(meta)
    publisher.deploy(meta.release_id)
    publisher.event("ota.started")
    first = parse_repair(publisher.client.messages_on(T.ota, timeout=10)[0])
    assert first.missing == tuple(range(full.chunk_count)), "a fresh download asks for everything"
    publisher.client.clear()
    bad = bytearray(v11)
    bad[3 * CS + 10] ^= 0xFF  # chunk 3 altered; its header hash is recomputed, so only the signed list catches it
    for i in range(full.chunk_count):
        publisher.chunk(meta, full, bytes(bad) if i == 3 else v11, i)
    repair = parse_repair(publisher.client.messages_on(T.ota, timeout=10)[0])
    assert repair.missing == (3,), "only the corrupt chunk is asked for again"
    publisher.chunk(meta, full, v11, 3)
    done = publisher.event("ota.completed", timeout=60)
    assert done["version"] == "1.1.0" and done["stats"]["corrupt"] == 1
    assert agent.active_version() == "1.1.0"


def test_disk_full_at_download_fails_cleanly_and_keeps_serving(
    write_config: Callable[..., Path], mosquitto: MosquittoBroker, artifacts: dict[str, Path], keys_dir: Path
) -> None:
    """The agent runs with a 1 MiB file-size limit (RLIMIT_FSIZE, the way a nearly full disk looks to it); a
    1.5 MB release cannot be stored: ota.failed (storage), nothing left in the data dir, v1 keeps answering."""
    publisher = Publisher(mosquitto, keys_dir)
    cfg = write_config(broker={"url": mosquitto.url}, initial_artifact=str(artifacts["v1"]), api={"address": ""})

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
    )
    try:
        publisher.event("agent.started", timeout=60)
        big = os.urandom(1_500_000)
        meta = _meta(big, (_payload(big, PayloadKind.FULL),), version="1.5.0")
        publisher.announce(meta)
        publisher.deploy(meta.release_id)
        event = publisher.event("ota.failed")
        assert event["reason"] == "storage" and "file too large" in event["detail"], event
        assert not any((cfg.parent / "data" / "ota").iterdir())
        publisher.deploy("digits-9.9.9-x86-gateway")  # the agent is alive and answers the next command
        publisher.client.wait_for("/event", lambda d: d["type"] == "command.done" and d["cmd"] == "ota-update")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
        publisher.client.close()
