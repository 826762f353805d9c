"""The MQTT wire formats shared by the fleet side and the device (light core: stdlib + cryptography only).

Topics follow the namespace of docs/protocol.md (``edgeops/v1/{fleet}/device/{id}/...``). A fleet command is a
JSON envelope carrying the base64 of a JSON payload and one or more Ed25519 signatures over those exact payload
bytes (signing raw bytes avoids canonical-JSON pitfalls)::

    {"v": 1, "payload": "<base64>", "signatures": [{"keyid": "<hex sha256 of raw pubkey>", "sig": "<base64>"}]}
    payload = {"cmd", "args", "fleet", "target", "nonce", "issued_at", "expires_at"}

Guarantees: :func:`parse_command` returns a :class:`Command` only when the envelope is well-formed, at most
:data:`MAX_COMMAND_BYTES` long, signed by one of the trusted keys, and names a known command with arguments
valid for it; for *any* other bytes it raises :class:`CommandRejected` with a :class:`RejectReason` code and
nothing else. It does not check fleet, target, time or replay: that is the device's
:class:`device_agent.command_guard.CommandGuard`, which knows who and when it is.

A caller's misuse on the signing side (unknown command, bad arguments, bad names) is a ``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeops import bounded_json
from edgeops.errors import CommandRejected, SignatureError
from edgeops.signing import key_id, sign, verify_signature

__all__ = [
    "MAX_COMMAND_BYTES",
    "TOPIC_ROOT",
    "BrokerAddress",
    "Command",
    "CommandName",
    "DeviceTopics",
    "RejectReason",
    "ReleaseTopics",
    "alert_topic",
    "device_target",
    "device_topics",
    "group_cmd_topic",
    "group_target",
    "open_envelope",
    "ota_request_filter",
    "parse_broker_url",
    "parse_command",
    "peek_nonce",
    "release_topics",
    "seal_envelope",
    "sign_command",
    "validate_args",
    "validate_segment",
]

TOPIC_ROOT = "edgeops/v1"
ENVELOPE_VERSION = 1
MAX_COMMAND_BYTES = 64 * 1024
MAX_DETAIL_CHARS = 200  # of a rejection detail (it goes on the event topic)
MAX_SIGNATURES = 8  # signatures one envelope may carry
MAX_PATH_CHARS = 4096  # install-from-file path
MIN_INTERVAL_S, MAX_INTERVAL_S = 1.0, 86400.0  # set-telemetry-interval bounds, seconds
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # no leading dot: segments become file names
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{8,128}")
_PAYLOAD_KEYS = frozenset({"cmd", "args", "fleet", "target", "nonce", "issued_at", "expires_at"})


class _WireEnum(str, Enum):
    """A str enum whose str() and format() give the wire value (``enum.StrEnum`` for Python 3.10)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class CommandName(_WireEnum):
    STATUS = "status"
    PROMOTE_SHADOW = "promote-shadow"
    DROP_SHADOW = "drop-shadow"
    ROLLBACK = "rollback"
    SET_TELEMETRY_INTERVAL = "set-telemetry-interval"
    INSTALL_FROM_FILE = "install-from-file"
    OTA_UPDATE = "ota-update"  # fetch a release over MQTT (edgeops.release) and install it


class RejectReason(_WireEnum):
    """Why a command was refused; the value goes on the device's event topic."""

    MALFORMED = "malformed"  # not the envelope/payload structure or types
    OVERSIZED = "oversized"  # more than MAX_COMMAND_BYTES
    UNSIGNED = "unsigned"  # no signature at all
    UNTRUSTED_KEY = "untrusted-key"  # signed, but by no key this device trusts
    BAD_SIGNATURE = "bad-signature"  # a trusted key id, but the signature does not match
    WRONG_FLEET = "wrong-fleet"
    WRONG_TARGET = "wrong-target"  # neither this device nor one of its groups
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"  # issued in the future beyond the allowed clock skew
    TTL_TOO_LONG = "ttl-too-long"
    REPLAYED = "replayed"  # nonce already seen
    UNKNOWN_COMMAND = "unknown-command"
    BAD_ARGS = "bad-args"


@dataclass(frozen=True)
class Command:
    """A command whose envelope, signature, name and arguments have been checked."""

    name: CommandName
    args: dict[str, Any]
    fleet: str
    target: str  # "device/<id>" or "group/<g>"
    nonce: str
    issued_at: float  # seconds since the epoch
    expires_at: float  # seconds since the epoch
    keyid: str  # the trusted key that signed it


