"""edgeops.release_server, `edgeops release publish/serve` and `edgeops deploy` against a real mosquitto.

A test "device" is a Collector: it subscribes to the release's chunk topic and publishes repair requests on its
ota topic, as the agent does, so every chunk it counts went through the broker."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeops.cli import main
from edgeops.protocol import CommandName, device_topics, parse_broker_url, parse_command, release_topics
from edgeops.release import (
    MAX_REPAIR_BYTES,
    Chunk,
    Payload,
    PayloadKind,
    encode_repair,
    parse_chunk,
    parse_release,
)
from edgeops.release_builder import PublishedRelease, build_release
from edgeops.release_server import ReleaseServer
from edgeops.signing import load_private_key, load_public_key
from tests.support.artifacts import build_digits
from tests.support.mosquitto import MosquittoBroker
from tests.support.subscriber import Collector

PROFILE = "x86-gateway"
FLEET = "testfleet"
CHUNK = 1024  # small chunks: a couple of hundred per payload


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path, keys_dir: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("server-artifacts")
    key = keys_dir / "signing.key"
    return {
        "v1": build_digits(digits_dir, out, key, "1.0.0", profiles=(PROFILE,))[PROFILE],
        "v1.1": build_digits(digits_dir, out, key, "1.1.0", profiles=(PROFILE,))[PROFILE],
        "store": out / "store",
    }


@pytest.fixture(scope="module")
def release(built: dict[str, Path], keys_dir: Path) -> PublishedRelease:
    key = load_private_key(keys_dir / "signing.key")
    return build_release(built["v1.1"], [built["v1"]], fleet=FLEET, key=key, store=built["store"], chunk_size=CHUNK)


@pytest.fixture
def server(mosquitto: MosquittoBroker, release: PublishedRelease) -> Iterator[ReleaseServer]:
    srv = ReleaseServer(parse_broker_url(mosquitto.url), FLEET, [release], client_id="release-server", gather_s=0.3)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Device:
    """A device's MQTT side: chunk subscriber and repair requester."""

    def __init__(self, broker: MosquittoBroker, device_id: str, release: PublishedRelease) -> None:
        self.release_id = release.meta.release_id
        self.chunk_topic = release_topics(FLEET, self.release_id).chunk
        self.ota = device_topics(FLEET, device_id).ota
        self.mqtt = Collector(broker.host, broker.port, [self.chunk_topic], client_id=f"device-{device_id}")

    def request(self, payload: Payload, missing: Any, *, count: int | None = None) -> None:
        self.mqtt.publish(self.ota, encode_repair(self.release_id, payload.id, count or payload.chunk_count, missing))

    def chunks(self) -> list[Chunk]:
        return [parse_chunk(p) for t, p, _ in list(self.mqtt.messages) if t == self.chunk_topic]

    def wait_chunks(self, n: int, timeout: float = 15.0) -> list[Chunk]:
        deadline = time.monotonic() + timeout
        while len(self.chunks()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # anything extra would arrive now
        return self.chunks()


@pytest.fixture
def device(mosquitto: MosquittoBroker, release: PublishedRelease) -> Iterator[Device]:
    dev = Device(mosquitto, "dev-1", release)
    yield dev
    dev.mqtt.close()


def _payload(release: PublishedRelease, kind: PayloadKind) -> Payload:
    return next(p for p in release.meta.payloads if p.kind is kind)


def _wait_stats(server: ReleaseServer, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not pred(stats := server.stats()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return stats


def test_a_request_for_every_chunk_gets_each_once_and_they_reassemble_the_payload(
    server: ReleaseServer, device: Device, release: PublishedRelease
) -> None:
    full = _payload(release, PayloadKind.FULL)
    assert full.chunk_count > 100
    device.request(full, range(full.chunk_count))
    chunks = device.wait_chunks(full.chunk_count)
    assert sorted(c.index for c in chunks) == list(range(full.chunk_count))  # each exactly once
    assert {(c.release_id, c.payload_id) for c in chunks} == {(release.meta.release_id, full.id)}
    data = b"".join(c.data for c in sorted(chunks, key=lambda c: c.index))
    assert hashlib.sha256(data).hexdigest() == full.sha256 == release.meta.target_sha256
    assert server.flush(5)
    stats = server.stats()
    assert (stats["chunks_published"], stats["first_sends"], stats["resends"], stats["requests"]) == (
        full.chunk_count, full.chunk_count, 0, 1)
    assert stats["bytes_published"] == stats["per_payload"][full.id]["bytes_published"] > full.size
    assert stats["rejected"] == {}


def test_a_partial_request_gets_only_those_chunks_and_the_delta_reassembles(
    server: ReleaseServer, device: Device, release: PublishedRelease
) -> None:
    full, delta = _payload(release, PayloadKind.FULL), _payload(release, PayloadKind.DELTA)
    wanted = [0, 7, 100, full.chunk_count - 1]
    device.request(full, wanted)
    device.request(delta, range(delta.chunk_count))
    chunks = device.wait_chunks(len(wanted) + delta.chunk_count)
    assert sorted(c.index for c in chunks if c.payload_id == full.id) == wanted
    got = sorted((c for c in chunks if c.payload_id == delta.id), key=lambda c: c.index)
    assert [c.index for c in got] == list(range(delta.chunk_count))
    assert hashlib.sha256(b"".join(c.data for c in got)).hexdigest() == delta.sha256
    assert server.stats()["chunks_published"] == len(wanted) + delta.chunk_count


def test_two_devices_asking_at_once_share_one_publish_per_chunk(
    server: ReleaseServer, device: Device, mosquitto: MosquittoBroker, release: PublishedRelease
) -> None:
    other = Device(mosquitto, "dev-2", release)
    try:
        full = _payload(release, PayloadKind.FULL)
        device.request(full, range(full.chunk_count))
        other.request(full, range(full.chunk_count))
        for dev in (device, other):
            assert sorted(c.index for c in dev.wait_chunks(full.chunk_count)) == list(range(full.chunk_count))
    finally:
        other.mqtt.close()
    stats = server.stats()
    assert (stats["chunks_published"], stats["resends"], stats["requests"]) == (full.chunk_count, 0, 2)


def test_bad_requests_are_counted_logged_once_and_do_not_stop_the_server(
    server: ReleaseServer, device: Device, release: PublishedRelease, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgeops.release_server")
    full = _payload(release, PayloadKind.FULL)
    rid, n = release.meta.release_id, full.chunk_count
    stray_bit = json.loads(encode_repair(rid, full.id, n, []))
    stray_bit["missing"] = base64.b64encode(b"\0" * (n // 8) + b"\xff").decode()  # bits past the chunk count
    bad = [
        b"not json",
        b"{}",
        json.dumps(stray_bit).encode(),
        encode_repair(rid, full.id, n + 1, [0]),  # a bitmap for another chunk count
        encode_repair("digits-9.9.9-x86-gateway", full.id, n, [0]),  # a release nobody serves
        encode_repair(rid, "0123456789abcdef", n, [0]),  # a payload the release does not have
        b" " * (MAX_REPAIR_BYTES + 1),
    ]
    for raw in bad:
        device.mqtt.publish(device.ota, raw)
    stats = _wait_stats(server, lambda s: sum(s["rejected"].values()) == len(bad))
    assert stats["rejected"] == {"malformed": 4, "oversized": 1, "unknown-release": 2}
    assert stats["chunks_published"] == stats["requests"] == 0
    logged = [r.getMessage() for r in caplog.records if "dev-1" in r.getMessage()]
    assert len(logged) == 3  # once per device and reason
    device.request(full, [3, 4])
    assert sorted(c.index for c in device.wait_chunks(2)) == [3, 4]


def test_retained_metadata_reaches_a_late_subscriber_also_after_a_broker_restart(
    mosquitto: MosquittoBroker, release: PublishedRelease, keys_dir: Path
) -> None:
    topic = release_topics(FLEET, release.meta.release_id).manifest
    srv = ReleaseServer(parse_broker_url(mosquitto.url), FLEET, [], client_id="late-server")
    srv.start()
    try:
        srv.add_release(release)  # a running server takes a new release
        assert srv.flush(5)
        for attempt in (1, 2):
            reconnected = _wait_stats(srv, lambda s, n=attempt: s["connects"] == n and s["connected"])
            assert reconnected["connects"] == attempt
            assert srv.flush(5)
            late = Collector(mosquitto.host, mosquitto.port, [topic], client_id=f"late-{attempt}")
            try:
                late.wait_for("/manifest", lambda d: True, timeout=10)
                assert late.messages == [(topic, release.signed, True)]  # retained
            finally:
                late.close()
            assert parse_release(release.signed, [load_public_key(keys_dir / "signing.pub")]) == release.meta
            mosquitto.restart()  # no persistence: the broker forgets the retained message; the server re-sends it
    finally:
        srv.stop()


def test_cli_publish_with_broker_announces_and_deploy_sends_a_verifiable_command(
    mosquitto: MosquittoBroker, built: dict[str, Path], keys_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = keys_dir / "signing.key", keys_dir / "signing.pub"
    assert main(["release", "publish", str(built["v1.1"]), "--base", str(built["v1"]), "--fleet", FLEET,
                 "--key", str(key), "--store", str(tmp_path / "store"), "--broker", mosquitto.url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["published"] is True and doc["manifest_topic"].endswith(f"/release/{doc['release_id']}/manifest")
    signed = (tmp_path / "store" / doc["release_id"] / "release.signed").read_bytes()
    dev = Collector(mosquitto.host, mosquitto.port, [doc["manifest_topic"], device_topics(FLEET, "dev-1").cmd],
                    client_id="cli-device")
    try:
        dev.wait_for("/manifest", lambda d: True)
        assert [p for t, p, r in dev.messages if t.endswith("/manifest")] == [signed]
        deploy = ["deploy", "--release", doc["release_id"], "--device", "dev-1", "--fleet", FLEET,
                  "--key", str(key), "--broker", mosquitto.url]
        assert main(deploy) == 0
        assert "sent ota-update digits-1.1.0-x86-gateway (version 1.1.0) to device/dev-1" in capsys.readouterr().out
        raw = dev.wait_for("/cmd", lambda d: True)
        command = parse_command(json.dumps(raw).encode(), [load_public_key(pub)])
        assert (command.name, command.args, command.target, command.fleet) == (
            CommandName.OTA_UPDATE, {"release_id": doc["release_id"]}, "device/dev-1", FLEET)
        # a release that is not announced: nothing is sent
        assert main([*deploy[:2], "digits-9.9.9-x86-gateway", *deploy[3:]]) == 1
        assert "is not announced" in capsys.readouterr().err
        assert len(dev.json("/cmd")) == 1
    finally:
        dev.close()


def _answer_commands(dev: Collector, event_topic: str, event: dict[str, Any], stop: threading.Event) -> None:
    """Act as the agent: answer the first command with ``event``, after an event about another install."""
    while not stop.is_set():
        if dev.json("/cmd"):
            dev.publish(event_topic, json.dumps({"type": "install.succeeded", "version": "1.0.0"}).encode())
            dev.publish(event_topic, json.dumps(event).encode())
            return
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("event", "code", "expected"),
    [
        ({"type": "install.succeeded", "version": "1.1.0", "previous": "1.0.0"}, 0, "install.succeeded\n"),
        ({"type": "ota.failed", "release_id": "digits-1.1.0-x86-gateway", "reason": "result-mismatch"}, 1,
         "edgeops: error: ota.failed: result-mismatch\n"),
    ],
)
def test_cli_deploy_wait_reports_the_devices_outcome(
    server: ReleaseServer, mosquitto: MosquittoBroker, keys_dir: Path, release: PublishedRelease,
    capsys: pytest.CaptureFixture[str], event: dict[str, Any], code: int, expected: str
) -> None:
    topics = device_topics(FLEET, "dev-1")
    assert server.flush(5)
    dev = Collector(mosquitto.host, mosquitto.port, [topics.cmd], client_id="waiting-device")
    stop = threading.Event()
    agent = threading.Thread(target=_answer_commands, args=(dev, topics.event, event, stop))
    agent.start()
    try:
        rc = main(["deploy", "--release", release.meta.release_id, "--device", "dev-1", "--fleet", FLEET,
                   "--key", str(keys_dir / "signing.key"), "--broker", mosquitto.url, "--wait", "10"])
    finally:
        stop.set()
        agent.join()
        dev.close()
    out = capsys.readouterr()
    assert rc == code
    assert (out.out if code == 0 else out.err).endswith(expected)


def test_cli_serve_answers_repairs_and_prints_stats(
    mosquitto: MosquittoBroker, built: dict[str, Path], release: PublishedRelease, device: Device,
    capsys: pytest.CaptureFixture[str]
) -> None:
    result: list[int] = []
    serving = threading.Thread(target=lambda: result.append(main(
        ["release", "serve", "--fleet", FLEET, "--store", str(built["store"]), "--broker", mosquitto.url,
         "--duration", "3", "--json"])))
    serving.start()
    delta = _payload(release, PayloadKind.DELTA)
    manifest = Collector(mosquitto.host, mosquitto.port, [release_topics(FLEET, release.meta.release_id).manifest],
                         client_id="serve-watcher")
    try:
        manifest.wait_for("/manifest", lambda d: True)  # the server is up and announced the release
        device.request(delta, range(delta.chunk_count))
        assert len(device.wait_chunks(delta.chunk_count)) == delta.chunk_count
    finally:
        manifest.close()
        serving.join()
    assert result == [0]
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert (stats["releases"], stats["chunks_published"], stats["requests"]) == (1, delta.chunk_count, 1)
