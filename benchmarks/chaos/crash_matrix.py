"""Crash-point matrix: kill -9 the agent at every named fault point, R times each, and count what a user would see.

    python benchmarks/chaos/crash_matrix.py [--runs 3] [--only GLOB ...] [--work DIR] [--json PATH]

The cases are those of tests/device_agent/test_crash_matrix.py (:func:`run_case`, one scenario per group of
points in device_agent/fault_points.py), run here outside pytest: real ``edgeops-agent`` subprocesses, a fresh
mosquitto on a free 127.0.0.1 port per run, the release server in this process, artifacts built by the real
``edgeops build`` from the digits example (x86-gateway, ONNX int8) and signed with a key made for the run.

Per point: runs; killed (the first run ended by SIGKILL at the point: the harness reached it); converged (the
restarted agent reached the scenario's end state: the right version serving, an interrupted OTA finished, every
spooled message delivered, the trust store loaded); corrupted (runs where a slot the state names failed
re-verification or held another version than the state says); lost, duplicated and reordered telemetry messages
(spool points; duplicates are re-sends of messages in flight at the kill, allowed by at-least-once delivery);
median seconds per run; the first problems seen.

Writes the ``crash_points`` section of benchmarks/results/reliability.json (``--json``; the other sections are
kept) and prints a table. Exit status: 0 when every run was killed at its point, converged, with nothing corrupted
or lost; 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.chaos.common import RESULTS, update_section  # noqa: E402
from device_agent.fault_points import POINTS  # noqa: E402
from edgeops.signing import generate_keypair  # noqa: E402
from tests.device_agent.test_crash_matrix import GROUPS, Outcome, build_kit, run_case  # noqa: E402

DIGITS = REPO / "examples" / "digits" / "out"
SECTION = "crash_points"


def _digits() -> Path:
    if not (DIGITS / "digits.onnx").is_file() or not (DIGITS / "eval_nchw.npz").is_file():
        subprocess.run([sys.executable, str(REPO / "examples/digits/train.py"), "--out", str(DIGITS)], check=True)
    return DIGITS


def _summary(group: str, spec: str, outcomes: list[Outcome]) -> dict[str, Any]:
    problems = list(dict.fromkeys(p.splitlines()[0][:300] for o in outcomes for p in o.problems))
    return {
        "point": spec.partition("@")[0],
        "spec": spec,
        "group": group,
        "runs": len(outcomes),
        "killed": sum(o.killed for o in outcomes),
        "converged": sum(o.converged for o in outcomes),
        "corrupted": sum(o.corrupted for o in outcomes),
        "lost": sum(o.lost for o in outcomes),
        "duplicated": sum(o.duplicated for o in outcomes),
        "reordered": sum(o.reordered for o in outcomes),
        "seconds_median": round(statistics.median(o.seconds for o in outcomes), 2),
        "problems": problems[:3],
    }


def _ok(row: dict[str, Any]) -> bool:
    n = row["runs"]
    return row["killed"] == n and row["converged"] == n and not (row["corrupted"] or row["lost"] or row["reordered"])


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("point", "group", "runs", "killed", "converged", "corrupted", "lost", "dup", "s/run")
    print(f"{head[0]:<28} {head[1]:<9}" + "".join(f"{h:>10}" for h in head[2:]))
    for r in rows:
        cells = (r["runs"], r["killed"], r["converged"], r["corrupted"], r["lost"], r["duplicated"])
        print(f"{r['spec']:<28} {r['group']:<9}" + "".join(f"{c:>10}" for c in cells) + f"{r['seconds_median']:>10}")
    print()
    for r in rows:
        for p in r["problems"]:
            print(f"  {r['spec']}: {p}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="kill-and-restart runs per point (default 3)")
    parser.add_argument("--only", action="append", default=[], help="fault specs or groups to run (glob)")
    parser.add_argument("--work", type=Path, help="working directory, kept (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeops-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        generate_keypair(work / "keys")
        print("building artifacts, the 2.0.0 delta release and data-dir templates ...", file=sys.stderr, flush=True)
        kit = build_kit(work / "kit", work / "keys", _digits())
        rows: list[dict[str, Any]] = []
        for group, (cases, _, _) in GROUPS.items():
            for spec in cases:
                if args.only and not any(fnmatch.fnmatch(s, pat) for pat in args.only for s in (spec, group)):
                    continue
                outcomes = []
                for run in range(args.runs):
                    site = work / "runs" / f"{spec.replace('@', '-at-')}-{run}"
                    outcome = run_case(kit, group, spec, site)
                    outcomes.append(outcome)
                    status = "ok" if not outcome.problems else "; ".join(outcome.problems)[:200]
                    print(
                        f"{spec} run {run + 1}/{args.runs}: {outcome.seconds} s, {status}", file=sys.stderr, flush=True
                    )
                    if not outcome.problems:
                        shutil.rmtree(site, ignore_errors=True)
                rows.append(_summary(group, spec, outcomes))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    section = {
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "runs_per_point": args.runs,
        "seconds_total": round(time.monotonic() - started, 1),
        "points_covered": len({r["point"] for r in rows}),
        "points_defined": len(POINTS),
        "totals": {
            k: sum(r[k] for r in rows)
            for k in ("runs", "killed", "converged", "corrupted", "lost", "duplicated", "reordered")
        },
        "points": rows,
    }
    update_section(SECTION, section, args.json)
    print_table(rows)
    t = section["totals"]
    print(
        f"\n{section['points_covered']} points, {t['runs']} runs in {section['seconds_total']} s: {t['converged']} "
        f"converged, {t['corrupted']} corrupted, {t['lost']} lost, {t['duplicated']} duplicated; written to "
        f"{args.json} [{SECTION}]"
    )
    return 0 if all(_ok(r) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