@dataclass(frozen=True)
class DeviceTopics:
    state: str
    telemetry: str
    event: str
    cmd: str
    ota: str


@dataclass(frozen=True)
class ReleaseTopics:
    manifest: str  # retained signed release metadata
    chunk: str  # broadcast chunks of every payload of the release


class BrokerAddress(NamedTuple):
    host: str
    port: int
    tls: bool


def validate_segment(s: str, what: str) -> str:
    """Return ``s`` when it is a safe topic segment: 1-64 chars of ``[A-Za-z0-9._-]``, not starting with a dot.

    Raises ValueError naming ``what`` otherwise (MQTT wildcards ``+``/``#``, ``/``, empty, too long...).
    """
    if not isinstance(s, str) or not _SEGMENT_RE.fullmatch(s):
        raise ValueError(f"invalid {what} {s!r}: expected 1-64 characters of A-Z a-z 0-9 . _ - (no leading dot)")
    return s


def device_topics(fleet: str, device_id: str) -> DeviceTopics:
    """The topics of one device. Raises ValueError for an invalid fleet or device id."""
    base = f"{TOPIC_ROOT}/{validate_segment(fleet, 'fleet')}/device/{validate_segment(device_id, 'device id')}"
    return DeviceTopics(*(f"{base}/{leaf}" for leaf in ("state", "telemetry", "event", "cmd", "ota")))


def group_cmd_topic(fleet: str, group: str) -> str:
    """The command topic of a group. Raises ValueError for an invalid fleet or group name."""
    return f"{TOPIC_ROOT}/{validate_segment(fleet, 'fleet')}/group/{validate_segment(group, 'group')}/cmd"


def release_topics(fleet: str, release_id: str) -> ReleaseTopics:
    """The topics of one release. Raises ValueError for an invalid fleet or release id."""
    base = f"{TOPIC_ROOT}/{validate_segment(fleet, 'fleet')}/release/{validate_segment(release_id, 'release id')}"
    return ReleaseTopics(f"{base}/manifest", f"{base}/chunk")


def alert_topic(fleet: str) -> str:
    """The fleet service's alert stream (``alert.opened`` / ``alert.closed`` JSON, QoS 1, not retained)."""
    return f"{TOPIC_ROOT}/{validate_segment(fleet, 'fleet')}/alerts"


def ota_request_filter(fleet: str) -> str:
    """The subscription filter for every device's repair requests (``.../device/+/ota``)."""
    return f"{TOPIC_ROOT}/{validate_segment(fleet, 'fleet')}/device/+/ota"


def device_target(device_id: str) -> str:
    """``device/<id>``, the payload target of a command to one device. Raises ValueError for a bad id."""
    return f"device/{validate_segment(device_id, 'device id')}"


def group_target(group: str) -> str:
    """``group/<g>``, the payload target of a command to a group. Raises ValueError for a bad name."""
    return f"group/{validate_segment(group, 'group')}"


def _validate_target(target: str) -> str:
    kind, sep, name = target.partition("/") if isinstance(target, str) else ("", "", "")
    if not sep or kind not in ("device", "group"):
        raise ValueError(f"invalid target {target!r}: expected device/<id> or group/<name>")
    validate_segment(name, f"{kind} in target")
    return target


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://HOST[:PORT]`` (default 1883) or ``mqtts://HOST[:PORT]`` (TLS, default 8883).

    Raises ValueError for another scheme, a missing host, a bad port, or a path, query, fragment or user info
    (credentials are given separately, never in the URL).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid broker URL {url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"invalid broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"invalid broker URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"invalid broker URL {url!r}: expected only scheme, host and port")
    if port == 0:
        raise ValueError(f"invalid broker URL {url!r}: port 0")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"{what} is out of range") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} must be finite")
    return out


