"""The broker enforces the PKI: a real mosquitto runs the configuration `edgeops pki init` wrote (mutual TLS, CRL,
ACL) and paho clients made by ``edgeops.mqtt_client.new_mqtt_client`` with issued certificates try what a stolen
or buggy device would. mosquitto 2.0.11 answers a refused QoS 1 publish with PUBACK "Not authorized" (0x87) and
drops it; its acl_file grants every SUBACK and filters on delivery, so subscriptions are judged by what arrives.

"Nothing arrived" is proven without sleeping: the forbidden messages are published first, then a sentinel on an
allowed topic; MQTT keeps one publisher's order, so once the sentinel is in, anything before it would be too.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeops.errors import TransportError
from edgeops.mqtt_client import new_mqtt_client
from edgeops.pki import IssuedPaths, PkiLayout, init_pki, issue_device, revoke_device
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_for

FLEET = "acme"
ROOT = f"edgeops/v1/{FLEET}"
NOT_AUTHORIZED = 0x87
ACCEPTED = (0x00, 0x10)  # PUBACK success, "no matching subscribers"
TIMEOUT = 10.0


def dev(device_id: str, leaf: str) -> str:
    return f"{ROOT}/device/{device_id}/{leaf}"


class Peer:
    """One paho client with a certificate; records CONNACK, PUBACK reason codes and messages."""

    def __init__(self, broker: MosquittoBroker, ca: Path, cert: Path | None, key: Path | None, *,
                 client_id: str, will: tuple[str, bytes] | None = None, session_expiry_s: int = 0) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.connack: ReasonCode | None = None
        self.disconnected = threading.Event()
        self.error: BaseException | None = None
        if cert is None:
            self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
            self.client.tls_set(ca_certs=str(ca))
        else:
            self.client = new_mqtt_client(client_id, tls=True, ca_certs=ca, cert_file=cert, key_file=key)
        self.client.reconnect_delay_set(60, 120)  # a dropped peer stays away: no flapping during a test
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        props = None
        if session_expiry_s:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s
        try:
            self.client.connect(broker.host, broker.port, clean_start=not session_expiry_s, properties=props)
        except (ssl.SSLError, OSError) as exc:  # a handshake refused while connecting (TLS 1.2)
            self.error = exc
            return
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.connack = reason

    @property
    def connected(self) -> bool:
        return self.connack is not None and not self.connack.is_failure and not self.disconnected.is_set()

    def wait_connected(self) -> None:
        wait_for("CONNACK", lambda: self.connack is not None or self.error or self.disconnected.is_set(), TIMEOUT)
        assert self.connected, f"not connected: {self.connack} {self.error}"

    def refused(self) -> bool:
        """True once the broker refused this client (TLS handshake, CONNACK failure or a closed connection)."""
        wait_for("the broker's answer", lambda: self.connack is not None or self.error or self.disconnected.is_set(),
                 TIMEOUT)
        return not self.connected

    def publish(self, topic: str, payload: bytes = b"{}", *, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_for(f"PUBACK on {topic}", lambda: info.mid in self.pubacks, TIMEOUT)
        return int(self.pubacks[info.mid].value)

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        assert done.wait(TIMEOUT), f"no SUBACK for {topics}"

    def got(self, topic: str) -> list[bytes]:
        return [p for t, p in list(self.messages) if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fleet") / "pki"
    init_pki(d, fleet=FLEET)
    issue_device(d, "dev-a", groups=["g1", "g2"])
    issue_device(d, "dev-b", groups=["g3"])
    return d


@pytest.fixture(scope="module")
def broker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker.tls(tmp_path_factory.mktemp("mosquitto"), pki)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def peers(broker: MosquittoBroker, pki: Path) -> Iterator[Any]:
    made: list[Peer] = []

    def connect(name: str, *, client_id: str | None = None, expect: bool = True, **kw: Any) -> Peer:
        layout = PkiLayout.of(pki)
        if name == "fleet":
            cert, key = layout.fleet_cert, layout.fleet_key
        else:
            cert, key = pki / "devices" / name / "device.crt", pki / "devices" / name / "device.key"
        peer = Peer(broker, layout.ca_cert, cert, key, client_id=client_id or f"{name}-{len(made)}", **kw)
        made.append(peer)
        if expect:
            peer.wait_connected()
        return peer

    yield connect
    for p in made:
        p.close()


def test_device_publishes_its_own_topics_and_the_fleet_receives_them(peers: Any) -> None:
    fleet = peers("fleet")
    fleet.subscribe(f"{ROOT}/device/+/#")
    a = peers("dev-a")
    for leaf in ("state", "telemetry", "event", "ota"):
        assert a.publish(dev("dev-a", leaf), leaf.encode()) in ACCEPTED
    wait_for("the fleet to receive dev-a's four topics", lambda: len(fleet.messages) == 4, TIMEOUT)
    assert sorted(p for _, p in fleet.messages) == [b"event", b"ota", b"state", b"telemetry"]


def test_device_cannot_publish_as_another_device(peers: Any) -> None:
    fleet = peers("fleet")
    fleet.subscribe(f"{ROOT}/#")
    a = peers("dev-a")
    for leaf in ("telemetry", "state", "event", "ota"):
        assert a.publish(dev("dev-b", leaf), b'{"forged": true}') == NOT_AUTHORIZED, leaf
    assert a.publish(dev("dev-a", "telemetry"), b"sentinel") in ACCEPTED
    wait_for("the sentinel", lambda: fleet.got(dev("dev-a", "telemetry")), TIMEOUT)
    assert [t for t, _ in fleet.messages] == [dev("dev-a", "telemetry")]


def test_device_cannot_forge_commands_releases_or_trust_metadata(peers: Any) -> None:
    fleet = peers("fleet")
    fleet.subscribe(f"{ROOT}/#")
    a = peers("dev-a")
    for topic in (dev("dev-a", "cmd"), dev("dev-b", "cmd"), f"{ROOT}/group/g1/cmd", f"{ROOT}/group/g3/cmd",
                  f"{ROOT}/release/r1/manifest", f"{ROOT}/release/r1/chunk", f"{ROOT}/trust/timestamp",
                  f"{ROOT}/trust/root/2", f"{ROOT}/alerts", "edgeops/v1/other-fleet/device/dev-a/state"):
        assert a.publish(topic, b"forged", retain=True) == NOT_AUTHORIZED, topic
    assert a.publish(dev("dev-a", "event"), b"sentinel") in ACCEPTED
    wait_for("the sentinel", lambda: fleet.got(dev("dev-a", "event")), TIMEOUT)
    assert [t for t, _ in fleet.messages] == [dev("dev-a", "event")]


def test_device_reads_its_commands_its_groups_releases_and_trust_only(peers: Any) -> None:
    fleet = peers("fleet")
    release, trust = f"{ROOT}/release/r1/manifest", f"{ROOT}/trust/timestamp"
    assert fleet.publish(release, b"meta", retain=True) in ACCEPTED
    assert fleet.publish(trust, b"ts", retain=True) in ACCEPTED
    a = peers("dev-a")
    a.subscribe(dev("dev-a", "cmd"), dev("dev-b", "cmd"), f"{ROOT}/group/g1/cmd", f"{ROOT}/group/g2/cmd",
                f"{ROOT}/group/g3/cmd", f"{ROOT}/release/#", f"{ROOT}/trust/#", f"{ROOT}/device/+/telemetry")
    wait_for("the retained release and trust metadata", lambda: a.got(release) and a.got(trust), TIMEOUT)
    for topic in (dev("dev-b", "cmd"), f"{ROOT}/group/g3/cmd", dev("dev-b", "telemetry"), f"{ROOT}/group/g1/cmd",
                  f"{ROOT}/group/g2/cmd", dev("dev-a", "cmd")):
        assert fleet.publish(topic, topic.encode()) in ACCEPTED
    wait_for("dev-a's own command (sent last)", lambda: a.got(dev("dev-a", "cmd")), TIMEOUT)
    assert sorted(t for t, _ in a.messages) == sorted([release, trust, f"{ROOT}/group/g1/cmd",
                                                       f"{ROOT}/group/g2/cmd", dev("dev-a", "cmd")])


def test_wildcard_subscription_leaks_nothing(peers: Any) -> None:
    a = peers("dev-a")
    a.subscribe("#", f"{ROOT}/#", "$SYS/#")
    fleet, b = peers("fleet"), peers("dev-b")
    assert b.publish(dev("dev-b", "telemetry"), b"secret") in ACCEPTED
    assert fleet.publish(dev("dev-b", "cmd"), b"secret") in ACCEPTED
    assert fleet.publish(f"{ROOT}/alerts", b"secret") in ACCEPTED
    assert fleet.publish(dev("dev-a", "cmd"), b"sentinel") in ACCEPTED
    wait_for("the sentinel", lambda: a.got(dev("dev-a", "cmd")), TIMEOUT)
    assert all(p != b"secret" for _, p in a.messages), a.messages


def test_fleet_ingest_shared_subscription_receives_every_device(peers: Any) -> None:
    shared = f"$share/edgeops-ingest/{ROOT}/device/+/telemetry"
    workers = [peers("fleet"), peers("fleet")]
    for w in workers:
        w.subscribe(shared)
    a, b = peers("dev-a"), peers("dev-b")
    for i in range(10):
        assert a.publish(dev("dev-a", "telemetry"), b"a%d" % i) in ACCEPTED
        assert b.publish(dev("dev-b", "telemetry"), b"b%d" % i) in ACCEPTED
    wait_for("20 telemetry messages over the workers", lambda: sum(len(w.messages) for w in workers) == 20, TIMEOUT)
    assert sorted(p for w in workers for _, p in w.messages) == sorted([b"a%d" % i for i in range(10)]
                                                                      + [b"b%d" % i for i in range(10)])


def _drop(peer: Peer) -> None:
    """Vanish without a DISCONNECT (as a crashed device does): the broker sends the peer's will."""
    peer.client.loop_stop()
    sock = peer.client.socket()
    assert sock is not None
    sock.close()


