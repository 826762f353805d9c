"""``edgeops`` entry point: argument parsing and dispatch. Commands live in small modules beside this one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edgeops import __version__
from edgeops.errors import EdgeopsError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from edgeops.cli import (
        artifact_cmds,
        build_cmd,
        command_cmd,
        delta_cmd,
        deploy_cmd,
        fleet_cmd,
        inventory_cmd,
        pki_cmd,
        profiles_cmd,
        release_cmd,
        rollout_cmd,
        trust_cmd,
    )

    parser = argparse.ArgumentParser(prog="edgeops", description="Build, sign and ship ML models to edge fleets.")
    parser.add_argument("--version", action="version", version=f"edgeops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build_cmd.add_parser(sub)
    artifact_cmds.add_parsers(sub)
    profiles_cmd.add_parser(sub)
    command_cmd.add_parser(sub)
    delta_cmd.add_parser(sub)
    release_cmd.add_parser(sub)
    deploy_cmd.add_parser(sub)
    rollout_cmd.add_parsers(sub)
    inventory_cmd.add_parsers(sub)
    fleet_cmd.add_parser(sub)
    pki_cmd.add_parser(sub)
    trust_cmd.add_parser(sub)
    return parser


def profiles_dirs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profiles-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="extra directory of profile TOML files (repeatable; also $EDGEOPS_PROFILES_DIR)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeopsError as exc:
        print(f"edgeops: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("edgeops: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
