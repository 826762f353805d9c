"""``edgeops devices list|show|assign|unassign`` and ``edgeops releases list|approve|reject``: the fleet store's
registries, read (``--json`` for scripts) and edited. Exit status: 0 done; 1 an edgeops error (unknown device or
release, store down); 2 a usage error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any

from edgeops.cli.rollout_cmd import db_option

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    d = sub.add_parser("devices", help="the device registry: list, show, assign groups")
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = dsub.add_parser("list", help="devices with state, profile, version, groups")
    lst.add_argument("--group")
    lst.add_argument("--profile")
    state = lst.add_mutually_exclusive_group()
    state.add_argument("--online", action="store_true", help="only online devices")
    state.add_argument("--offline", action="store_true", help="only offline devices")
    lst.add_argument("--json", action="store_true")
    db_option(lst)
    lst.set_defaults(func=_devices_list)
    show = dsub.add_parser("show", help="one device: record, latest telemetry, alerts, recent events")
    show.add_argument("device_id", metavar="DEVICE")
    show.add_argument("--json", action="store_true")
    db_option(show)
    show.set_defaults(func=_devices_show)
    for name in ("assign", "unassign"):
        a = dsub.add_parser(name, help=f"{name} a fleet-side group (beside the agent's own tags)")
        a.add_argument("device_id", metavar="DEVICE")
        a.add_argument("--group", required=True)
        db_option(a)
        a.set_defaults(func=_assign, action_name=name)

    r = sub.add_parser("releases", help="the release registry: list, approve, reject")
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    rl = rsub.add_parser("list", help="releases with version, profile, approval and lineage")
    rl.add_argument("--name")
    rl.add_argument("--profile")
    rl.add_argument("--json", action="store_true")
    db_option(rl)
    rl.set_defaults(func=_releases_list)
    for name in ("approve", "reject"):
        a = rsub.add_parser(name, help=f"{name} a release for rollouts")
        a.add_argument("release_id", metavar="RELEASE")
        a.add_argument("--by", default=None, help="who (default: the login name)")
        db_option(a)
        a.set_defaults(func=_approve, action_name=name)


def _device_json(d: Any) -> dict[str, Any]:
    return {"device_id": d.device_id, "online": d.online, "last_seen": d.last_seen, "profile": d.profile,
            "groups": list(d.groups), "assigned_groups": list(d.assigned_groups), "active_version": d.active_version,
            "previous_version": d.previous_version, "health": d.health, "agent_version": d.agent_version,
            "offline_reason": d.offline_reason}


def _devices_list(args: argparse.Namespace) -> int:
    from edgeops.fleet.store import open_store

    online = True if args.online else False if args.offline else None
    store = open_store(args.db)
    try:
        devices = store.list_devices(group=args.group, profile=args.profile, online=online)
    finally:
        store.close()
    if args.json:
        print(json.dumps([_device_json(d) for d in devices], indent=2, sort_keys=True))
        return 0
    if not devices:
        print("no devices")
    now = time.time()
    for d in devices:
        seen = f"{now - d.last_seen:.0f}s ago"
        print(f"{d.device_id:<24} {'online ' if d.online else 'offline'} {d.profile or '-':<14} "
              f"{d.active_version or '-':<10} {','.join(d.all_groups) or '-':<20} {d.health or '-':<9} {seen}")
    return 0


def _devices_show(args: argparse.Namespace) -> int:
    from edgeops.errors import RolloutError
    from edgeops.fleet.store import open_store
    from edgeops.fleet.views import device_view

    store = open_store(args.db)
    try:
        view = device_view(store, args.device_id, time.time(), 3600.0)
    finally:
        store.close()
    if view is None:
        raise RolloutError(f"unknown device {args.device_id!r} (see `edgeops devices list`)")
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True, default=str))
        return 0
    rec = view["device"]
    for key in ("device_id", "online", "profile", "active_version", "previous_version", "health", "groups",
                "assigned_groups", "agent_version"):
        print(f"{key:<17} {rec.get(key)}")
    lat = view.get("latest") or {}
    if lat:
        print(f"{'latency ms':<17} p50 {lat.get('p50_ms')} p95 {lat.get('p95_ms')} p99 {lat.get('p99_ms')}")
    for alert in view.get("alerts", []):
        print(f"alert             {alert.get('kind')} {alert.get('level')}: {alert.get('detail')}")
    for ev in view.get("events", [])[:10]:
        print(f"event             {ev.get('type')} {json.dumps(ev.get('body', {}), sort_keys=True)[:100]}")
    return 0


def _assign(args: argparse.Namespace) -> int:
    from edgeops.fleet.store import open_store
    from edgeops.protocol import validate_segment

    try:
        validate_segment(args.group, "group")
        validate_segment(args.device_id, "device id")
    except ValueError as exc:
        print(f"edgeops: error: {exc}", file=sys.stderr)
        return 2
    store = open_store(args.db)
    try:
        (store.assign_group if args.action_name == "assign" else store.unassign_group)(args.device_id, args.group)
    finally:
        store.close()
    print(f"{args.device_id}: {'in' if args.action_name == 'assign' else 'out of'} group {args.group}")
    return 0


def _release_json(r: Any) -> dict[str, Any]:
    return {"release_id": r.release_id, "name": r.name, "version": r.version, "profile": r.profile,
            "created_at": r.created_at, "size": r.size, "target_sha256": r.target_sha256,
            "payloads": list(r.payloads), "lineage": r.lineage, "approval": str(r.approval),
            "approved_by": r.approved_by, "approved_at": r.approved_at}


def _releases_list(args: argparse.Namespace) -> int:
    from edgeops.fleet.store import open_store

    store = open_store(args.db)
    try:
        releases = store.list_releases(name=args.name, profile=args.profile)
    finally:
        store.close()
    if args.json:
        print(json.dumps([_release_json(r) for r in releases], indent=2, sort_keys=True))
        return 0
    if not releases:
        print("no releases (publish with `edgeops release publish`; `edgeops fleet serve` registers them)")
    for r in releases:
        deltas = ", ".join(f"Δ{p['base_version']} {p['size']} B" for p in r.payloads if p.get("kind") == "delta")
        source = str((r.lineage.get("source") or {}).get("sha256", ""))[:12]
        print(f"{r.release_id:<32} {r.version:<10} {r.profile:<14} {r.approval:<9} {r.size} B"
              f"{'  ' + deltas if deltas else ''}{'  source ' + source if source else ''}")
    return 0


def _approve(args: argparse.Namespace) -> int:
    from edgeops.fleet.model import Approval
    from edgeops.fleet.store import open_store

    approval = Approval.APPROVED if args.action_name == "approve" else Approval.REJECTED
    store = open_store(args.db)
    try:
        rec = store.set_approval(args.release_id, approval, by=args.by or getpass.getuser(), at=time.time())
    finally:
        store.close()
    print(f"{rec.release_id}: {rec.approval} by {rec.approved_by}")
    return 0
