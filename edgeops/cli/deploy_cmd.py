"""``edgeops deploy``: install a published release on one device now, or roll it out to a group.

With ``--group`` it records a rollout in the fleet store (canary, phases, failure threshold: see
:mod:`edgeops.cli.rollout_cmd` and docs/fleet.md) that the running ``edgeops fleet serve`` carries out.

With ``--device`` it talks to the broker directly. It first checks that the release is announced on the broker
(its signed metadata retained on the release's manifest topic), so a typo in the release id fails here and not
on the device. It then signs the ``ota-update {"release_id"}`` command with the fleet command key and publishes
it (QoS 1) on the device's cmd topic. With ``--wait S`` it subscribes to the device's event topic *before*
sending and waits for the outcome:

* success: ``install.succeeded`` whose ``version`` is the release's version;
* failure: ``ota.rejected`` / ``ota.failed`` for this release, ``install.rejected`` of this version, or
  ``command.rejected`` / ``command.failed`` echoing the command's nonce (the event's reason is printed).

The release's version is read from the announced metadata without checking its signature: it is used only to
recognise the device's event; the device checks the signature itself before it fetches a byte. Exit status: 0
sent (and, with ``--wait``, installed); 1 not announced, rejected, failed, no outcome in time, or the broker could
not be reached; 2 a usage error.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeops.cli.broker_options import add_broker_options
from edgeops.cli.command_cmd import CONNECT_TIMEOUT_S, BrokerLink, connect, print_outcome
from edgeops.cli.rollout_cmd import deploy_group, rollout_options
from edgeops.errors import TransportError
from edgeops.protocol import (
    BrokerAddress,
    CommandName,
    device_target,
    device_topics,
    group_cmd_topic,
    group_target,
    parse_broker_url,
    release_topics,
    sign_command,
    validate_segment,
)

__all__ = ["add_parser", "outcome_of"]

ANNOUNCE_TIMEOUT_S = 3.0  # seconds to wait for the retained metadata after the subscription is acknowledged
SUCCESS_EVENT = "install.succeeded"
RELEASE_FAILURES = ("ota.rejected", "ota.failed")
COMMAND_FAILURES = ("command.rejected", "command.failed")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "deploy",
        help="install a release on a device, or roll it out to a group",
        description="--device: send the signed ota-update command for --release to one device now (with --wait, "
        "wait for its outcome). --group: record a rollout (canary, phases, failure threshold) in the fleet store; "
        "`edgeops fleet serve` carries it out.",
    )
    p.add_argument("--release", required=True, metavar="ID", help="release id (see `edgeops release list`)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="one device id")
    target.add_argument("--group", help="a device group: a rollout run by the fleet service")
    p.add_argument("--fleet", help="fleet name (with --device)")
    p.add_argument("--key", type=Path, help="fleet command signing key, Ed25519 PEM (with --device)")
    p.add_argument("--broker", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (with --device)")
    p.add_argument("--wait", type=float, metavar="S|HEALTHY_MINUTES",
                   help="with --device: wait S seconds for the install outcome; with --group: minutes each phase must "
                   "stay healthy (no error-rate or drift alert) before the next (default 0)")
    p.add_argument("--ttl", type=float, default=300.0, help="seconds the command stays valid (default 300)")
    add_broker_options(p)
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    rollout_options(p)
    p.set_defaults(func=_deploy)


def outcome_of(event: Any, *, nonce: str, release_id: str, version: str) -> bool | None:
    """True when ``event`` says the release is installed, False when it says the update failed, None when it is
    not about this deployment (another event of the device)."""
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    if kind == SUCCESS_EVENT and event.get("version") == version:
        return True
    if kind in RELEASE_FAILURES and event.get("release_id", release_id) == release_id:
        return False
    if kind == "install.rejected" and event.get("version", version) == version:
        return False
    if kind in COMMAND_FAILURES and event.get("nonce") == nonce:
        return False
    return None


def _announced_version(raw: bytes, release_id: str) -> str | None:
    """The version in announced release metadata (signature NOT checked), or None when it cannot be read."""
    try:
        payload = base64.b64decode(json.loads(raw)["payload"], validate=True)
        doc = json.loads(payload)
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if not isinstance(doc, dict) or doc.get("release_id") != release_id or not isinstance(doc.get("version"), str):
        return None
    return str(doc["version"])


class _DeployLink(BrokerLink):
    """command send's link, also taking the retained metadata and matching events by release, not nonce."""

    def __init__(self, nonce: str, manifest_topic: str, release_id: str) -> None:
        super().__init__(nonce)
        self.manifest_topic, self.release_id = manifest_topic, release_id
        self.announced = threading.Event()
        self.version: str | None = None

    def on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if message.topic == self.manifest_topic:
            self.version = _announced_version(bytes(message.payload), self.release_id)
            self.announced.set()
            return
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        if self.version is None or self.answered.is_set():
            return
        if outcome_of(doc, nonce=self.nonce, release_id=self.release_id, version=self.version) is not None:
            self.event = doc
            self.answered.set()


