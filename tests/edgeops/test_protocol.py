"""edgeops.protocol: topics, the signed command envelope, and `edgeops command send` against a real mosquitto."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeops.errors import CommandRejected
from edgeops.protocol import (
    MAX_COMMAND_BYTES,
    BrokerAddress,
    CommandName,
    RejectReason,
    device_topics,
    group_cmd_topic,
    parse_broker_url,
    parse_command,
    peek_nonce,
    sign_command,
    validate_segment,
)
from edgeops.signing import generate_keypair, key_id, load_private_key, load_public_key

ROOT = Path(__file__).resolve().parents[2]
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
TRUSTED = [KEY.public_key()]
NOW = 1_700_000_000.0
VALID_ARGS: dict[CommandName, dict[str, Any]] = {
    CommandName.STATUS: {},
    CommandName.PROMOTE_SHADOW: {},
    CommandName.DROP_SHADOW: {},
    CommandName.ROLLBACK: {},
    CommandName.SET_TELEMETRY_INTERVAL: {"interval_s": 30},
    CommandName.INSTALL_FROM_FILE: {"path": "/opt/models/digits-1.1.0-rpi4.edgeops"},
    CommandName.OTA_UPDATE: {"release_id": "digits-1.1.0-rpi4"},
}


def _signed(name: str = "status", args: dict[str, Any] | None = None, **kw: Any) -> bytes:
    opts: dict[str, Any] = {"fleet": "acme", "target": "device/pi-1", "now": NOW} | kw
    return sign_command(KEY, name=name, args=args or {}, **opts)


def _payload(**overrides: Any) -> dict[str, Any]:
    doc = {
        "cmd": "status",
        "args": {},
        "fleet": "acme",
        "target": "device/pi-1",
        "nonce": "0123456789abcdef",
        "issued_at": NOW,
        "expires_at": NOW + 300,
    }
    return doc | overrides


def _envelope(payload: bytes, *, signer: Ed25519PrivateKey = KEY, sigs: list[dict[str, Any]] | None = None) -> bytes:
    """An envelope around ``payload`` signed by ``signer`` (or carrying exactly ``sigs``)."""
    if sigs is None:
        sigs = [{"keyid": key_id(signer.public_key()), "sig": base64.b64encode(signer.sign(payload)).decode()}]
    return json.dumps({"v": 1, "payload": base64.b64encode(payload).decode(), "signatures": sigs}).encode()


def _reason(raw: bytes) -> str:
    with pytest.raises(CommandRejected) as info:
        parse_command(raw, TRUSTED)
    return info.value.reason


# --- topics and names -------------------------------------------------------------------------------------------


def test_topics_follow_the_design_namespace() -> None:
    t = device_topics("acme", "pi-kitchen-01")
    base = "edgeops/v1/acme/device/pi-kitchen-01"
    assert (t.state, t.telemetry, t.event, t.cmd, t.ota) == (
        f"{base}/state",
        f"{base}/telemetry",
        f"{base}/event",
        f"{base}/cmd",
        f"{base}/ota",
    )
    assert group_cmd_topic("acme", "canary") == "edgeops/v1/acme/group/canary/cmd"


@pytest.mark.parametrize("bad", ["", "+", "#", "a/b", "pi+1", "x#", "a b", "a\n", "é", "x" * 65])
def test_validate_segment_refuses_wildcards_separators_and_empty(bad: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        validate_segment(bad, "device id")
    with pytest.raises(ValueError):
        device_topics("acme", bad)
    with pytest.raises(ValueError):
        group_cmd_topic(bad, "canary")


def test_validate_segment_accepts_ordinary_names() -> None:
    assert validate_segment("pi-kitchen_01.eu", "device id") == "pi-kitchen_01.eu"
    assert validate_segment("x" * 64, "group") == "x" * 64


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("mqtt://127.0.0.1", BrokerAddress("127.0.0.1", 1883, False)),
        ("mqtts://broker.example.com", BrokerAddress("broker.example.com", 8883, True)),
        ("mqtt://localhost:11883/", BrokerAddress("localhost", 11883, False)),
        ("mqtts://[::1]:8884", BrokerAddress("::1", 8884, True)),
    ],
)
def test_parse_broker_url(url: str, want: BrokerAddress) -> None:
    assert parse_broker_url(url) == want


@pytest.mark.parametrize(
    "url", ["http://h", "mqtt://", "mqtt://h:99999", "mqtt://h:x", "mqtt://u:p@h", "mqtt://h/topic", "h:1883", ""]
)
def test_parse_broker_url_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        parse_broker_url(url)


# --- round trip and the signing side ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CommandName))
def test_round_trip_every_command(name: CommandName) -> None:
    raw = _signed(name.value, VALID_ARGS[name], target="group/canary", ttl_s=60, nonce="feedface12345678")
    cmd = parse_command(raw, [OTHER.public_key(), KEY.public_key()])
    assert cmd.name is name
    assert cmd.args == VALID_ARGS[name]
    assert (cmd.fleet, cmd.target, cmd.nonce) == ("acme", "group/canary", "feedface12345678")
    assert (cmd.issued_at, cmd.expires_at) == (NOW, NOW + 60)
    assert cmd.keyid == key_id(KEY.public_key())
    assert str(cmd.name) == name.value


def test_keys_from_files_round_trip(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path)
    raw = sign_command(load_private_key(priv), name="rollback", args={}, fleet="f", target="device/d", now=NOW)
    cmd = parse_command(raw, [load_public_key(pub)])
    assert cmd.name is CommandName.ROLLBACK
    assert len(cmd.nonce) == 32  # 16 random bytes, hex


def test_default_nonces_differ() -> None:
    nonces = {parse_command(_signed(), TRUSTED).nonce for _ in range(20)}
    assert len(nonces) == 20


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "reboot"}, "unknown command"),
        ({"name": "set-telemetry-interval", "args": {"interval_s": 0}}, "interval_s"),
        ({"name": "install-from-file", "args": {"path": "relative/x.edgeops"}}, "absolute"),
        ({"name": "status", "args": {"extra": 1}}, "takes arguments"),
        ({"fleet": "ac/me"}, "fleet"),
        ({"target": "pi-1"}, "target"),
        ({"target": "device/+"}, "device"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"nonce": "short"}, "nonce"),
    ],
)
def test_sign_command_refuses_misuse(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _signed(**kw)


# --- every reason parse_command can give ------------------------------------------------------------------------


def test_oversized() -> None:
    raw = _signed()[:-1] + b" " * (MAX_COMMAND_BYTES) + b"}"
    assert _reason(raw) == RejectReason.OVERSIZED


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'{"v": 1}',
        b'{"v": 2, "payload": "", "signatures": []}',
        b'{"v": true, "payload": "", "signatures": []}',
        b'{"v": 1, "payload": "!!!not base64", "signatures": []}',
        b'{"v": 1, "payload": 5, "signatures": []}',
        b'{"v": 1, "payload": "", "signatures": {}}',
        b'{"v": 1, "payload": "", "signatures": [{"keyid": "ab", "sig": "%%%"}]}',
        b'{"v": 1, "payload": "", "signatures": [], "v": 1}',
        b'{"v": 1, "payload": "", "signatures": [], "extra": 0}',
        b"[" * 50_000,
    ],
)
def test_malformed_envelopes(raw: bytes) -> None:
    assert _reason(raw) == RejectReason.MALFORMED


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        json.dumps(_payload(fleet="a/b")).encode(),
        json.dumps(_payload(target="everyone")).encode(),
        json.dumps(_payload(nonce=7)).encode(),
        json.dumps(_payload(issued_at="now")).encode(),
        json.dumps(_payload(expires_at=NOW - 1)).encode(),
        json.dumps(_payload(cmd=["status"])).encode(),
        json.dumps({k: v for k, v in _payload().items() if k != "nonce"}).encode(),
        json.dumps(_payload(extra=1)).encode(),
        json.dumps(_payload()).encode().replace(b"1700000300.0", b"1e999"),
        b'{"cmd": "status", "cmd": "rollback"}',
    ],
)
def test_malformed_payloads_signed_by_a_trusted_key(payload: bytes) -> None:
    assert _reason(_envelope(payload)) == RejectReason.MALFORMED


def test_unsigned() -> None:
    assert _reason(_envelope(json.dumps(_payload()).encode(), sigs=[])) == RejectReason.UNSIGNED


def test_signed_by_another_key_is_untrusted() -> None:
    raw = sign_command(OTHER, name="rollback", args={}, fleet="acme", target="device/pi-1", now=NOW)
    assert _reason(raw) == RejectReason.UNTRUSTED_KEY


def test_forged_payload_under_a_trusted_signature() -> None:
    good = json.loads(_signed())
    payload = json.loads(base64.b64decode(good["payload"]))
    payload["cmd"] = "rollback"
    good["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    assert _reason(json.dumps(good).encode()) == RejectReason.BAD_SIGNATURE


def test_other_keys_signature_claiming_a_trusted_keyid() -> None:
    payload = json.dumps(_payload()).encode()
    forged = {"keyid": key_id(KEY.public_key()), "sig": base64.b64encode(OTHER.sign(payload)).decode()}
    assert _reason(_envelope(payload, sigs=[forged])) == RejectReason.BAD_SIGNATURE
    short = {"keyid": key_id(KEY.public_key()), "sig": base64.b64encode(b"\x01" * 10).decode()}
    assert _reason(_envelope(payload, sigs=[short])) == RejectReason.BAD_SIGNATURE


def test_one_good_signature_among_several_is_enough() -> None:
    payload = json.dumps(_payload(cmd="drop-shadow")).encode()
    sigs = [
        {"keyid": key_id(OTHER.public_key()), "sig": base64.b64encode(OTHER.sign(payload)).decode()},
        {"keyid": key_id(KEY.public_key()), "sig": base64.b64encode(b"\x00" * 64).decode()},
        {"keyid": key_id(KEY.public_key()), "sig": base64.b64encode(KEY.sign(payload)).decode()},
    ]
    assert parse_command(_envelope(payload, sigs=sigs), TRUSTED).name is CommandName.DROP_SHADOW


def test_unknown_command() -> None:
    assert _reason(_envelope(json.dumps(_payload(cmd="reboot")).encode())) == RejectReason.UNKNOWN_COMMAND


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("status", {"verbose": True}),
        ("promote-shadow", {"force": 1}),
        ("drop-shadow", {"x": None}),
        ("rollback", {"to": "1.0.0"}),
        ("rollback", []),
        ("set-telemetry-interval", {}),
        ("set-telemetry-interval", {"interval_s": 0.5}),
        ("set-telemetry-interval", {"interval_s": 86401}),
        ("set-telemetry-interval", {"interval_s": "30"}),
        ("set-telemetry-interval", {"interval_s": True}),
        ("set-telemetry-interval", {"interval_s": 30, "jitter": 1}),
        ("install-from-file", {}),
        ("install-from-file", {"path": "models/x.edgeops"}),
        ("install-from-file", {"path": "/" + "a" * 4096}),
        ("install-from-file", {"path": "/tmp/x\u0000y"}),
        ("install-from-file", {"path": 42}),
        ("install-from-file", {"path": "/tmp/x.edgeops", "shadow": "yes"}),
        ("install-from-file", {"path": "/tmp/x.edgeops", "mode": "shadow"}),
    ],
)
def test_bad_args_for_each_command(name: str, args: Any) -> None:
    assert _reason(_envelope(json.dumps(_payload(cmd=name, args=args)).encode())) == RejectReason.BAD_ARGS


def test_peek_nonce_reads_the_unverified_nonce_for_rejection_events() -> None:
    forged = _envelope(json.dumps(_payload(nonce="abcdef0123456789")).encode(), signer=OTHER)
    assert _reason(forged) == RejectReason.UNTRUSTED_KEY
    assert peek_nonce(forged) == "abcdef0123456789"
    assert peek_nonce(_signed(nonce="feedface12345678")) == "feedface12345678"
    assert peek_nonce(b"garbage") is None
    assert peek_nonce(_envelope(json.dumps(_payload(nonce="a/b#c+d")).encode())) is None


# --- fuzz: any bytes, only ever CommandRejected -----------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_near = st.sampled_from(
    ["status", "set-telemetry-interval", "install-from-file", "acme", "device/pi-1", "group/x", "0123456789ab", 0, NOW]
)
_args = st.dictionaries(st.sampled_from(["interval_s", "path", "x"]), _json | _near, max_size=2)
_payload_docs = st.fixed_dictionaries(
    {
        "cmd": st.sampled_from([c.value for c in CommandName]) | _json,
        "args": _args | _json,
        **{k: st.just(v) | _json | _near for k, v in _payload().items() if k not in ("cmd", "args")},
    },
    optional={"x": _json},
)
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_rejected(raw: bytes) -> None:
    nonce = peek_nonce(raw)
    assert nonce is None or isinstance(nonce, str)
    try:
        parse_command(raw, TRUSTED)
    except CommandRejected as exc:
        assert exc.reason in {r.value for r in RejectReason}


@_FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    _only_rejected(raw)


@_FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["v", "payload", "signatures", "x"]),
        _json | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
        max_size=4,
    )
)
def test_fuzz_arbitrary_json_envelopes(doc: dict[str, Any]) -> None:
    _only_rejected(json.dumps(doc).encode())


@_FUZZ
@given(_json, st.lists(st.fixed_dictionaries({"keyid": _json, "sig": _json}), max_size=3))
def test_fuzz_envelope_fields(payload: Any, sigs: list[dict[str, Any]]) -> None:
    _only_rejected(json.dumps({"v": 1, "payload": payload, "signatures": sigs}).encode())


@_FUZZ
@given(_payload_docs | st.binary(max_size=256).map(lambda b: {"raw": b.hex()}))
def test_fuzz_payloads_signed_by_a_trusted_key(doc: dict[str, Any]) -> None:
    _only_rejected(_envelope(json.dumps(doc).encode()))


@_FUZZ
@given(st.binary(max_size=512))
def test_fuzz_signed_payload_bytes(payload: bytes) -> None:
    _only_rejected(_envelope(payload))


# --- `edgeops command send` through a real mosquitto ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private mosquitto on a free port; yields its mqtt:// URL."""
    port = _free_port()
    work = tmp_path_factory.mktemp("mosquitto")
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    log = work / "mosquitto.log"
    with log.open("wb") as sink:  # a file, not a pipe: a full pipe would stall the broker
        proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")], stderr=sink)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"mosquitto did not start: {log.read_text(errors='replace')}") from None
            time.sleep(0.02)
    yield f"mqtt://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


