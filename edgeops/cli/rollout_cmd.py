"""``edgeops deploy --group``, ``edgeops rollout list|status|pause|resume|abort`` and ``edgeops rollback``.

These record what the operator wants in the fleet store (``--db``, default ``$EDGEOPS_FLEET_DB`` or
``./fleet.db``); the running ``edgeops fleet serve`` acts on it within a tick. ``--json`` prints the rollout view
(:func:`edgeops.fleet.views.rollout_view`) for scripts. Exit status: 0 done; 1 an edgeops error (unknown release
or rollout, empty group, store down); 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from edgeops.fleet.model import RolloutSpec, parse_percent, parse_phases

__all__ = ["add_parsers", "db_option", "deploy_group", "rollout_options"]

DEFAULT_DB = "fleet.db"


def db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("EDGEOPS_FLEET_DB", DEFAULT_DB),
                   help="fleet store: a SQLite file or postgresql://... (default $EDGEOPS_FLEET_DB or ./fleet.db)")


def rollout_options(p: argparse.ArgumentParser) -> None:
    """The rollout options of ``edgeops deploy --group`` (``--wait`` is deploy's own: with --group it is the
    healthy minutes of each phase)."""
    g = p.add_argument_group("rollout (with --group)")
    g.add_argument("--canary", metavar="PCT", help="a first phase of this share of the group (e.g. 5%%)")
    g.add_argument("--phases", metavar="P,P,...", help="cumulative phase sizes in %% (e.g. 5,25,100; default 100)")
    g.add_argument("--max-failures", default="10%", metavar="PCT",
                   help="stop when failed devices exceed this share of the finished ones (default 10%%)")
    g.add_argument("--min-devices", type=int, default=1, metavar="N",
                   help="finished devices before --max-failures is judged (default 1)")
    g.add_argument("--timeout", dest="timeout_minutes", type=float, default=10.0, metavar="MINUTES",
                   help="minutes a device has to report its outcome before it counts as timed out (default 10)")
    g.add_argument("--auto-rollback", action="store_true", help="on failure, send the failed phase's devices back")
    g.add_argument("--once", action="store_true", help="not continuous: devices joining the group later are left out")
    g.add_argument("--allow-unapproved", action="store_true", help="deploy a release still pending approval")
    db_option(p)


def _spec(args: argparse.Namespace) -> RolloutSpec:
    return RolloutSpec(
        phases=parse_phases(args.phases, args.canary),
        max_failures=parse_percent(args.max_failures),
        min_devices=args.min_devices,
        wait_s=(args.wait or 0.0) * 60.0,
        timeout_s=args.timeout_minutes * 60.0,
        auto_rollback=args.auto_rollback,
        continuous=not args.once,
    )


def deploy_group(args: argparse.Namespace) -> int:
    """``edgeops deploy --release R --group G ...``: record the rollout."""
    from edgeops.fleet import deployments
    from edgeops.fleet.store import open_store
    from edgeops.fleet.views import rollout_view

    try:
        spec = _spec(args)
    except ValueError as exc:
        print(f"edgeops: error: {exc}", file=sys.stderr)
        return 2
    store = open_store(args.db)
    try:
        dep = deployments.deploy(store, release_id=args.release, group=args.group, spec=spec, now=time.time(),
                                 allow_unapproved=args.allow_unapproved)
        view = rollout_view(dep.rollout, store.list_executions(dep.rollout.rollout_id))
    finally:
        store.close()
    if args.json:
        print(json.dumps({**view, "superseded": list(dep.superseded)}, indent=2, sort_keys=True))
        return 0
    r = dep.rollout
    phases = ", ".join(f"{p * 100:g}%" for p in r.spec.phases)
    print(f"rollout {r.rollout_id}: {r.release_id} ({r.version}) to group {r.group}: {dep.devices} device(s), "
          f"phases {phases}, max failures {r.spec.max_failures * 100:g}%")
    for device_id, reason in dep.skipped:
        print(f"  skipped {device_id}: {reason}")
    for old in dep.superseded:
        print(f"  aborted older rollout {old} (superseded)")
    print(f"the fleet service sends it; follow with `edgeops rollout status {r.rollout_id}`")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("rollout", help="list, follow, pause, resume or abort rollouts")
    rsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = rsub.add_parser("list", help="rollouts, newest first")
    lst.add_argument("--group", help="only this group's")
    lst.add_argument("--json", action="store_true")
    db_option(lst)
    lst.set_defaults(func=_list)
    for name, text in (("status", "a rollout's phases and device states"), ("pause", "stop sending (resumable)"),
                       ("resume", "go on with a paused rollout"), ("abort", "stop a rollout for good")):
        a = rsub.add_parser(name, help=text)
        a.add_argument("rollout_id", metavar="ROLLOUT")
        a.add_argument("--json", action="store_true")
        if name == "status":
            a.add_argument("--devices", action="store_true", help="list every device's execution")
        db_option(a)
        a.set_defaults(func=_status if name == "status" else _transition, action_name=name)

    rb = sub.add_parser("rollback", help="send a group's devices back to the model they ran before its last rollout")
    rb.add_argument("--group", required=True)
    rb.add_argument("--timeout", dest="timeout_minutes", type=float, default=10.0, metavar="MINUTES")
    rb.add_argument("--json", action="store_true")
    db_option(rb)
    rb.set_defaults(func=_rollback)


def _list(args: argparse.Namespace) -> int:
    from edgeops.fleet.store import open_store
    from edgeops.fleet.views import rollout_view

    store = open_store(args.db)
    try:
        views = [rollout_view(r, store.list_executions(r.rollout_id)) for r in store.list_rollouts(group=args.group)]
    finally:
        store.close()
    if args.json:
        print(json.dumps(views, indent=2, sort_keys=True))
        return 0
    if not views:
        print("no rollouts")
    for v in views:
        print(_line(v))
    return 0


def _line(v: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(v["counts"].items()) if n)
    return (f"{v['id']}  {v['kind']:<8} {v['release_id']} → {v['group']}  {v['status']}, phase "
            f"{v['phase'] + 1}/{len(v['phases'])}  [{counts}]{'  ' + v['reason'] if v.get('reason') else ''}")


def _status(args: argparse.Namespace) -> int:
    from edgeops.errors import RolloutError
    from edgeops.fleet.store import open_store
    from edgeops.fleet.views import rollout_view

    store = open_store(args.db)
    try:
        rollout = store.get_rollout(args.rollout_id)
        if rollout is None:
            raise RolloutError(f"unknown rollout {args.rollout_id!r}")
        executions = store.list_executions(rollout.rollout_id)
    finally:
        store.close()
    view = rollout_view(rollout, executions)
    if args.json:
        print(json.dumps({**view, "executions": [_exec_json(e) for e in executions]}, indent=2, sort_keys=True))
        return 0
    print(_line(view))
    for ph in view["per_phase"]:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(ph["counts"].items()) if n) or "empty"
        print(f"  phase {ph['phase'] + 1} ({ph['fraction'] * 100:g}%): {ph['devices']} device(s): {counts}")
    if args.devices:
        for e in executions:
            print(f"  {e.device_id:<24} {e.status:<12} phase {e.phase + 1}  {e.reason}")
    return 0


def _exec_json(e: Any) -> dict[str, Any]:
    return {"device_id": e.device_id, "status": str(e.status), "phase": e.phase, "reason": e.reason,
            "sent_at": e.sent_at, "updated_at": e.updated_at, "attempts": e.attempts}


def _transition(args: argparse.Namespace) -> int:
    from edgeops.fleet import deployments
    from edgeops.fleet.store import open_store

    action = {"pause": deployments.pause, "resume": deployments.resume, "abort": deployments.abort}[args.action_name]
    store = open_store(args.db)
    try:
        rollout = action(store, args.rollout_id, now=time.time())
    finally:
        store.close()
    if args.json:
        print(json.dumps({"id": rollout.rollout_id, "status": str(rollout.status)}))
    else:
        print(f"rollout {rollout.rollout_id}: {rollout.status}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from edgeops.fleet import deployments
    from edgeops.fleet.store import open_store

    store = open_store(args.db)
    try:
        dep = deployments.rollback_group(store, group=args.group, now=time.time(),
                                         timeout_s=args.timeout_minutes * 60.0)
    finally:
        store.close()
    r = dep.rollout
    if args.json:
        print(json.dumps({"id": r.rollout_id, "version": r.version, "devices": dep.devices,
                          "skipped": [d for d, _ in dep.skipped], "superseded": list(dep.superseded)}))
        return 0
    print(f"rollout {r.rollout_id}: rolling {dep.devices} device(s) of {args.group} back from {r.version}")
    for old in dep.superseded:
        print(f"  aborted rollout {old}")
    return 0
