"""``edgeops pki init|issue-device|issue-client|set-groups|revoke-device|list``: the fleet's certificates, the broker
ACL and the mosquitto configuration (:mod:`edgeops.pki`, docs/pki.md). Private keys are written 0600 and never
printed. Exit status: 0 done; 1 an edgeops error (one line: existing CA, bad or taken name, unwritable file); 2 a
usage error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]

_RELOAD = "reload the broker (SIGHUP, e.g. `systemctl reload mosquitto`) to apply it"


def _dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=Path("pki"), metavar="DIR", help="the PKI directory (default ./pki)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pki", help="fleet certificates, broker ACL and mosquitto TLS configuration")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = psub.add_parser(
        "init", help="create the fleet CA, the broker and fleet service certificates, the ACL and mosquitto.conf",
        description="Create a fleet PKI in DIR: CA (ECDSA P-256), broker server certificate, the fleet service's "
        "client identity (CN edgeops-fleet), an empty registry and CRL, the ACL and a mosquitto.conf with a TLS "
        "listener that requires client certificates. Keep ca.key offline.",
    )
    init.add_argument("--fleet", required=True, help="fleet name (the topics' edgeops/v1/FLEET/ level)")
    init.add_argument("--broker-host", action="append", default=[], metavar="HOST",
                      help="DNS name or IP address clients use for the broker (repeatable; default localhost and "
                      "127.0.0.1)")
    init.add_argument("--port", type=int, default=8883, help="the TLS listener's port (default 8883)")
    init.add_argument("--broker-dir", type=Path, metavar="ABS_DIR",
                      help="where the broker host keeps ca.crt, broker.crt/.key, crl.pem and acl (the paths written "
                      "into mosquitto.conf; default: this PKI directory)")
    init.add_argument("--days", type=int, default=3650, help="CA lifetime in days (default 3650; leaves 825 at most)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")
    _dir_option(init)
    init.set_defaults(func=_init)

    dev = psub.add_parser("issue-device", help="issue a device's certificate and key (CN = device id)",
                          description="Issue ID's client certificate and key into DIR/devices/ID (or --out) and "
                          "grant it its topics in the ACL. Copy device.key, device.crt and ca.crt to the device.")
    dev.add_argument("device_id", metavar="ID", help="device id (as in the agent's agent.toml)")
    dev.add_argument("--group", action="append", default=[], metavar="G",
                     help="a group whose command topic the device may read (repeatable; match agent.toml groups)")
    dev.add_argument("--out", type=Path, metavar="DIR", help="write the device's files here instead")
    dev.add_argument("--days", type=int, default=825, help="certificate lifetime in days (default 825)")
    dev.add_argument("--reissue", action="store_true", help="replace an existing device's certificate (revokes it)")
    _dir_option(dev)
    dev.set_defaults(func=_issue_device)

    cli = psub.add_parser("issue-client", help="issue an operator / CI identity with the fleet service's access",
                          description="Issue NAME's client certificate and key into DIR/clients/NAME (or --out), "
                          "for `edgeops command send`, `deploy` and `release publish` (--ca/--cert/--cert-key).")
    cli.add_argument("name", metavar="NAME", help="identity name (the certificate's CN)")
    cli.add_argument("--role", choices=("operator", "fleet"), default="operator", help="recorded role")
    cli.add_argument("--out", type=Path, metavar="DIR", help="write the files here instead")
    cli.add_argument("--days", type=int, default=825, help="certificate lifetime in days (default 825)")
    cli.add_argument("--reissue", action="store_true", help="replace an existing identity's certificate")
    _dir_option(cli)
    cli.set_defaults(func=_issue_client)

    grp = psub.add_parser("set-groups", help="replace a device's groups (the group command topics it may read)")
    grp.add_argument("device_id", metavar="ID")
    grp.add_argument("groups", nargs="*", metavar="G", help="the device's groups (none: no group topics)")
    _dir_option(grp)
    grp.set_defaults(func=_set_groups)

    rev = psub.add_parser("revoke-device", help="revoke a device's (or a client's) certificate",
                          description="Add the certificate's serial to crl.pem and drop its ACL block. mosquitto "
                          "applies both on SIGHUP (new handshakes refused, the open connection loses every topic); "
                          "a restart closes the open connection.")
    rev.add_argument("device_id", metavar="ID")
    _dir_option(rev)
    rev.set_defaults(func=_revoke)

    ls = psub.add_parser("list", help="devices and clients with groups, serial, expiry, revocation")
    _dir_option(ls)
    ls.set_defaults(func=_list)


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> int:
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else text)
    return 0


def _init(args: argparse.Namespace) -> int:
    from edgeops.pki import FLEET_IDENTITY, init_pki, load_registry

    hosts = tuple(args.broker_host) or ("localhost", "127.0.0.1")
    layout = init_pki(args.dir, fleet=args.fleet, broker_hosts=hosts, days=args.days, port=args.port,
                      force=args.force, broker_dir=args.broker_dir)
    fleet_rec = load_registry(args.dir).clients[FLEET_IDENTITY]
    doc = {"dir": str(layout.directory), "fleet": args.fleet, "broker_hosts": list(hosts), "port": args.port,
           "ca_cert": str(layout.ca_cert), "ca_key": str(layout.ca_key), "broker_cert": str(layout.broker_cert),
           "fleet_cert": str(layout.fleet_cert), "fleet_key": str(layout.fleet_key), "crl": str(layout.crl),
           "acl": str(layout.acl), "mosquitto_conf": str(layout.mosquitto_conf), "registry": str(layout.registry),
           "fleet_serial": fleet_rec.serial}
    return _print(args, doc, f"fleet {args.fleet} PKI in {layout.directory}: run the broker with "
                  f"`mosquitto -c {layout.mosquitto_conf}`; keep {layout.ca_key} offline")


def _issued(args: argparse.Namespace, name: str, rec: Any, paths: Any, kind: str) -> int:
    doc = {"name": name, "kind": kind, "serial": rec.serial, "not_after": rec.not_after, "groups": list(rec.groups),
           "role": rec.role, "key": str(paths.key), "cert": str(paths.cert), "ca_cert": str(paths.ca_cert)}
    text = (f"{kind} {name}: {paths.cert} (serial {rec.serial}, until {rec.not_after}), key {paths.key}; {_RELOAD}"
            + (" (the old certificate is revoked)" if args.reissue else ""))
    return _print(args, doc, text)


def _issue_device(args: argparse.Namespace) -> int:
    from edgeops.pki import issue_device, load_registry

    paths = issue_device(args.dir, args.device_id, groups=args.group, days=args.days, out=args.out,
                         reissue=args.reissue)
    return _issued(args, args.device_id, load_registry(args.dir).devices[args.device_id], paths, "device")


def _issue_client(args: argparse.Namespace) -> int:
    from edgeops.pki import issue_client, load_registry

    paths = issue_client(args.dir, args.name, role=args.role, days=args.days, out=args.out, reissue=args.reissue)
    return _issued(args, args.name, load_registry(args.dir).clients[args.name], paths, "client")


def _set_groups(args: argparse.Namespace) -> int:
    from edgeops.pki import set_groups

    rec = set_groups(args.dir, args.device_id, args.groups)
    doc = {"name": rec.name, "groups": list(rec.groups)}
    return _print(args, doc, f"device {rec.name}: groups {', '.join(rec.groups) or '(none)'}; {_RELOAD}")


def _revoke(args: argparse.Namespace) -> int:
    from edgeops.pki import revoke_device

    rec = revoke_device(args.dir, args.device_id)
    doc = {"name": rec.name, "serial": rec.serial, "revoked": True, "broker": "reload (SIGHUP) or restart"}
    return _print(args, doc, f"revoked {rec.name} (serial {rec.serial}): {_RELOAD} — new connections are refused and "
                  "its open connection loses every topic; restart the broker to close that connection")


def _list(args: argparse.Namespace) -> int:
    from edgeops.pki import load_registry

    reg = load_registry(args.dir)
    devices = [{"name": k, **v.to_json()} for k, v in sorted(reg.devices.items())]
    clients = [{"name": k, **v.to_json()} for k, v in sorted(reg.clients.items())]
    if args.json:
        return _print(args, {"fleet": reg.fleet, "devices": devices, "clients": clients}, "")
    print(f"fleet {reg.fleet}: {len(devices)} device(s), {len(clients)} client(s)")
    for kind, rows in (("device", devices), ("client", clients)):
        for r in rows:
            extra = (",".join(r["groups"]) or "-") if kind == "device" else r["role"]
            state = "REVOKED" if r["revoked"] else "valid"
            print(f"{kind:<7} {r['name']:<24} {state:<8} {r['not_after']:<21} {r['serial']:<40} {extra}")
    return 0