def validate_args(name: CommandName, args: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``args`` against ``name``'s schema and return them as a plain dict.

    status, promote-shadow, drop-shadow, rollback: ``{}``; set-telemetry-interval: ``{"interval_s": 1..86400}``;
    install-from-file: ``{"path": "/absolute/path"}`` (at most 4096 chars) and optionally ``"shadow": true``
    (run it beside the active model instead of swapping); ota-update: ``{"release_id": <topic segment>}``.
    Raises ValueError otherwise, including for any extra argument.
    """
    if not isinstance(args, Mapping):
        raise ValueError("args must be an object")
    wanted = {
        CommandName.SET_TELEMETRY_INTERVAL: {"interval_s"},
        CommandName.INSTALL_FROM_FILE: {"path"},
        CommandName.OTA_UPDATE: {"release_id"},
    }.get(name, set())
    optional = {"shadow"} if name is CommandName.INSTALL_FROM_FILE else set()
    if not wanted <= set(args) or not set(args) <= wanted | optional:
        raise ValueError(f"{name} takes arguments {sorted(wanted)}, got {sorted(map(str, args))}")
    if name is CommandName.SET_TELEMETRY_INTERVAL:
        interval = _number(args["interval_s"], "interval_s")
        if not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
            raise ValueError(f"interval_s must be within {MIN_INTERVAL_S:g}..{MAX_INTERVAL_S:g} s, got {interval:g}")
    elif name is CommandName.INSTALL_FROM_FILE:
        path = args["path"]
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > MAX_PATH_CHARS:
            raise ValueError(f"path must be an absolute path of at most {MAX_PATH_CHARS} characters")
        if not isinstance(args.get("shadow", False), bool):
            raise ValueError("shadow must be true or false")
    elif name is CommandName.OTA_UPDATE:
        validate_segment(args["release_id"], "release_id")
    return dict(args)


def sign_command(
    private_key: Ed25519PrivateKey,
    *,
    name: CommandName | str,
    args: Mapping[str, Any],
    fleet: str,
    target: str,
    now: float,
    ttl_s: float = 300,
    nonce: str | None = None,
) -> bytes:
    """The signed envelope (JSON bytes) of one command, valid from ``now`` for ``ttl_s`` seconds.

    ``nonce`` defaults to 16 random bytes in hex. Raises ValueError for an unknown command, arguments that do
    not fit it, an invalid fleet/target/nonce or a non-positive ttl.
    """
    try:
        command = CommandName(name)
    except ValueError:
        raise ValueError(f"unknown command {name!r}; known: {', '.join(c.value for c in CommandName)}") from None
    clean_args = validate_args(command, args)
    validate_segment(fleet, "fleet")
    _validate_target(target)
    nonce = secrets.token_hex(16) if nonce is None else nonce
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 8-128 characters of A-Z a-z 0-9 _ -")
    issued_at = _number(now, "now")
    if not _number(ttl_s, "ttl_s") > 0:
        raise ValueError("ttl_s must be positive")
    payload = {
        "cmd": command.value,
        "args": clean_args,
        "fleet": fleet,
        "target": target,
        "nonce": nonce,
        "issued_at": issued_at,
        "expires_at": issued_at + float(ttl_s),
    }
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    out = seal_envelope(private_key, raw)
    if len(out) > MAX_COMMAND_BYTES:
        raise ValueError(f"command is {len(out)} bytes, over the {MAX_COMMAND_BYTES}-byte limit")
    return out


def _reject(reason: RejectReason, detail: str) -> CommandRejected:
    return CommandRejected(reason.value, detail[:MAX_DETAIL_CHARS])


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    try:
        doc = bounded_json.loads(raw, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _reject(RejectReason.MALFORMED, f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _reject(RejectReason.MALFORMED, f"{what} is not a JSON object")
    return doc


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise _reject(RejectReason.MALFORMED, f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):  # non-ASCII text is a ValueError
        raise _reject(RejectReason.MALFORMED, f"{what} is not valid base64") from None


def _envelope(raw: bytes, max_bytes: int = MAX_COMMAND_BYTES) -> tuple[bytes, list[tuple[str, bytes]]]:
    if not isinstance(raw, (bytes, bytearray)):
        raise _reject(RejectReason.MALFORMED, "envelope is not bytes")
    if len(raw) > max_bytes:
        raise _reject(RejectReason.OVERSIZED, f"{len(raw)} bytes, limit {max_bytes}")
    doc = _json_object(bytes(raw), "envelope")
    if set(doc) != {"v", "payload", "signatures"}:
        raise _reject(RejectReason.MALFORMED, "envelope must have exactly v, payload and signatures")
    version = doc["v"]
    if isinstance(version, bool) or not isinstance(version, int) or version != ENVELOPE_VERSION:
        raise _reject(RejectReason.MALFORMED, f"unsupported envelope version {version!r}")
    sigs = doc["signatures"]
    if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
        raise _reject(RejectReason.MALFORMED, f"signatures must be a list of at most {MAX_SIGNATURES}")
    entries: list[tuple[str, bytes]] = []
    for entry in sigs:
        if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"} or not isinstance(entry["keyid"], str):
            raise _reject(RejectReason.MALFORMED, "a signature must be {keyid: str, sig: base64}")
        entries.append((entry["keyid"], _b64(entry["sig"], "signature")))
    return _b64(doc["payload"], "payload"), entries


def _check_signatures(payload: bytes, entries: list[tuple[str, bytes]], trusted: Sequence[Ed25519PublicKey]) -> str:
    if not entries:
        raise _reject(RejectReason.UNSIGNED, "no signature")
    by_id = {key_id(k): k for k in trusted}
    tried = False
    for kid, sig in entries:
        key = by_id.get(kid)
        if key is None:
            continue
        tried = True
        try:
            verify_signature(key, payload, sig)
        except SignatureError:
            continue
        return kid
    if tried:
        raise _reject(RejectReason.BAD_SIGNATURE, "signature does not match the payload")
    raise _reject(RejectReason.UNTRUSTED_KEY, "not signed by a trusted fleet key")


def _payload_fields(doc: dict[str, Any]) -> tuple[str, str, str, float, float]:
    if set(doc) != _PAYLOAD_KEYS:
        raise _reject(RejectReason.MALFORMED, f"payload must have exactly {', '.join(sorted(_PAYLOAD_KEYS))}")
    try:
        fleet = validate_segment(doc["fleet"], "fleet")
        target = _validate_target(doc["target"])
        issued_at = _number(doc["issued_at"], "issued_at")
        expires_at = _number(doc["expires_at"], "expires_at")
    except ValueError as exc:
        raise _reject(RejectReason.MALFORMED, str(exc)) from None
    nonce = doc["nonce"]
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise _reject(RejectReason.MALFORMED, "nonce must be 8-128 characters of A-Z a-z 0-9 _ -")
    if not expires_at > issued_at:
        raise _reject(RejectReason.MALFORMED, "expires_at is not after issued_at")
    return fleet, target, nonce, issued_at, expires_at


def seal_envelope(private_key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """The signed envelope (JSON bytes) around ``payload``: the format commands and release metadata share."""
    sig = base64.b64encode(sign(private_key, payload)).decode()
    signature = {"keyid": key_id(private_key.public_key()), "sig": sig}
    envelope = {"v": ENVELOPE_VERSION, "payload": base64.b64encode(payload).decode(), "signatures": [signature]}
    return json.dumps(envelope, separators=(",", ":")).encode()


def open_envelope(raw: bytes, trusted_keys: Sequence[Ed25519PublicKey], *, max_bytes: int) -> tuple[bytes, str]:
    """Check an envelope's form and signature; return (payload bytes, id of the key that signed them).

    Raises CommandRejected with reason oversized, malformed, unsigned, untrusted-key or bad-signature (callers for
    other payload kinds map it to their own error); nothing else for any bytes.
    """
    payload, entries = _envelope(raw, max_bytes)
    return payload, _check_signatures(payload, entries, trusted_keys)


def parse_command(raw: bytes, trusted_keys: Sequence[Ed25519PublicKey]) -> Command:
    """Check a command envelope's form and signature and return the command it carries.

    Raises CommandRejected (and nothing else, for any bytes) with reason oversized, malformed, unsigned,
    untrusted-key, bad-signature, unknown-command or bad-args. The signature is checked before the payload is
    parsed, so only a trusted signer's bytes reach the payload parser.
    """
    payload, entries = _envelope(raw)
    kid = _check_signatures(payload, entries, trusted_keys)
    doc = _json_object(payload, "payload")
    fleet, target, nonce, issued_at, expires_at = _payload_fields(doc)
    cmd = doc["cmd"]
    if not isinstance(cmd, str):
        raise _reject(RejectReason.MALFORMED, "cmd is not a string")
    try:
        name = CommandName(cmd)
    except ValueError:
        raise _reject(RejectReason.UNKNOWN_COMMAND, f"unknown command {cmd[:64]!r}") from None
    try:
        args = validate_args(name, doc["args"])
    except ValueError as exc:
        raise _reject(RejectReason.BAD_ARGS, str(exc)) from None
    return Command(name, args, fleet, target, nonce, issued_at, expires_at, kid)


def peek_nonce(raw: bytes) -> str | None:
    """The nonce in ``raw``'s payload, *unverified*, or None when it cannot be read; never raises.

    Only for correlating a ``command.rejected`` event with what the sender sent; never for deciding anything.
    """
    try:
        payload, _ = _envelope(raw)
        nonce = _json_object(payload, "payload").get("nonce")
    except CommandRejected:
        return None
    return nonce if isinstance(nonce, str) and _NONCE_RE.fullmatch(nonce) else None
