"""`edgeops trust ...` and `edgeops release publish --trust-dir` as an operator runs them (real keys and files)."""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeops.trust import TrustSession, check_release

ROOT = Path(__file__).resolve().parents[2]


def edgeops(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeops", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, check=False, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def ok(*args: str | Path, cwd: Path) -> Any:
    done = edgeops(*args, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_trust_repository_lifecycle(tmp_path: Path, keys_dir: Path) -> None:
    doc = ok("trust", "init", "--dir", "trust", "--fleet", "acme", "--artifacts-key", keys_dir / "signing.pub",
             "--timestamp-expiry", "7200", cwd=tmp_path)
    assert doc["root_versions"] == [1] and doc["roles"]["root"]["threshold"] == 2
    assert {"targets", "snapshot", "timestamp"} <= set(doc["metadata"]) and not doc["timestamp_due"]
    keys = tmp_path / "trust" / "keys"
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys.glob("*.key"))
    again = edgeops("trust", "init", "--dir", "trust", "--fleet", "acme", cwd=tmp_path)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "refusing to overwrite" in again.stderr

    # one root key is below the threshold: refused in one line, nothing written
    edgeops("keys", "init", "--dir", "new", cwd=tmp_path)
    short = edgeops("trust", "rotate", "--dir", "trust", "--role", "commands", "--new-key", "new/signing.pub",
                    "--root-key", keys / "root-1.key", cwd=tmp_path)
    assert short.returncode == 1 and "signed by 1/2" in short.stderr and short.stderr.count("\n") == 1
    rotated = ok("trust", "rotate", "--dir", "trust", "--role", "commands", "--new-key", "new/signing.pub",
                 "--root-key", keys / "root-1.key", "--root-key", keys / "root-3.key", cwd=tmp_path)
    assert rotated["root_versions"] == [1, 2] and rotated["roles"]["commands"]["keyids"] != doc["roles"]["commands"][
        "keyids"]

    # a release published into the trust directory (no broker): listed in targets, trusted by a device's checks
    artifact = _digits_artifact(tmp_path, keys_dir)
    pub = ok("release", "publish", artifact, "--fleet", "acme", "--key", keys / "targets.key", "--trust-dir", "trust",
             "--timestamp-key", keys / "timestamp.key", "--store", "releases", cwd=tmp_path)
    status = ok("trust", "status", "--dir", "trust", cwd=tmp_path)
    assert status["releases"] == [f"releases/{pub['release_id']}"] and pub["targets_version"] == 2
    meta = tmp_path / "trust" / "metadata"
    session = TrustSession((meta / "root" / "1.json").read_bytes(), now=dt.datetime.now(dt.timezone.utc))
    session.update_roots({2: (meta / "root" / "2.json").read_bytes()})
    state = session.refresh(**{r: (meta / f"{r}.json").read_bytes() for r in ("timestamp", "snapshot", "targets")})
    signed = (tmp_path / "releases" / pub["release_id"] / "release.signed").read_bytes()
    assert check_release(state, pub["release_id"], signed).version == pub["version"]

    # the release key must be the targets key of the current root
    wrong = edgeops("release", "publish", artifact, "--fleet", "acme", "--key", keys_dir / "signing.key",
                    "--trust-dir", "trust", "--store", "releases2", cwd=tmp_path)
    assert wrong.returncode == 1 and "none of the keys given is a targets key of root v2" in wrong.stderr


def _digits_artifact(tmp_path: Path, keys_dir: Path) -> Path:
    """The digits example built for x86-gateway (ONNX: a few seconds)."""
    from tests.support.artifacts import build_digits

    digits = ROOT / "examples" / "digits" / "out"
    return build_digits(digits, tmp_path / "dist", keys_dir / "signing.key", "1.0.0", profiles=("x86-gateway",))[
        "x86-gateway"]