def test_last_will_is_published_only_on_the_devices_own_state(peers: Any, broker: MosquittoBroker) -> None:
    fleet = peers("fleet")
    fleet.subscribe(f"{ROOT}/device/+/state")
    spoof = peers("dev-a", client_id="spoof", will=(dev("dev-b", "state"), b'{"online": false, "spoof": 1}'))
    honest = peers("dev-a", client_id="honest", will=(dev("dev-a", "state"), b'{"online": false}'))
    _drop(spoof)
    wait_for("mosquitto to handle the dropped connection",
             lambda: "Client spoof closed its connection" in broker.log_path.read_text(), TIMEOUT)
    _drop(honest)
    wait_for("dev-a's own will", lambda: fleet.got(dev("dev-a", "state")), TIMEOUT)
    assert fleet.got(dev("dev-b", "state")) == []


def test_no_certificate_foreign_ca_or_plain_mqtt_cannot_connect(broker: MosquittoBroker, pki: Path,
                                                                tmp_path: Path) -> None:
    ca = pki / "ca.crt"
    anonymous = Peer(broker, ca, None, None, client_id="anon")
    assert anonymous.refused()
    evil = tmp_path / "evil"
    init_pki(evil, fleet=FLEET)
    forged = issue_device(evil, "dev-a")  # same CN as a real device, other CA
    impostor = Peer(broker, ca, forged.cert, forged.key, client_id="impostor")
    assert impostor.refused()
    evil_fleet = Peer(broker, ca, evil / "fleet.crt", evil / "fleet.key", client_id="impostor-fleet")
    assert evil_fleet.refused()
    assert _plain_mqtt_refused(broker)
    for p in (anonymous, impostor, evil_fleet):
        p.close()


