"""Disk full: the device's data disk fills up during an OTA, while telemetry is spooled and during a local install.

    python benchmarks/chaos/disk_full.py [--runs 3] [--scenarios a,b] [--work DIR] [--json PATH]

Each run puts the agent's data directory on a small disk of its own (tests/support/small_disk.py: a tmpfs in a
private mount namespace, or RLIMIT_FSIZE where no namespace can be made; the JSON says which) and runs one
scenario of benchmarks/chaos/disk_full_scenarios.py there, with a fresh mosquitto outside the namespace. The disk
is filled with a ballast file, the fault is met, the ballast is removed, and recovery is checked on the same
disk. Scenarios:

- ``ota-no-room-for-download``: less free space than the payload (a full artifact) when the update is asked for.
- ``ota-no-room-for-install``: room for the download (a delta) but not for the applied target and the slot copy.
- ``ota-fills-during-download``: the disk fills once the download has started (its file is preallocated): the
  slot copy of the finished download meets the full disk.
- ``ota-fills-before-apply``: the same with a delta payload: applying it meets the full disk.
- ``spool-offline``: broker unreachable, telemetry every tick on a full disk until the RAM fallback overflows.
- ``spool-online``: the same with the broker up (delivered messages cannot be deleted from the spool).
- ``restart-on-full-disk``: the agent stopped and started again while the disk is full.
- ``install-no-room``: ``edgeops-agent install`` with no room for the slot copy; then (tmpfs) room for the copy but
  none for the commit of state.json.

What is counted, per run (what a user would notice): *converged* (after the space came back, the device reached
the scenario's end state: the update installed, every message delivered or counted, the install done);
*corrupted* (a slot state.json names fails verification or holds another version, or state.json changed under a
failed update); *lost* (messages neither delivered nor counted in a ``spool.dropped`` event); *counted drops*;
inference answers and failures meanwhile; the reason the agent gave; files left behind by a failed update; who
retried (the agent by itself, or the operator); seconds from freeing the space to recovery.

Writes the ``disk_full`` section of benchmarks/results/reliability.json (``--json``; other sections are kept)
and prints a table. Exit status 1 when a run did not converge, corrupted something, lost a message beyond the
counted drops, left files behind or failed an inference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.chaos.common import RESULTS, update_section  # noqa: E402
from benchmarks.chaos.disk_full_scenarios import PROFILE, SCENARIOS, agent_config  # noqa: E402
from tests.support import small_disk  # noqa: E402
from tests.support.mosquitto import MosquittoBroker  # noqa: E402

__all__ = ["SECTION", "DiskSetup", "make_setup", "run_scenario"]

SECTION = "disk_full"
DISK_BYTES = 8 << 20  # the small disk: room for three slots of the digits model, the spool and a download
RUN_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class DiskSetup:
    """Shared by every run: keys, the 1.0.0 and 1.1.0 artifacts, a data dir with 1.0.0 installed."""

    work: Path
    keys: Path
    digits: Path
    base: Path
    target: Path
    template: Path


def make_setup(work: Path, keys: Path, digits: Path, base: Path, target: Path) -> DiskSetup:
    """A data dir with ``base`` installed under ``work/template`` (the agent's own install), for every run."""
    from device_agent.agent import Agent

    spec = {"root": str(work / "template"), "keys": str(keys), "broker": "mqtt://127.0.0.1:1"}
    agent = Agent(agent_config(spec, "mqtt://127.0.0.1:1"), connect=False, serve_api=False)
    try:
        agent.load_slots()
        gate = agent.install(base, source="cli")
        if not gate.passed:
            raise RuntimeError(f"template install of {base} failed: {gate.reason}")
    finally:
        agent.stop()
    return DiskSetup(work, keys, digits, base, target, work / "template" / "data")


def run_scenario(setup: DiskSetup, scenario: str, site: Path) -> dict[str, Any]:
    """One run of ``scenario`` on a fresh small disk at ``site/disk`` with a fresh broker; its result dict."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: {SCENARIOS}")
    site.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(site / "mosquitto")
    broker.start()
    try:
        spec = {
            "scenario": scenario,
            "root": str(site / "disk"),
            "template": str(setup.template),
            "keys": str(setup.keys),
            "digits": str(setup.digits),
            "base": str(setup.base),
            "target": str(setup.target),
            "work": str(site / "work"),
            "broker": broker.url,
        }
        (site / "work").mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "benchmarks.chaos.disk_full_scenarios", json.dumps(spec)]
        try:
            return small_disk.run_json(argv, site / "disk", size=DISK_BYTES, timeout=RUN_TIMEOUT_S, cwd=REPO)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
            return {"scenario": scenario, "mechanism": small_disk.mechanism(), "converged": False, "problems": problems}
    finally:
        broker.stop()


def ok(run: dict[str, Any]) -> bool:
    """A run with nothing a user would complain about."""
    return bool(
        run.get("converged")
        and not run.get("corrupted")
        and not run.get("lost")
        and not run.get("left_behind")
        and not run.get("infer_failed")
        and not run.get("problems")
    )


def summarize(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    recovery = [r["recovery_s"] for r in runs if r.get("recovery_s") is not None]
    problems = list(dict.fromkeys(p.splitlines()[0][:300] for r in runs for p in r.get("problems", [])))
    return {
        "runs": len(runs),
        "mechanism": sorted({r.get("mechanism", "?") for r in runs}),
        "converged": sum(bool(r.get("converged")) for r in runs),
        "corrupted": sum(bool(r.get("corrupted")) for r in runs),
        "lost": sum(int(r.get("lost", 0)) for r in runs),
        "counted_drops": sum(int(r.get("counted_drops", 0)) for r in runs),
        "produced": sum(int(r.get("produced", 0)) for r in runs),
        "delivered": sum(int(r.get("delivered", 0)) for r in runs),
        "duplicated": sum(int(r.get("duplicated", 0)) for r in runs),
        "left_behind": sum(bool(r.get("left_behind")) for r in runs),
        "infer_ok": sum(int(r.get("infer_ok", 0)) for r in runs),
        "infer_failed": sum(int(r.get("infer_failed", 0)) for r in runs),
        "reasons": sorted({str(r.get("reason")) for r in runs if r.get("reason")}),
        "retried_by": sorted({str(r.get("retried_by")) for r in runs if r.get("retried_by")}),
        "recovery_s_median": round(statistics.median(recovery), 2) if recovery else None,
        "recovery_s_max": max(recovery) if recovery else None,
        "seconds_median": round(statistics.median(float(r.get("seconds", 0.0)) for r in runs), 2),
        "ok": sum(ok(r) for r in runs),
        "notes": list(dict.fromkeys(n for r in runs for n in r.get("notes", []) if not n.startswith("events:")))[:4],
        "problems": problems[:3],
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<27} {'runs':>4} {'conv':>4} {'corr':>4} {'lost':>4} {'counted':>7} {'dup':>4} "
        f"{'infer ok/fail':>13} {'reason':<18} {'retry':<9} {'recov s':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        infer = f"{r['infer_ok']}/{r['infer_failed']}"
        recov = "-" if r["recovery_s_median"] is None else f"{r['recovery_s_median']:.1f}"
        lines.append(
            f"{name:<27} {r['runs']:>4} {r['converged']:>4} {r['corrupted']:>4} {r['lost']:>4} "
            f"{r['counted_drops']:>7} {r['duplicated']:>4} {infer:>13} {','.join(r['reasons']) or '-':<18} "
            f"{','.join(r['retried_by']) or '-':<9} {recov:>7}"
        )
    for name, r in rows.items():
        for p in r["problems"]:
            lines.append(f"  {name}: {p}")
    return "\n".join(lines)


def bench_setup(work: Path) -> DiskSetup:
    """Fresh keys, the digits 1.0.0 / 1.1.0 artifacts (x86-gateway) by the real ``edgeops build``, the template."""
    from edgeops.signing import generate_keypair
    from tests.support.artifacts import build_digits

    digits = REPO / "examples" / "digits" / "out"
    if not (digits / "digits.onnx").is_file():
        raise SystemExit(f"{digits} is missing: run `make demo` or examples/digits/train.py first")
    generate_keypair(work / "keys")
    built = [
        build_digits(digits, work / "art", work / "keys" / "signing.key", v, profiles=(PROFILE,))[PROFILE]
        for v in ("1.0.0", "1.1.0")
    ]
    return make_setup(work, work / "keys", digits, built[0], built[1])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}")
    ap.add_argument("--work", type=Path, help="working directory, kept (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = ap.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or args.runs < 1:
        ap.error(f"unknown scenario(s) {unknown}" if unknown else "--runs must be >= 1")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeops-disk-full-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: dict[str, dict[str, Any]] = {}
    try:
        print(f"small disk: {small_disk.mechanism()}; building artifacts ...", file=sys.stderr, flush=True)
        setup = bench_setup(work)
        for name in names:
            runs = []
            for k in range(args.runs):
                run = run_scenario(setup, name, work / "runs" / f"{name}-{k}")
                runs.append(run)
                status = "ok" if ok(run) else "; ".join(run.get("problems", []) or ["not ok"])[:300]
                print(f"{name} run {k + 1}/{args.runs}: {run.get('seconds')} s, {status}", file=sys.stderr, flush=True)
                if ok(run):
                    shutil.rmtree(work / "runs" / f"{name}-{k}", ignore_errors=True)
            rows[name] = summarize(name, runs)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    section = {
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "mechanism": small_disk.mechanism(),
        "disk_bytes": DISK_BYTES,
        "runs_per_scenario": args.runs,
        "seconds_total": round(time.monotonic() - started, 1),
        "totals": {k: sum(r[k] for r in rows.values()) for k in ("runs", "converged", "corrupted", "lost", "ok")},
        "scenarios": rows,
    }
    update_section(SECTION, section, args.json)
    print(table(rows))
    t = section["totals"]
    print(
        f"\n{t['runs']} runs in {section['seconds_total']} s on {section['mechanism']}: {t['converged']} converged, "
        f"{t['corrupted']} corrupted, {t['lost']} lost; written to {args.json} [{SECTION}]"
    )
    return 0 if all(r["ok"] == r["runs"] for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
