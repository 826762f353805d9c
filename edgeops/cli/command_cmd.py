"""``edgeops command send``: sign a fleet command and publish it to one device or a group over MQTT.

With ``--device`` and ``--wait S`` it subscribes to the device's event topic *before* publishing, then prints the
first event that echoes the command's nonce (``command.accepted``, ``command.rejected``, ``command.done`` or
``command.failed``). Exit status: 0 when the command was published (and, when waiting, accepted or done); 1 when
it was rejected or failed, no answer came in time, or the broker could not be reached; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeops.cli.broker_options import add_broker_options
from edgeops.errors import TransportError
from edgeops.protocol import (
    BrokerAddress,
    CommandName,
    device_target,
    device_topics,
    group_cmd_topic,
    group_target,
    parse_broker_url,
    sign_command,
)

__all__ = ["BrokerLink", "add_parser", "connect", "parse_arg", "print_outcome"]

CONNECT_TIMEOUT_S = 10.0
OK_EVENTS = ("command.accepted", "command.done")


def parse_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (KEY, VALUE parsed as JSON when it is JSON, else the string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_parser(sub: Any) -> None:
    p = sub.add_parser("command", help="send signed commands to devices")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    send = csub.add_parser(
        "send",
        help="sign a command and publish it to a device or a group",
        description="Sign NAME with the fleet command key and publish it (MQTT 5, QoS 1) on the device's or "
        "group's cmd topic. With --device and --wait, print the device's answer.",
    )
    names = [c.value for c in CommandName]
    send.add_argument("name", metavar="NAME", choices=names, help=f"one of: {', '.join(names)}")
    send.add_argument("--broker", required=True, help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    send.add_argument("--fleet", required=True, help="fleet name")
    target = send.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="one device id")
    target.add_argument("--group", help="a device group")
    send.add_argument("--key", type=Path, required=True, help="fleet command signing key (Ed25519 PEM)")
    send.add_argument(
        "--arg", type=parse_arg, action="append", default=[], metavar="KEY=VALUE", help="argument (JSON or string)"
    )
    send.add_argument("--ttl", type=float, default=300.0, help="seconds the command stays valid (default 300)")
    send.add_argument("--wait", type=float, metavar="S", help="with --device: wait S seconds for the device's answer")
    add_broker_options(send)
    send.add_argument("--json", action="store_true", help="print the outcome as JSON")
    send.set_defaults(func=_send)


def _send(args: argparse.Namespace) -> int:
    from edgeops.signing import load_private_key

    try:
        broker = parse_broker_url(args.broker)
        if args.wait is not None and args.device is None:
            raise ValueError("--wait needs --device (a group's answers come from many devices)")
        if args.device is not None:
            topic, target = device_topics(args.fleet, args.device).cmd, device_target(args.device)
        else:
            topic, target = group_cmd_topic(args.fleet, args.group), group_target(args.group)
        key = load_private_key(args.key)
        nonce = secrets.token_hex(16)
        raw = sign_command(
            key,
            name=args.name,
            args=dict(args.arg),
            fleet=args.fleet,
            target=target,
            now=time.time(),
            ttl_s=args.ttl,
            nonce=nonce,
        )
    except ValueError as exc:
        print(f"edgeops: error: {exc}", file=sys.stderr)
        return 2
    event_topic = device_topics(args.fleet, args.device).event if args.wait is not None else None
    event = _publish(args, broker, topic, raw, nonce, event_topic)
    return _report(args, topic, target, nonce, event)


def _publish(
    args: argparse.Namespace, broker: BrokerAddress, topic: str, raw: bytes, nonce: str, event_topic: str | None
) -> dict[str, Any] | None:
    """Publish ``raw`` at QoS 1 and, when ``event_topic`` is given, return the first event echoing ``nonce``
    (None when none came within ``args.wait``). Raises TransportError when the broker cannot be reached."""
    link = BrokerLink(nonce)
    client = connect(args, broker, f"edgeops-cli-{nonce[:12]}", link)
    try:
        link.wait(link.connected, CONNECT_TIMEOUT_S, f"no CONNACK from {args.broker}")
        if event_topic is not None:
            client.subscribe(event_topic, qos=1)
            link.wait(link.subscribed, CONNECT_TIMEOUT_S, f"no SUBACK for {event_topic}")
        info = client.publish(topic, raw, qos=1)
        try:
            info.wait_for_publish(timeout=CONNECT_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:  # paho: not queued / connection lost
            raise TransportError(f"cannot publish the command on {topic}: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"the broker did not acknowledge the command on {topic}")
        if event_topic is None:
            return None
        link.answered.wait(args.wait)
        return link.event
    finally:
        client.disconnect()
        client.loop_stop()


def connect(args: argparse.Namespace, broker: BrokerAddress, client_id: str, link: BrokerLink) -> Any:
    """A started paho MQTT 5 client wired to ``link`` (TLS with ``args.ca``, a client certificate with
    ``args.cert``/``cert_key``, ``args.username``/``password``).

    Raises TransportError when TLS cannot be set up or the broker cannot be reached, KeyFileError for a client key
    that group or others may read.
    """
    from edgeops.mqtt_client import new_mqtt_client

    client = new_mqtt_client(client_id, tls=broker.tls, ca_certs=args.ca, username=args.username,
                             password=args.password, cert_file=args.cert, key_file=args.cert_key)
    client.on_connect, client.on_subscribe, client.on_message = link.on_connect, link.on_subscribe, link.on_message
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise TransportError(f"cannot reach the broker {args.broker}: {exc}") from exc
    client.loop_start()
    return client


class BrokerLink:
    """paho callbacks → threading events (the CLI's only shared state with paho's network thread).

    Waits for the first event that echoes ``nonce``; ``edgeops deploy`` subclasses it to wait for OTA outcomes.
    """

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        self.connected, self.subscribed, self.answered = threading.Event(), threading.Event(), threading.Event()
        self.error = ""
        self.event: dict[str, Any] | None = None

    def on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.error = f"broker refused the connection: {reason_code}"
        self.connected.set()

    def on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self.error = f"broker refused the subscription: {reason_codes[0]}"
        self.subscribed.set()

    def on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return  # not an event of ours; the device's other events are none of our business
        if isinstance(doc, dict) and doc.get("nonce") == self.nonce and not self.answered.is_set():
            self.event = doc
            self.answered.set()

    def wait(self, flag: threading.Event, timeout: float, what: str) -> None:
        if not flag.wait(timeout):
            raise TransportError(what)
        if self.error:
            raise TransportError(self.error)


def _report(args: argparse.Namespace, topic: str, target: str, nonce: str, event: Mapping[str, Any] | None) -> int:
    waited = args.wait is not None
    ok = not waited or (event is not None and event.get("type") in OK_EVENTS)
    if args.json:
        doc = {"command": args.name, "target": target, "topic": topic, "nonce": nonce, "event": event, "ok": ok}
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0 if ok else 1
    print(f"sent {args.name} to {target} (nonce {nonce})")
    return print_outcome(event, ok=ok, waited=waited, target=target, wait_s=args.wait)


def print_outcome(event: Mapping[str, Any] | None, *, ok: bool, waited: bool, target: str, wait_s: float | None) -> int:
    """Print the device's answer (or its absence) as one line; the exit status: 0 when ``ok``, else 1."""
    if waited and event is None:
        print(f"edgeops: error: no answer from {target} within {wait_s:g} s", file=sys.stderr)
    elif event is not None:
        reason = f": {event['reason']}" if event.get("reason") else ""
        line = f"{event.get('type', 'event')}{reason}"
        print(line if ok else f"edgeops: error: {line}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
