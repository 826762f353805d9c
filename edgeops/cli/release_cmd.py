"""``edgeops release publish|serve|list``: build a release into the store, announce it, serve repair requests.

``publish`` builds the release of one artifact (a delta per ``--base``, signed metadata) into ``--store`` and, with
``--broker``, publishes its metadata retained; with ``--serve`` it then goes on serving chunks until Ctrl-C,
SIGTERM or ``--duration``. ``serve`` serves every release of the fleet in the store, and picks up releases built
into the store while it runs. ``list`` shows the store. Progress goes to stderr, results to stdout (``--json``
for scripts). Exit status: 0 done; 1 an edgeops error (bad artifact, broker unreachable...); 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops.cli.broker_options import add_broker_options
from edgeops.release import DEFAULT_CHUNK_SIZE, ReleaseMetadata

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgeops.release_builder import PublishedRelease
    from edgeops.release_server import ReleaseServer
    from edgeops.trust_repo import TrustFeed

__all__ = ["add_parser"]

DEFAULT_STORE = Path("releases")
RESCAN_S = 5.0  # seconds between looks at the store while serving
FLUSH_TIMEOUT_S = 10.0  # seconds to wait for the broker to acknowledge the metadata


def _broker_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--broker", required=required, help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    add_broker_options(p)


def _trust_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-dir", type=Path, metavar="DIR",
                   help="TUF trust directory (edgeops trust init): list releases in its targets (publish: --key "
                   "must be the targets key) and keep its metadata published retained")
    p.add_argument("--timestamp-key", type=Path, metavar="KEY",
                   help="with --trust-dir: the online timestamp key; re-sign snapshot/timestamp when due")


def _trust_feed(args: argparse.Namespace) -> TrustFeed | None:
    from edgeops.errors import ConfigError
    from edgeops.trust_repo import TrustFeed

    if args.trust_dir is None:
        if args.timestamp_key is not None:
            raise ConfigError("--timestamp-key needs --trust-dir")
        return None
    return TrustFeed(args.trust_dir, args.fleet, args.timestamp_key)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("release", help="build, publish and serve OTA releases")
    rsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pub = rsub.add_parser(
        "publish",
        help="build a release (deltas, signed metadata) and announce it",
        description="Build the release of ARTIFACT into the store: the full artifact and a delta from each --base, "
        "with signed metadata. With --broker, publish the metadata retained; with --serve, serve repair requests.",
    )
    pub.add_argument("artifact", type=Path, metavar="ARTIFACT", help="the target artifact (.edgeops)")
    pub.add_argument("--base", type=Path, action="append", default=[], metavar="OLD_ARTIFACT",
                     help="an earlier version devices may run (repeatable): one delta each")
    pub.add_argument("--fleet", required=True, help="fleet name")
    pub.add_argument("--key", type=Path, required=True, help="release signing key (Ed25519 PEM)")
    pub.add_argument("--pubkey", type=Path, help="verify ARTIFACT and every base against this public key first")
    pub.add_argument("--store", type=Path, default=DEFAULT_STORE, help="release store directory (default ./releases)")
    pub.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                     help=f"chunk size in bytes (default {DEFAULT_CHUNK_SIZE})")
    pub.add_argument("--serve", action="store_true", help="keep serving repair requests (until Ctrl-C)")
    pub.add_argument("--duration", type=float, metavar="S", help="with --serve: stop after S seconds")
    pub.add_argument("--json", action="store_true", help="print the outcome as JSON")
    _trust_options(pub)
    _broker_options(pub, required=False)
    pub.set_defaults(func=_publish)

    serve = rsub.add_parser(
        "serve",
        help="serve every release of a fleet in the store",
        description="Publish the retained metadata of every release of --fleet in the store and serve repair "
        "requests until Ctrl-C, SIGTERM or --duration; releases built into the store meanwhile are served too.",
    )
    serve.add_argument("--fleet", required=True, help="fleet name")
    serve.add_argument("--store", type=Path, default=DEFAULT_STORE, help="release store directory (default ./releases)")
    serve.add_argument("--pubkey", type=Path, help="serve only releases signed by this key")
    serve.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    serve.add_argument("--json", action="store_true", help="print the statistics as JSON on exit")
    _trust_options(serve)
    _broker_options(serve, required=True)
    serve.set_defaults(func=_serve_cmd)

    ls = rsub.add_parser("list", help="list the releases in the store")
    ls.add_argument("--store", type=Path, default=DEFAULT_STORE, help="release store directory (default ./releases)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)


def _usage_error(message: str) -> int:
    print(f"edgeops: error: {message}", file=sys.stderr)
    return 2


def _io_error(exc: OSError) -> int:
    print(f"edgeops: error: cannot read {exc.filename or 'a file'}: {exc.strerror or exc}", file=sys.stderr)
    return 1


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _payload_rows(meta: ReleaseMetadata) -> list[dict[str, Any]]:
    return [
        {
            "id": p.id,
            "kind": p.kind.value,
            "base_version": p.base_version,
            "size": p.size,
            "ratio": round(p.size / meta.target_size, 4),
            "codec": p.codec,
            "chunk_count": p.chunk_count,
        }
        for p in meta.payloads
    ]


def _release_doc(rel: PublishedRelease) -> dict[str, Any]:
    meta = rel.meta
    return {
        "release_id": meta.release_id,
        "fleet": meta.fleet,
        "name": meta.name,
        "version": meta.version,
        "profile": meta.profile,
        "created_at": meta.created_at,
        "directory": str(rel.directory),
        "target": {"sha256": meta.target_sha256, "size": meta.target_size},
        "chunk_size": meta.chunk_size,
        "payloads": _payload_rows(meta),
    }


def _print_release(rel: PublishedRelease) -> None:
    meta = rel.meta
    print(f"release {meta.release_id}: {meta.name} {meta.version} for {meta.profile}, fleet {meta.fleet}")
    print(f"  in {rel.directory}, chunks of {meta.chunk_size} bytes")
    print(f"  {'payload':<16}  {'kind':<5}  {'base':<10}  {'bytes':>11}  {'ratio':>6}  {'codec':<18}  {'chunks':>6}")
    for row in _payload_rows(meta):
        base, codec = row["base_version"] or "-", row["codec"] or "-"
        print(
            f"  {row['id']:<16}  {row['kind']:<5}  {base:<10}  {row['size']:>11}  {row['ratio']:>6.3f}  {codec:<18}"
            f"  {row['chunk_count']:>6}"
        )


def _server(args: argparse.Namespace, releases: Sequence[PublishedRelease]) -> ReleaseServer:
    from edgeops.protocol import parse_broker_url
    from edgeops.release_server import ReleaseServer

    return ReleaseServer(
        parse_broker_url(args.broker),
        args.fleet,
        releases,
        client_id=f"edgeops-release-{secrets.token_hex(6)}",
        username=args.username,
        password=args.password,
        ca_certs=args.ca,
        cert_file=args.cert,
        key_file=args.cert_key,
    )


@contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (systemd, kill) ends serving as Ctrl-C does. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve_until_stopped(server: ReleaseServer, duration: float | None, rescan: Callable[[], None] | None) -> None:
    stop = threading.Event()
    deadline = None if duration is None else time.monotonic() + duration
    with _stop_on_sigterm(stop):
        try:
            while not stop.is_set():
                left = RESCAN_S if deadline is None else min(RESCAN_S, deadline - time.monotonic())
                if left <= 0 or stop.wait(left):
                    break
                if rescan is not None:
                    rescan()
        except KeyboardInterrupt:
            _progress("interrupted: stopping")


def _publish(args: argparse.Namespace) -> int:
    from edgeops.protocol import parse_broker_url, validate_segment
    from edgeops.release_builder import build_release
    from edgeops.signing import load_private_key, load_public_key

    try:
        validate_segment(args.fleet, "fleet")
        if args.broker is not None:
            parse_broker_url(args.broker)
        if args.serve and args.broker is None:
            raise ValueError("--serve needs --broker")
        if args.duration is not None and not args.serve:
            raise ValueError("--duration needs --serve")
        for path in [args.artifact, *args.base]:
            if not path.is_file():
                raise ValueError(f"no such artifact: {path}")
    except ValueError as exc:
        return _usage_error(str(exc))
    key = load_private_key(args.key)
    pubkey = load_public_key(args.pubkey) if args.pubkey else None
    try:
        rel = build_release(
            args.artifact, args.base, fleet=args.fleet, key=key, store=args.store, chunk_size=args.chunk_size,
            pubkey=pubkey, progress=_progress,
        )
    except ValueError as exc:
        return _usage_error(str(exc))
    except OSError as exc:
        return _io_error(exc)
    doc: dict[str, Any] = {**_release_doc(rel), "published": False, "manifest_topic": None}
    feed = _trust_feed(args)
    if feed is not None:
        doc["targets_version"] = feed.repo.add_release(rel.meta.release_id, rel.signed, key)
        _progress(f"trust: {rel.meta.release_id} listed in targets v{doc['targets_version']}")
    if args.broker is None:
        if feed is not None:
            feed.messages()
        _progress("no --broker: built the release store only, nothing published")
    else:
        doc.update(_announce(args, rel, feed))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _print_release(rel)
        if doc["published"]:
            print(f"metadata published (retained) on {doc['manifest_topic']}")
        if "stats" in doc:
            print(_stats_line(doc["stats"]))
    return 0


def _announce(args: argparse.Namespace, rel: PublishedRelease, feed: TrustFeed | None) -> dict[str, Any]:
    """Publish the trust metadata, ``rel``'s metadata and, with --serve, serve it. Raises TransportError."""
    from edgeops.errors import TransportError
    from edgeops.protocol import release_topics

    server = _server(args, [rel])
    if feed is not None:
        server.set_retained(feed.messages())
    server.start()
    try:
        if not server.flush(FLUSH_TIMEOUT_S):
            raise TransportError(f"the broker did not acknowledge the release metadata within {FLUSH_TIMEOUT_S:g} s")
        topic = release_topics(args.fleet, rel.meta.release_id).manifest
        out: dict[str, Any] = {"published": True, "manifest_topic": topic}
        if args.serve:
            _progress(f"serving {rel.meta.release_id} (Ctrl-C to stop)")
            refresh = None if feed is None else (lambda: server.set_retained(feed.messages()))
            _serve_until_stopped(server, args.duration, refresh)
            out["stats"] = server.stats()
        return out
    finally:
        server.stop()


