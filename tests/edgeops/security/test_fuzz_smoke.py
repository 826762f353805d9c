"""The coverage-guided fuzzer in CI: every target of benchmarks/fuzz/targets.py runs a short, repeatable atheris
session (2,000 executions, fixed libFuzzer seed) through benchmarks/fuzz/run.py and finds nothing; and the
runner itself reports a crash (an exception the parser must not raise) and a hang as findings, with the input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from benchmarks.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[3]
RUN = ROOT / "benchmarks" / "fuzz" / "run.py"
SMOKE_RUNS = 2000


def _run(args: list[str], *, cwd: Path, pythonpath: Path | None = None, timeout: float) -> tuple[int, dict[str, Any]]:
    out = cwd / "fuzz.json"
    env_path = os.pathsep.join(str(p) for p in (pythonpath, ROOT) if p is not None)
    proc = subprocess.run(
        [sys.executable, str(RUN), *args, "--no-keep", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": env_path},
    )
    assert out.is_file(), proc.stdout + proc.stderr
    return proc.returncode, json.loads(out.read_text())


def test_every_target_survives_a_short_session(tmp_path: Path) -> None:
    code, doc = _run(["--runs", str(SMOKE_RUNS), "--seed", "1"], cwd=tmp_path, timeout=240)
    assert set(doc["targets"]) == set(TARGETS)
    for name, result in doc["targets"].items():
        assert result["findings"] == [], f"{name}: {result['findings']}"
        assert result["status"] == "ok", f"{name}: {result.get('error', '')}"
        assert result["executions"] >= SMOKE_RUNS, name
        assert result["coverage"] > 0 and result["peak_rss_mb"] > 0, name
    assert code == 0


_BROKEN_TARGETS = textwrap.dedent(
    """
    from benchmarks.fuzz.targets import FuzzTarget
    from edgeops.errors import ReleaseRejected


    def _leaks_key_error(data: bytes) -> None:
        if data[:1] == b"r":
            raise ReleaseRejected("malformed")  # the typed refusal: normal
        if data[:2] != b"ok":
            raise KeyError("untyped")  # anything else: a crash


    def _hangs(data: bytes) -> None:
        while data[:1] == b"h":
            pass


    TARGETS = {
        "leaks": FuzzTarget(_leaks_key_error, (ReleaseRejected,), lambda: (b"ok", b"r"), max_len=16),
        "hangs": FuzzTarget(_hangs, (ReleaseRejected,), lambda: (b"x", b"h"), max_len=16),
    }
    """
)


def test_crashes_and_hangs_are_findings_with_their_input(tmp_path: Path) -> None:
    (tmp_path / "broken_targets.py").write_text(_BROKEN_TARGETS)
    code, doc = _run(["--registry", "broken_targets", "--runs", "500", "--timeout-s", "1"], cwd=tmp_path,
                     pythonpath=tmp_path, timeout=120)
    assert code == 1
    leaks, hangs = doc["targets"]["leaks"], doc["targets"]["hangs"]
    assert leaks["status"] == hangs["status"] == "findings"
    [crash] = leaks["findings"]  # the same bug found again after the restart is not counted twice
    assert crash["kind"] == "crash" and crash["exception"] == "KeyError: 'untyped'"
    assert "_leaks_key_error" in crash["location"]
    assert bytes.fromhex(crash["input_hex"])[:2] != b"ok" and bytes.fromhex(crash["input_hex"])[:1] != b"r"
    [hang] = hangs["findings"]
    assert hang["kind"] == "timeout" and bytes.fromhex(hang["input_hex"]).startswith(b"h")
