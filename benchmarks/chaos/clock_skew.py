"""Clock skew: a device agent whose wall clock is really wrong (libfaketime), R runs per scenario.

    python benchmarks/chaos/clock_skew.py [--runs 3] [--only NAME ...] [--work DIR] [--json PATH]

The scenarios are those of tests/device_agent/test_clock_skew.py (:data:`SCENARIOS`), run here outside pytest:
``edgeops-agent run`` subprocesses under libfaketime (tests/support/skewed_clock.py: wall clock offset, monotonic
clock untouched, the offset stepped mid-run as NTP would), a fresh mosquitto per run, the fleet's TUF repository
(timestamp window 1 day) and release server, the fleet ingest worker into SQLite, artifacts from the digits
example (x86-gateway, ONNX int8) signed with a key made for the run.

- ``ahead``: clock +2 days (past the 1-day timestamp window), then set right;
- ``behind-then-ntp``: an update asked for, a reboot with the clock 1 day behind, then NTP steps it forward;
- ``tls-1970``: mutual TLS, the device boots at 1970-01-12 (before the broker certificate), then the clock is set.

Per scenario: runs; passed (every check of the scenario held); inference answered under skew; telemetry with the
skewed timestamps stored by the fleet (- where the scenario has no fleet store); the refusal a command got under
skew and the clock offset it reported (median); what OTA did under skew; converged after the clock was set right;
timers steady across the steps (no stall, no burst, seq order); the longest telemetry gap around a step; seconds
from the clock set right to the end state (median); seconds per run (median); the first problems seen.

Writes the ``clock_skew`` section of benchmarks/results/reliability.json (``--json``; the other sections are kept)
and prints a table. Exit status: 0 when every run passed; 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.chaos.common import RESULTS, update_section  # noqa: E402
from edgeops.signing import generate_keypair  # noqa: E402
from tests.device_agent.test_clock_skew import PROFILE, SCENARIOS, Kit, Outcome, build_kit  # noqa: E402
from tests.support.artifacts import build_digits, repack  # noqa: E402
from tests.support.skewed_clock import libfaketime  # noqa: E402

DIGITS = REPO / "examples" / "digits" / "out"
SECTION = "clock_skew"


def _digits() -> Path:
    if not (DIGITS / "digits.onnx").is_file() or not (DIGITS / "eval_nchw.npz").is_file():
        subprocess.run([sys.executable, str(REPO / "examples/digits/train.py"), "--out", str(DIGITS)], check=True)
    return DIGITS


def _with_version(version: str) -> Callable[[dict[str, Any]], None]:
    def set_version(doc: dict[str, Any]) -> None:
        doc["version"] = version

    return set_version


def make_kit(work: Path) -> Kit:
    keys = work / "keys"
    generate_keypair(keys)
    base = build_digits(_digits(), work / "arts", keys / "signing.key", "1.0.0", profiles=(PROFILE,))[PROFILE]
    arts = {"1.0.0": base}
    for version in ("1.1.0", "1.2.0"):  # the same model, re-signed as newer versions: small deltas
        arts[version] = repack(base, work / "arts" / f"digits-{version}.edgeops", keys / "signing.key",
                               manifest=_with_version(version))
    return build_kit(work / "kit", keys, _digits(), arts)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def _common(values: list[str]) -> str:
    return max(set(values), key=values.count) if values else ""


def summarize(name: str, outcomes: list[Outcome]) -> dict[str, Any]:
    problems = list(dict.fromkeys(p.splitlines()[0][:300] for o in outcomes for p in o.problems))
    return {
        "scenario": name,
        "offset_s": round(outcomes[0].offset_s),
        "runs": len(outcomes),
        "passed": sum(not o.problems for o in outcomes),
        "inference": sum(o.inference for o in outcomes),
        "telemetry_stored": None if all(o.telemetry_stored is None for o in outcomes)
        else sum(bool(o.telemetry_stored) for o in outcomes),
        "command_refusal": _common([o.command_refusal for o in outcomes]),
        "reported_offset_s_median": _median([o.reported_offset_s for o in outcomes]),
        "ota_under_skew": _common([o.ota_under_skew for o in outcomes]),
        "converged": sum(o.converged for o in outcomes),
        "timers_ok": sum(o.timers_ok for o in outcomes),
        "max_telemetry_gap_s": max((o.max_gap_s for o in outcomes if o.max_gap_s is not None), default=None),
        "recovered_s_median": _median([o.recovered_s for o in outcomes]),
        "seconds_median": _median([o.seconds for o in outcomes]),
        "problems": problems[:3],
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("scenario", "offset", "runs", "passed", "infer", "stored", "command", "reported", "ota", "converged",
            "timers", "gap s", "recover s", "s/run")
    print(f"{head[0]:<16} {head[1]:>12}" + "".join(f"{h:>11}" for h in head[2:6]) + f" {head[6]:<14}{head[7]:>11}"
          f" {head[8]:<17}" + "".join(f"{h:>10}" for h in head[9:]))
    for r in rows:
        stored = "-" if r["telemetry_stored"] is None else r["telemetry_stored"]
        cells = (r["runs"], r["passed"], r["inference"], stored)
        tail = (r["converged"], r["timers_ok"], r["max_telemetry_gap_s"], r["recovered_s_median"], r["seconds_median"])
        print(f"{r['scenario']:<16} {r['offset_s']:>12}" + "".join(f"{c!s:>11}" for c in cells)
              + f" {r['command_refusal'] or '-':<14}{r['reported_offset_s_median']!s:>11} {r['ota_under_skew']:<17}"
              + "".join(f"{c!s:>10}" for c in tail))
    for r in rows:
        for p in r["problems"]:
            print(f"  {r['scenario']}: {p}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--only", action="append", default=[], choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--work", type=Path, help="working directory, kept (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    library = libfaketime()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeops-skew-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        print("building artifacts, the trust repository and two delta releases ...", file=sys.stderr, flush=True)
        kit = make_kit(work / "setup")
        for name, scenario in SCENARIOS.items():
            if args.only and name not in args.only:
                continue
            outcomes = []
            for run in range(args.runs):
                site = work / "runs" / f"{name}-{run}"
                t0 = time.monotonic()
                outcome = scenario(kit, site)
                outcome.seconds = round(time.monotonic() - t0, 2)
                outcomes.append(outcome)
                status = "ok" if not outcome.problems else "; ".join(outcome.problems)[:300]
                print(f"{name} run {run + 1}/{args.runs}: {outcome.seconds} s, {status}", file=sys.stderr, flush=True)
                if not outcome.problems:
                    shutil.rmtree(site, ignore_errors=True)
            rows.append(summarize(name, outcomes))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    section = {
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "mechanism": f"libfaketime ({library.name}), FAKETIME_DONT_FAKE_MONOTONIC=1, offset file stepped mid-run",
        "runs_per_scenario": args.runs,
        "seconds_total": round(time.monotonic() - started, 1),
        "totals": {k: sum(r[k] for r in rows) for k in ("runs", "passed", "converged")},
        "scenarios": rows,
    }
    update_section(SECTION, section, args.json)
    print_table(rows)
    t = section["totals"]
    print(f"\n{t['runs']} runs in {section['seconds_total']} s: {t['passed']} passed, {t['converged']} converged; "
          f"written to {args.json} [{SECTION}]")
    return 0 if all(r["passed"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