def _plain_mqtt_refused(broker: MosquittoBroker) -> bool:
    """A plain (non-TLS) MQTT client against the TLS listener: the connect fails or the broker drops it."""
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5)
    connack, gone = threading.Event(), threading.Event()
    plain.on_connect = lambda *a: connack.set()
    plain.on_disconnect = lambda *a: gone.set()
    plain.reconnect_delay_set(60, 120)
    try:
        plain.connect(broker.host, broker.port)
    except OSError:
        return True
    plain.loop_start()
    try:
        wait_for("the broker to drop the plain connection", gone.is_set, TIMEOUT)
        return not connack.is_set()
    finally:
        plain.loop_stop()


def test_client_id_takeover_gets_no_messages(peers: Any) -> None:
    """A stolen device certificate can use another device's client id (mosquitto's acl_file does not bind client
    ids): the victim is disconnected (a known limit, docs/pki.md), but the thief gets none of its messages."""
    victim_id = f"edgeops-{FLEET}-dev-b"
    b = peers("dev-b", client_id=victim_id, session_expiry_s=3600)
    b.subscribe(dev("dev-b", "cmd"))
    thief = peers("dev-a", client_id=victim_id, session_expiry_s=3600)
    wait_for("the victim to be disconnected", b.disconnected.is_set, TIMEOUT)
    fleet = peers("fleet")
    thief.subscribe(dev("dev-a", "cmd"))  # beside dev-b's subscription, taken over with its session
    assert fleet.publish(dev("dev-b", "cmd"), b"for dev-b only") in ACCEPTED
    assert fleet.publish(dev("dev-a", "cmd"), b"sentinel") in ACCEPTED
    wait_for("the sentinel", lambda: thief.got(dev("dev-a", "cmd")), TIMEOUT)
    assert thief.got(dev("dev-b", "cmd")) == []