def _stats_line(stats: dict[str, Any]) -> str:
    rejected = ", ".join(f"{n} {reason}" for reason, n in stats["rejected"].items()) or "none"
    return (
        f"served {stats['releases']} release(s): {stats['chunks_published']} chunks ({stats['first_sends']} first, "
        f"{stats['resends']} resent), {stats['bytes_published']} bytes, {stats['requests']} requests, "
        f"rejected: {rejected}"
    )


def _serve_cmd(args: argparse.Namespace) -> int:
    from edgeops.protocol import parse_broker_url, validate_segment
    from edgeops.signing import load_public_key

    try:
        validate_segment(args.fleet, "fleet")
        parse_broker_url(args.broker)
    except ValueError as exc:
        return _usage_error(str(exc))
    trusted = [load_public_key(args.pubkey)] if args.pubkey else None
    scan = _StoreScan(args.store, args.fleet, trusted)
    try:
        releases = scan.new_releases()
    except OSError as exc:
        return _io_error(exc)
    if not releases:
        print(f"edgeops: error: no release of fleet {args.fleet} in {args.store}", file=sys.stderr)
        return 1
    feed = _trust_feed(args)
    server = _server(args, releases)
    if feed is not None:
        server.set_retained(feed.messages())
    server.start()
    try:
        _progress(f"serving {len(releases)} release(s) of fleet {args.fleet} (Ctrl-C to stop)")

        def rescan() -> None:
            if feed is not None:
                server.set_retained(feed.messages())
            for rel in scan.new_releases():
                _progress(f"serving new release {rel.meta.release_id}")
                server.add_release(rel)

        _serve_until_stopped(server, args.duration, rescan)
    finally:
        server.stop()
    stats = server.stats()
    if args.json:
        print(json.dumps({"fleet": args.fleet, "store": str(args.store), "stats": stats}, indent=2, sort_keys=True))
    else:
        print(_stats_line(stats))
    return 0


