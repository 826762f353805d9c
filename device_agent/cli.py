"""``edgeops-agent``: the device-side command line.

Implemented now: ``check`` — what the agent does before it ever loads a model: verify the artifact against
the trusted keys, check that its profile is the device's, and run its golden inputs through the real runtime,
comparing with the golden outputs. Exit 0 when the artifact would pass the agent's install gate.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeops.artifact import VerifiedArtifact, verify_artifact
from edgeops.errors import EdgeopsError, UntrustedInput
from edgeops.runtime import ModelRunner, open_model
from edgeops.signing import load_public_key

__all__ = ["golden_check", "main"]


def _npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise UntrustedInput(f"golden file is not a valid .npy: {exc}") from None


def golden_check(artifact: VerifiedArtifact, *, threads: int = 1) -> float:
    """Run the golden inputs; return the largest excess over tolerance (≤ 0 passes). Raises EdgeopsError."""
    m = artifact.manifest
    if m.golden is None:
        raise UntrustedInput("artifact has no golden pairs: the health gate cannot run")
    backend = open_model(artifact.read(m.model_file), m.format, threads=threads)
    transpose = {t.name: t.transpose for t in m.inputs if t.transpose}
    runner = ModelRunner(backend, transpose=transpose)  # type: ignore[arg-type]
    outputs = runner.run({n: _npy(artifact.read(p)) for n, p in m.golden.inputs.items()})
    worst = -np.inf
    for name, member in m.golden.outputs.items():
        want = _npy(artifact.read(member)).astype(np.float64)
        got = outputs[name].astype(np.float64).reshape(want.shape)
        excess = np.abs(got - want) - (m.golden.atol + m.golden.rtol * np.abs(want))
        worst = max(worst, float(excess.max()))
    return worst


def _check(args: argparse.Namespace) -> int:
    keys = [load_public_key(p) for p in args.pubkey]
    artifact = verify_artifact(args.artifact, keys)
    m = artifact.manifest
    if args.profile and m.profile != args.profile:
        raise UntrustedInput(f"artifact is for profile {m.profile!r}, this device is {args.profile!r}")
    result = {"valid": True, "name": m.name, "version": m.version, "profile": m.profile, "golden": "not run"}
    if m.format != "coreml":
        excess = golden_check(artifact, threads=args.threads)
        if excess > 0:
            raise UntrustedInput(f"golden outputs differ beyond tolerance (by {excess:.3g})")
        result["golden"] = "passed"
    print(json.dumps(result) if args.json else f"ok: {m.name} {m.version} ({m.profile}); golden {result['golden']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeops-agent", description="edgeops device agent")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="verify an artifact and run its golden inputs, as the agent would")
    check.add_argument("artifact", type=Path)
    check.add_argument("--pubkey", type=Path, action="append", required=True, help="trusted key (repeatable)")
    check.add_argument("--profile", help="the device's profile; the artifact must match it")
    check.add_argument("--threads", type=int, default=1)
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_check)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeopsError as exc:
        print(f"edgeops-agent: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
