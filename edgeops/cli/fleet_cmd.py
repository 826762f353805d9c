"""``edgeops fleet serve``: run the fleet service (registry, rollouts, ingest, releases, dashboard) until Ctrl-C,
SIGTERM or ``--duration``. Logs go to stderr; the dashboard URL is printed on stdout once everything is up.
Exit status: 0 stopped cleanly; 1 an edgeops error (store, broker, key); 2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edgeops.cli.broker_options import add_broker_options
from edgeops.cli.rollout_cmd import db_option

__all__ = ["add_parser"]

_EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "digits"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fleet", help="the fleet service")
    fsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = fsub.add_parser(
        "serve",
        help="run the fleet service",
        description="Device registry, rollouts, telemetry ingest and alerts, release serving, dashboard and "
        "/metrics, until Ctrl-C or SIGTERM. All state is in --db: stop and start it at will.",
    )
    s.add_argument("--fleet", required=True, help="fleet name")
    s.add_argument("--broker", required=True, help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    s.add_argument("--key", type=Path, required=True, help="fleet command signing key (Ed25519 PEM)")
    s.add_argument("--store", type=Path, default=Path("releases"), help="release store directory (default ./releases)")
    s.add_argument("--release-pubkey", type=Path, action="append", default=[], metavar="PUB",
                   help="register only releases signed by this key (repeatable; default: each release's own signer)")
    s.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="dashboard, /api and /metrics address (default 127.0.0.1:8080; '' for none)")
    s.add_argument("--ingest-workers", type=int, default=2, metavar="N", help="telemetry ingest workers (default 2)")
    s.add_argument("--offline-after", type=float, default=0.0, metavar="S",
                   help="mark a device offline when silent this long (default: only its last will)")
    s.add_argument("--raw-retention", type=float, default=7.0, metavar="DAYS", help="raw telemetry kept (default 7)")
    s.add_argument("--rollup", type=float, default=300.0, metavar="S", help="downsampling bucket (default 300 s)")
    s.add_argument("--rollup-retention", type=float, default=90.0, metavar="DAYS", help="buckets kept (default 90)")
    s.add_argument("--rate", type=float, default=5.0, metavar="MSG_PER_S",
                   help="telemetry + events accepted per device per second, sustained (default 5; burst 4x)")
    s.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    s.add_argument("--trust-dir", type=Path, metavar="DIR",
                   help="TUF trust directory (edgeops trust init): keep its metadata published retained")
    s.add_argument("--timestamp-key", type=Path, metavar="KEY",
                   help="with --trust-dir: the online timestamp key; re-sign snapshot/timestamp before expiry")
    add_broker_options(s)
    s.add_argument("-v", "--verbose", action="store_true", help="log every rollout decision")
    db_option(s)
    s.set_defaults(func=_serve)

    d = sub.add_parser(
        "demo",
        help="the whole flow on this machine: broker, builds, fleet service, 20 agents, canary rollout",
        description="Start mosquitto, build the digits example as v1 and a fine-tuned v2, start the fleet service "
        "and a simulated fleet of real agents in two groups, roll out v1, then v2 as a delta with a canary; print "
        "the dashboard URL and a live summary; Ctrl-C stops everything.",
    )
    d.add_argument("--workdir", type=Path, default=Path("dist/demo"), help="where it builds and keeps state")
    d.add_argument("--examples", type=Path, default=_EXAMPLES, help=f"examples/digits folder (default {_EXAMPLES})")
    d.add_argument("--devices", type=int, default=20, help="simulated agents (default 20)")
    d.add_argument("--profile", default="rpi4", help="hardware profile to build for (default rpi4)")
    d.add_argument("--http", default="127.0.0.1:8080", help="dashboard address (default 127.0.0.1:8080)")
    d.add_argument("--exit-when-done", action="store_true", help="stop once v2 is on every device")
    d.set_defaults(func=_demo)


def _serve(args: argparse.Namespace) -> int:
    from edgeops.fleet.service import FleetService, ServiceConfig
    from edgeops.signing import load_private_key, load_public_key

    if args.ingest_workers < 1:
        print("edgeops: error: --ingest-workers must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trusted = tuple(load_public_key(p) for p in args.release_pubkey) or None
    config = ServiceConfig(
        fleet=args.fleet, broker_url=args.broker, db=args.db, release_dir=args.store,
        command_key=load_private_key(args.key), trusted_release_keys=trusted, http=args.http,
        ingest_workers=args.ingest_workers, offline_after_s=args.offline_after,
        raw_retention_s=args.raw_retention * 86400.0, rollup_s=args.rollup,
        rollup_retention_s=args.rollup_retention * 86400.0, rate_per_s=args.rate, burst=args.rate * 4,
        username=args.username, password=args.password, ca_certs=args.ca, cert_file=args.cert,
        key_file=args.cert_key, trust_dir=args.trust_dir, timestamp_key=args.timestamp_key,
    )
    service = FleetService(config)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    try:
        service.start()
        print(f"fleet {args.fleet} served: dashboard {service.url or '(none)'}, store {args.db}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends serving as SIGTERM does
            stop.wait(args.duration)
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.stop()
    print("fleet service stopped", flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from edgeops.fleet.demo import DemoOptions, run_demo

    if args.devices < 2:
        print("edgeops: error: --devices must be at least 2 (two groups)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    opts = DemoOptions(workdir=args.workdir, examples=args.examples, devices=args.devices, profile=args.profile,
                       http=args.http, exit_when_done=args.exit_when_done)
    return run_demo(opts)