@dataclass(frozen=True)
class _Plan:
    release_id: str
    cmd_topic: str
    target: str
    event_topic: str | None  # with --wait
    nonce: str
    raw: bytes  # the signed command


def _plan(args: argparse.Namespace) -> _Plan:
    """Raises ValueError for bad names or arguments, KeyFileError for the key."""
    from edgeops.signing import load_private_key

    release_id = validate_segment(args.release, "release id")
    if args.wait is not None and args.device is None:
        raise ValueError("--wait needs --device (a group's outcomes come from many devices)")
    if args.device is not None:
        topic, target = device_topics(args.fleet, args.device).cmd, device_target(args.device)
    else:
        topic, target = group_cmd_topic(args.fleet, args.group), group_target(args.group)
    event_topic = device_topics(args.fleet, args.device).event if args.wait is not None else None
    nonce = secrets.token_hex(16)
    raw = sign_command(
        load_private_key(args.key),
        name=CommandName.OTA_UPDATE,
        args={"release_id": release_id},
        fleet=args.fleet,
        target=target,
        now=time.time(),
        ttl_s=args.ttl,
        nonce=nonce,
    )
    return _Plan(release_id, topic, target, event_topic, nonce, raw)


def _deploy(args: argparse.Namespace) -> int:
    if args.group is not None:
        if args.broker or args.key:
            print("edgeops: error: with --group the fleet service sends the commands (no --broker/--key); see "
                  "--canary, --phases, --max-failures, --min-devices, --wait", file=sys.stderr)
            return 2
        return deploy_group(args)
    missing = [opt for opt, value in (("--fleet", args.fleet), ("--key", args.key), ("--broker", args.broker))
               if not value]
    if missing:
        print(f"edgeops: error: --device needs {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        broker = parse_broker_url(args.broker)
        plan = _plan(args)
    except ValueError as exc:
        print(f"edgeops: error: {exc}", file=sys.stderr)
        return 2
    manifest_topic = release_topics(args.fleet, plan.release_id).manifest
    link = _DeployLink(plan.nonce, manifest_topic, plan.release_id)
    sent = _send(args, broker, plan, link)
    if not sent:
        print(
            f"edgeops: error: release {plan.release_id} is not announced in fleet {args.fleet} (nothing readable "
            f"retained on {manifest_topic}); publish it first with `edgeops release publish`",
            file=sys.stderr,
        )
        return 1
    return _report(args, plan, link)


def _send(args: argparse.Namespace, broker: BrokerAddress, plan: _Plan, link: _DeployLink) -> bool:
    """Check the announcement, publish the command and (with --wait) wait for the outcome. False when the release
    is not announced (nothing sent). Raises TransportError when the broker cannot be reached."""
    client = connect(args, broker, f"edgeops-deploy-{plan.nonce[:12]}", link)
    try:
        link.wait(link.connected, CONNECT_TIMEOUT_S, f"no CONNACK from {args.broker}")
        topics = [link.manifest_topic] + ([plan.event_topic] if plan.event_topic else [])
        client.subscribe([(t, 1) for t in topics])
        link.wait(link.subscribed, CONNECT_TIMEOUT_S, f"no SUBACK for {', '.join(topics)}")
        if not link.announced.wait(ANNOUNCE_TIMEOUT_S) or link.version is None:
            return False
        info = client.publish(plan.cmd_topic, plan.raw, qos=1)
        try:
            info.wait_for_publish(timeout=CONNECT_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"cannot publish the command on {plan.cmd_topic}: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"the broker did not acknowledge the command on {plan.cmd_topic}")
        if plan.event_topic is not None:
            link.answered.wait(args.wait)
        return True
    finally:
        client.disconnect()
        client.loop_stop()


def _report(args: argparse.Namespace, plan: _Plan, link: _DeployLink) -> int:
    waited = plan.event_topic is not None
    event = link.event
    ok = not waited or (
        event is not None
        and outcome_of(event, nonce=plan.nonce, release_id=plan.release_id, version=link.version or "") is True
    )
    if args.json:
        doc = {
            "release_id": plan.release_id,
            "version": link.version,
            "target": plan.target,
            "topic": plan.cmd_topic,
            "nonce": plan.nonce,
            "event": event,
            "ok": ok,
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0 if ok else 1
    print(f"sent ota-update {plan.release_id} (version {link.version}) to {plan.target} (nonce {plan.nonce})")
    return print_outcome(event, ok=ok, waited=waited, target=plan.target, wait_s=args.wait)
