"""``edgeops profiles list`` / ``edgeops profiles show NAME``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgeops.profiles import list_profiles, load_profile

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    from edgeops.cli.main import profiles_dirs_arg

    p = sub.add_parser("profiles", help="list or show hardware profiles")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = psub.add_parser("list", help="list the known profiles")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    profiles_dirs_arg(lst)
    lst.set_defaults(func=_list)
    show = psub.add_parser("show", help="show one profile, resolved and validated")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    profiles_dirs_arg(show)
    show.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    profiles = [load_profile(n, args.profiles_dir) for n in list_profiles(args.profiles_dir)]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": p.name,
                        "format": p.format,
                        "precision": p.precision,
                        "runtime": p.runtime,
                        "path": str(p.path),
                        "description": p.description,
                    }
                    for p in profiles
                ],
                indent=2,
            )
        )
        return 0
    width = max((len(p.name) for p in profiles), default=4)
    for p in profiles:
        print(f"{p.name:<{width}}  {p.format:<6} {p.precision:<12} {p.description}")
    return 0


def _show(args: argparse.Namespace) -> int:
    profile = load_profile(args.name, args.profiles_dir)
    doc = profile.to_dict() | {"path": str(profile.path)}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for key, value in doc.items():
        print(f"{key:<20} {value}")
    return 0