def test_revoked_device_is_refused_after_reload_and_restart(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, fleet=FLEET)
    paths = issue_device(pki, "dev-c")
    broker = MosquittoBroker.tls(tmp_path / "mosquitto", pki)
    broker.start()
    opened: list[Peer] = []

    def connect(p: IssuedPaths, client_id: str) -> Peer:
        opened.append(Peer(broker, pki / "ca.crt", p.cert, p.key, client_id=client_id))
        return opened[-1]

    try:
        live = connect(paths, "c-live")
        live.wait_connected()
        assert live.publish(dev("dev-c", "telemetry")) in ACCEPTED
        revoke_device(pki, "dev-c")
        before_reload = connect(paths, "c-before-reload")  # mosquitto reads the CRL at start and on SIGHUP only
        before_reload.wait_connected()
        broker.reload()
        wait_for("the reloaded ACL to deny the open connection",
                 lambda: live.publish(dev("dev-c", "telemetry")) == NOT_AUTHORIZED, TIMEOUT, poll_s=0.2)
        assert connect(paths, "c-after-reload").refused()
        broker.restart()
        assert connect(paths, "c-after-restart").refused()
    finally:
        for p in opened:
            p.close()
        broker.stop()


def test_tls_needs_a_loadable_certificate_and_key(pki: Path, tmp_path: Path) -> None:
    layout = PkiLayout.of(pki)
    other = tmp_path / "other.key"
    other.write_bytes(layout.broker_key.read_bytes())
    other.chmod(0o600)
    with pytest.raises(TransportError, match="cannot set up TLS"):
        new_mqtt_client("x", tls=True, ca_certs=layout.ca_cert, cert_file=layout.fleet_cert, key_file=other)
    with pytest.raises(TransportError, match="mqtts://"):
        new_mqtt_client("x", tls=False, cert_file=layout.fleet_cert, key_file=layout.fleet_key)


# --- the agent over mutual TLS --------------------------------------------------------------------------------------


def _agent_config(tmp_path: Path, broker: MosquittoBroker, device: IssuedPaths, keys_dir: Path) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-a"\nfleet = "{FLEET}"\nprofile = "x86-gateway"\ngroups = ["g1", "g2"]\n'
        f'data_dir = "{tmp_path / "data"}"\ntrusted_keys = ["{keys_dir / "signing.pub"}"]\n'
        f'[broker]\nurl = "{broker.tls_url}"\nca_file = "{device.ca_cert}"\ncert_file = "{device.cert}"\n'
        f'key_file = "{device.key}"\n[api]\naddress = ""\n[telemetry]\ninterval_s = 60\n'
    )
    return cfg


def test_agent_connects_over_mtls_and_its_will_reaches_the_fleet(
    broker: MosquittoBroker, pki: Path, peers: Any, keys_dir: Path, tmp_path: Path
) -> None:
    fleet = peers("fleet")
    fleet.subscribe(dev("dev-a", "state"))
    device = IssuedPaths(pki / "devices/dev-a/device.key", pki / "devices/dev-a/device.crt", pki / "ca.crt")
    cfg = _agent_config(tmp_path, broker, device, keys_dir)
    proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the agent's online state", lambda: b'"online":true' in b"".join(fleet.got(dev("dev-a", "state"))),
                 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for("the last will", lambda: b"connection lost" in fleet.got(dev("dev-a", "state"))[-1], 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_agent_refuses_to_start_with_a_readable_tls_key(
    broker: MosquittoBroker, pki: Path, keys_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "dev-a"
    folder.mkdir()
    device = IssuedPaths(folder / "device.key", folder / "device.crt", pki / "ca.crt")
    device.cert.write_bytes((pki / "devices/dev-a/device.crt").read_bytes())
    device.key.write_bytes((pki / "devices/dev-a/device.key").read_bytes())
    os.chmod(device.key, 0o644)  # as a careless `cp` or `scp` leaves it
    cfg = _agent_config(tmp_path, broker, device, keys_dir)
    out = subprocess.run([sys.executable, "-m", "device_agent.cli", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln.lower()]
    assert out.returncode == 1
    assert errors == [f"edgeops-agent: error: private key {device.key} is accessible by group or others "
                      f"(mode 0644); run `chmod 600 {device.key}`"], out.stderr


def test_operator_cli_sends_commands_over_mtls(
    broker: MosquittoBroker, pki: Path, peers: Any, keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeops.cli.main import main
    from edgeops.pki import issue_client

    ci = issue_client(pki, "ci-ops")
    broker.reload()  # the new identity's ACL block
    a = peers("dev-a")
    a.subscribe(dev("dev-a", "cmd"))
    argv = ["command", "send", "status", "--device", "dev-a", "--fleet", FLEET, "--key", str(keys_dir / "signing.key"),
            "--broker", broker.tls_url, "--ca", str(pki / "ca.crt"), "--cert", str(ci.cert), "--cert-key", str(ci.key)]
    wait_for("the reloaded ACL to let ci-ops publish", lambda: main(argv) == 0 and a.got(dev("dev-a", "cmd")),
             TIMEOUT, poll_s=0.2)
    assert b'"signatures"' in a.got(dev("dev-a", "cmd"))[0]
    ci.key.chmod(0o644)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgeops: error: private key") and "chmod 600" in err and len(err.splitlines()) == 1
