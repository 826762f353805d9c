"""``edgeops trust init|rotate|timestamp|status``: the fleet's TUF repository (edgeops/trust_repo.py).

``init`` makes the keys and root v1 (a threshold of root keys), an empty targets.json and the first snapshot and
timestamp. ``rotate`` replaces one role's keys in a new root version signed by the root keys given (devices follow
the chain when they next connect). ``timestamp`` re-signs snapshot + timestamp now (``release serve
--timestamp-key`` does it on its own before expiry). ``status`` shows versions, expiries and key ids per role.
Exit status: 0 done; 1 an edgeops error; 2 a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("trust", help="the fleet's update-trust metadata (TUF root, targets, snapshot, timestamp)")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    init = tsub.add_parser(
        "init",
        help="create the keys, root v1 and the first targets/snapshot/timestamp",
        description="Create a trust directory: root keys (a threshold of them signs every root), the targets "
        "(release) key, the online timestamp key, the commands and artifacts keys (or name existing public keys).",
    )
    init.add_argument("--dir", type=Path, required=True, help="the trust directory to create")
    init.add_argument("--fleet", required=True, help="fleet name")
    init.add_argument("--root-keys", type=int, default=3, metavar="N", help="number of root keys (default 3)")
    init.add_argument("--threshold", type=int, default=2, metavar="M", help="root signatures needed (default 2)")
    init.add_argument("--commands-key", type=Path, metavar="PUB", help="existing public key for fleet commands")
    init.add_argument("--artifacts-key", type=Path, metavar="PUB", help="existing public key of the artifact builder")
    init.add_argument("--timestamp-expiry", type=int, default=86400, metavar="S",
                      help="freeze window: timestamps expire after S seconds (default 86400)")
    init.add_argument("--targets-expiry-days", type=int, default=365, metavar="D", help="targets expiry (365)")
    init.add_argument("--root-expiry-days", type=int, default=365, metavar="D", help="root expiry (365)")
    init.add_argument("--json", action="store_true", help="print the outcome as JSON")
    init.set_defaults(func=_init)

    rot = tsub.add_parser(
        "rotate",
        help="replace one role's keys in a new root version",
        description="Write root v(N+1) in which ROLE has the --new-key keys. Sign with --root-key: a threshold of the "
        "current root keys and, when ROLE is root, a threshold of the new ones. Devices follow on their next update "
        "or connection; signatures by the old keys are refused from then on.",
    )
    rot.add_argument("--dir", type=Path, required=True, help="the trust directory")
    rot.add_argument("--role", required=True, choices=["root", "targets", "timestamp", "commands", "artifacts"])
    rot.add_argument("--new-key", type=Path, action="append", required=True, metavar="PUB",
                     help="public key of the role from now on (repeatable)")
    rot.add_argument("--threshold", type=int, default=1, metavar="M", help="signatures the role needs (default 1)")
    rot.add_argument("--root-key", type=Path, action="append", required=True, metavar="KEY",
                     help="a root private key that signs the new root (repeatable)")
    rot.add_argument("--targets-key", type=Path, metavar="KEY",
                     help="with --role targets: the new targets private key, to re-sign targets.json at once")
    rot.add_argument("--json", action="store_true", help="print the outcome as JSON")
    rot.set_defaults(func=_rotate)

    ts = tsub.add_parser("timestamp", help="re-sign snapshot and timestamp now")
    ts.add_argument("--dir", type=Path, required=True, help="the trust directory")
    ts.add_argument("--key", type=Path, required=True, help="the timestamp private key")
    ts.add_argument("--json", action="store_true", help="print the outcome as JSON")
    ts.set_defaults(func=_timestamp)

    st = tsub.add_parser("status", help="versions, expiries and keys of every role")
    st.add_argument("--dir", type=Path, required=True, help="the trust directory")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_status)


def _status_doc(directory: Path) -> dict[str, Any]:
    from tuf.api.metadata import Metadata

    from edgeops.trust import ARTIFACTS_ROLE, COMMANDS_ROLE, EDGEOPS_ROLES_FIELD
    from edgeops.trust_repo import load_repo

    repo = load_repo(directory)
    root = repo.root()
    roles: dict[str, Any] = {
        name: {"keyids": list(role.keyids), "threshold": role.threshold} for name, role in root.roles.items()
    }
    for name in (COMMANDS_ROLE, ARTIFACTS_ROLE):
        roles[name] = dict(root.unrecognized_fields[EDGEOPS_ROLES_FIELD][name])
    metadata: dict[str, Any] = {"root": {"version": root.version, "expires": root.expires.isoformat()}}
    for role in ("targets", "snapshot", "timestamp"):
        raw = repo.role_bytes(role)
        if raw is not None:
            signed = Metadata.from_bytes(raw).signed
            metadata[role] = {"version": signed.version, "expires": signed.expires.isoformat()}
    targets_raw = repo.role_bytes("targets")
    releases = sorted(Metadata.from_bytes(targets_raw).signed.targets) if targets_raw else []  # type: ignore[attr-defined]
    return {
        "directory": str(directory),
        "fleet": repo.settings.fleet,
        "root_versions": repo.root_versions(),
        "metadata": metadata,
        "roles": roles,
        "releases": releases,
        "timestamp_due": repo.timestamp_due(),
    }


def _print_status(doc: dict[str, Any]) -> None:
    print(f"trust repository {doc['directory']} for fleet {doc['fleet']}")
    for role, m in doc["metadata"].items():
        print(f"  {role:<9}  v{m['version']:<4}  expires {m['expires']}")
    for role, r in doc["roles"].items():
        ids = ", ".join(k[:12] for k in r["keyids"])
        print(f"  role {role:<9}  {r['threshold']} of {len(r['keyids'])}: {ids}")
    due = "yes" if doc["timestamp_due"] else "no"
    print(f"  {len(doc['releases'])} release(s) listed; timestamp re-sign due: {due}")


def _emit(args: argparse.Namespace, doc: dict[str, Any], line: str) -> int:
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(line)
        _print_status(doc)
    return 0


def _init(args: argparse.Namespace) -> int:
    from edgeops.errors import ConfigError
    from edgeops.signing import load_private_key
    from edgeops.trust_repo import init_repo

    if args.timestamp_expiry < 60:
        raise ConfigError("--timestamp-expiry must be at least 60 seconds")
    repo = init_repo(
        args.dir,
        fleet=args.fleet,
        root_keys=args.root_keys,
        root_threshold=args.threshold,
        commands_key=args.commands_key,
        artifacts_key=args.artifacts_key,
        settings={
            "timestamp_expiry_s": args.timestamp_expiry,
            "targets_expiry_days": args.targets_expiry_days,
            "root_expiry_days": args.root_expiry_days,
        },
    )
    repo.publish_timestamp(load_private_key(repo.keys_dir / "timestamp.key"))
    line = (f"trust repository created in {args.dir}: give devices {repo.root_path(1)} as [trust] root; "
            f"move {repo.keys_dir}/root-*.key offline")
    return _emit(args, _status_doc(args.dir), line)


def _rotate(args: argparse.Namespace) -> int:
    from edgeops.signing import load_private_key, load_public_key
    from edgeops.trust_repo import load_repo

    repo = load_repo(args.dir)
    version = repo.rotate(
        args.role,
        [load_public_key(p) for p in args.new_key],
        [load_private_key(p) for p in args.root_key],
        threshold=args.threshold,
        targets_key=load_private_key(args.targets_key) if args.targets_key else None,
    )
    line = f"root v{version} written: role {args.role} now has {len(args.new_key)} key(s); publish it (release serve)"
    return _emit(args, _status_doc(args.dir), line)


def _timestamp(args: argparse.Namespace) -> int:
    from edgeops.signing import load_private_key
    from edgeops.trust_repo import load_repo

    repo = load_repo(args.dir)
    repo.publish_timestamp(load_private_key(args.key))
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=repo.settings.timestamp_expiry_s)
    return _emit(args, _status_doc(args.dir), f"snapshot and timestamp re-signed; valid until about {expires:%c} UTC")


def _status(args: argparse.Namespace) -> int:
    doc = _status_doc(args.dir)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _print_status(doc)
    return 0
