"""The broker options every ``edgeops`` command that connects to MQTT shares: credentials and TLS files.

``--cert``/``--cert-key`` are the client certificate and key for mutual TLS (``edgeops pki issue-client`` or the
PKI's fleet.crt/fleet.key); ``--key`` stays the Ed25519 signing key of the commands that sign something. The
values land on ``args.username``, ``args.password``, ``args.ca``, ``args.cert`` and ``args.cert_key``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_broker_options"]


def add_broker_options(p: argparse.ArgumentParser) -> None:
    """Add ``--username --password --ca --cert --cert-key`` to ``p``."""
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password", help="broker password")
    p.add_argument("--ca", type=Path, help="CA certificate file for mqtts:// (default: the system's)")
    p.add_argument("--cert", type=Path, metavar="CRT",
                   help="client certificate for mutual TLS (PEM; e.g. from `edgeops pki issue-client`)")
    p.add_argument("--cert-key", type=Path, metavar="KEY",
                   help="the client certificate's private key (PEM, mode 0600; default: in --cert)")