class _Listener:
    """A paho client subscribed to one topic; optionally answers each message with an event."""

    def __init__(self, url: str, topic: str, answer: Any = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[bytes] = []
        self.got = threading.Event()
        self._answer = answer
        subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        addr = parse_broker_url(url)
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(5), "no SUBACK"

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.messages.append(message.payload)
        self.got.set()
        if self._answer is not None:
            self._answer(client, message.payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeops.cli.main", "command", "send", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_command_send_publishes_a_command_the_device_accepts(broker: str, keys_dir: Path) -> None:
    topics = device_topics("acme", "pi-1")
    listener = _Listener(broker, topics.cmd)
    try:
        out = _cli(
            "set-telemetry-interval",
            *("--broker", broker, "--fleet", "acme", "--device", "pi-1"),
            *("--key", str(keys_dir / "signing.key"), "--arg", "interval_s=15", "--ttl", "120", "--json"),
        )
        assert out.returncode == 0, out.stderr
        assert listener.got.wait(5), "nothing arrived on the device's cmd topic"
    finally:
        listener.close()
    cmd = parse_command(listener.messages[0], [load_public_key(keys_dir / "signing.pub")])
    assert (cmd.name, cmd.args, cmd.fleet, cmd.target) == (
        CommandName.SET_TELEMETRY_INTERVAL,
        {"interval_s": 15},
        "acme",
        "device/pi-1",
    )
    assert 119 < cmd.expires_at - cmd.issued_at < 121
    report = json.loads(out.stdout)
    assert (report["nonce"], report["topic"], report["ok"]) == (cmd.nonce, topics.cmd, True)


def test_command_send_waits_for_the_devices_answer(broker: str, keys_dir: Path) -> None:
    topics = device_topics("acme", "pi-2")

    def reject(client: Any, raw: bytes) -> None:  # plays the agent: answers with the command's nonce
        nonce = parse_command(raw, [load_public_key(keys_dir / "signing.pub")]).nonce
        client.publish(topics.event, json.dumps({"type": "command.accepted", "nonce": "someone-else"}), qos=1)
        event = {"type": "command.rejected", "nonce": nonce, "reason": "bad-args", "detail": "no shadow"}
        client.publish(topics.event, json.dumps(event), qos=1)

    listener = _Listener(broker, topics.cmd, answer=reject)
    try:
        common = ("--broker", broker, "--fleet", "acme", "--key", str(keys_dir / "signing.key"))
        out = _cli("promote-shadow", *common, "--device", "pi-2", "--wait", "10")
        assert out.returncode == 1
        assert "command.rejected: bad-args" in out.stderr
        silent = _cli("status", *common, "--device", "pi-3", "--wait", "0.3")
        assert silent.returncode == 1
        assert "no answer from device/pi-3" in silent.stderr
    finally:
        listener.close()


def test_command_send_to_a_group_and_usage_errors(broker: str, keys_dir: Path) -> None:
    listener = _Listener(broker, group_cmd_topic("acme", "canary"))
    common = ("--broker", broker, "--fleet", "acme", "--key", str(keys_dir / "signing.key"))
    try:
        assert _cli("rollback", *common, "--group", "canary").returncode == 0
        assert listener.got.wait(5)
    finally:
        listener.close()
    assert parse_command(listener.messages[0], [load_public_key(keys_dir / "signing.pub")]).target == "group/canary"
    bad = _cli("set-telemetry-interval", *common, "--device", "pi-1", "--arg", "interval_s=0")
    assert bad.returncode == 2
    assert "interval_s" in bad.stderr
    down = _cli("status", "--broker", "mqtt://127.0.0.1:1", *common[2:], "--device", "pi-1")
    assert down.returncode == 1
    assert "cannot reach the broker" in down.stderr
