"""``edgeops keys init``, ``edgeops verify`` and ``edgeops inspect`` (light: no model framework imported)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeops.artifact import read_unverified_manifest, verify_artifact
from edgeops.errors import EdgeopsError
from edgeops.signing import generate_keypair, load_public_key

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage signing keys")
    ksub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = ksub.add_parser("init", help="create an Ed25519 signing key pair (signing.key, signing.pub)")
    init.add_argument("--dir", type=Path, required=True, help="folder for the keys")
    init.add_argument("--force", action="store_true", help="overwrite existing keys")
    init.set_defaults(func=_keys_init)

    verify = sub.add_parser("verify", help="check an artifact's structure, signature and file hashes")
    verify.add_argument("artifact", type=Path)
    verify.add_argument("--pubkey", type=Path, required=True, action="append", help="trusted public key (repeatable)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_verify)

    inspect = sub.add_parser("inspect", help="print an artifact's manifest summary (not a trust check)")
    inspect.add_argument("artifact", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    inspect.set_defaults(func=_inspect)


def _keys_init(args: argparse.Namespace) -> int:
    priv, pub = generate_keypair(args.dir, overwrite=args.force)
    print(f"wrote {priv} (keep it secret) and {pub}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    keys = [load_public_key(p) for p in args.pubkey]
    try:
        verified = verify_artifact(args.artifact, keys)
    except FileNotFoundError:
        print(f"edgeops: invalid: {args.artifact}: no such file", file=sys.stderr)
        return 1
    except EdgeopsError as exc:
        if args.json:
            print(json.dumps({"valid": False, "reason": str(exc)}))
        print(f"edgeops: invalid: {args.artifact}: {exc}", file=sys.stderr)
        return 1
    m = verified.manifest
    if args.json:
        print(
            json.dumps(
                {"valid": True, "name": m.name, "version": m.version, "profile": m.profile, "keyid": verified.keyid}
            )
        )
    else:
        print(f"valid: {m.name} {m.version} for {m.profile} ({m.format}, {m.precision}), key {verified.keyid[:16]}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    try:
        m = read_unverified_manifest(args.artifact)
    except FileNotFoundError:
        raise EdgeopsError(f"{args.artifact}: no such file") from None
    if args.json:
        sys.stdout.write(m.to_bytes().decode())
        return 0
    print(f"{m.name} {m.version}  profile {m.profile}  {m.format}/{m.precision} on {m.runtime}")
    for kind, tensors in (("input", m.inputs), ("output", m.outputs)):
        for t in tensors:
            quant = f" q(scale={t.scale:.4g}, zp={t.zero_point})" if t.scale is not None else ""
            perm = f" transpose{tuple(t.transpose)}" if t.transpose else ""
            print(f"  {kind:<6} {t.name}: {t.dtype}{list(t.shape)} model {t.model_dtype}{quant}{perm}")
    for f in m.files:
        print(f"  file   {f.path} {f.size} bytes sha256 {f.sha256[:16]}…")
    metrics = m.gate.get("metrics", {})
    print("  gate   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    print(f"  source {m.source.get('file')} sha256 {str(m.source.get('sha256'))[:16]}…")
    print("  signature NOT checked here: use edgeops verify --pubkey")
    return 0