class _StoreScan:
    """The store's releases of one fleet, each returned once (again when it is rebuilt)."""

    def __init__(self, store: Path, fleet: str, trusted: Sequence[Ed25519PublicKey] | None) -> None:
        self.store, self.fleet, self.trusted = store, fleet, trusted
        self._seen: dict[str, bytes] = {}  # release id -> signed metadata served

    def new_releases(self) -> list[PublishedRelease]:
        from edgeops.errors import UntrustedInput
        from edgeops.release_builder import load_releases

        try:
            found = load_releases(self.store, self.trusted)
        except (UntrustedInput, OSError) as exc:  # a release being rebuilt, or a bad one: serve the others
            if not self._seen:
                raise
            _progress(f"skipping a store scan: {exc}")
            return []
        fresh = [r for r in found if r.meta.fleet == self.fleet and self._seen.get(r.meta.release_id) != r.signed]
        for rel in fresh:
            self._seen[rel.meta.release_id] = rel.signed
        return fresh


def _list(args: argparse.Namespace) -> int:
    from edgeops.release_builder import load_releases

    try:
        releases = load_releases(args.store, None)
    except OSError as exc:
        return _io_error(exc)
    if args.json:
        print(json.dumps([_release_doc(r) for r in releases], indent=2, sort_keys=True))
        return 0
    if not releases:
        print(f"no releases in {args.store}")
    for rel in releases:
        _print_release(rel)
    return 0
