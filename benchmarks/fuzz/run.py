"""Coverage-guided fuzzing of every wire/file parser (atheris + libFuzzer), one target per subprocess.

    python benchmarks/fuzz/run.py [--targets a,b] [--runs 1000000] [--max-seconds N] [--rss-limit-mb 1024]
                                  [--timeout-s 5] [--json benchmarks/results/fuzz.json] [--list]

Each target of :data:`benchmarks.fuzz.targets.TARGETS` runs in its own interpreter with edgeops and
device_agent instrumented, from a seed corpus written to a temp dir (never committed), with libFuzzer's
``-runs``, ``-max_total_time``, ``-rss_limit_mb``, ``-timeout`` (a hang is a finding) and the target's
``-max_len``. The harness treats the parser's typed errors as normal; any other exception is a crash. After a
finding the target restarts on its grown corpus (at most :data:`MAX_SEGMENTS` times, and not for a finding it
has already made), so one bug does not hide the next; the figures add up every segment.

Output: a table, and JSON (merged into ``--json`` by target name) with per target: executions, seconds,
exec_per_s, coverage, features, peak_rss_mb, findings, status (``ok``, ``findings`` or ``error``) and what
stopped it. Finding inputs are copied to ``benchmarks/results/fuzz-crashes/`` only when there are findings.
Exit status: 0 no findings, 1 findings, 2 a target could not run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REGISTRY = "benchmarks.fuzz.targets"
CRASH_DIR = REPO / "benchmarks" / "results" / "fuzz-crashes"
MAX_SEGMENTS = 5  # fuzzing runs per target: the first, plus restarts after findings
INSTRUMENTED = ["edgeops", "device_agent", "zipfile"]  # numpy is not: instrumenting it costs seconds a start
_START_MARK = "edgeops-fuzz: fuzzing started at "
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+).*?rss: (\d+)Mb", re.M)
_ERROR = re.compile(r"==\d+== ERROR: libFuzzer: ([^\n]+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Finding:
    kind: str  # crash (an exception the parser must not raise), timeout, oom, or libFuzzer's own words
    exception: str  # "KeyError: 'x'" (crash), the libFuzzer error line otherwise
    location: str  # the innermost traceback frame (file:line in function), when there is one
    input_file: str  # in benchmarks/results/fuzz-crashes/ (relative to the repo), or "" when not copied
    input_size: int
    input_hex: str  # the whole input when it is at most 256 bytes, else its first 256 bytes
    traceback_tail: list[str] = field(default_factory=list)

    @property
    def signature(self) -> tuple[str, str, str]:
        return self.kind, self.exception.split(":", 1)[0], self.location


@dataclass
class Segment:
    executions: int
    seconds: float
    coverage: int
    features: int
    peak_rss_mb: int
    finding: Finding | None
    input_path: Path | None  # the file libFuzzer wrote the finding's input to
    log_tail: str


# --- the child: one target under atheris -------------------------------------------------------------------


def child(name: str, registry: str, libfuzzer_args: list[str]) -> None:
    """Fuzz target ``name`` of ``registry`` (a module with TARGETS) in this process (never returns)."""
    import importlib
    import warnings

    import atheris
    import numpy  # noqa: F401  (imported first, so it is not instrumented)

    warnings.simplefilter("ignore")  # numpy's .npy reader warns on Python 2 headers; the log stays readable
    with atheris.instrument_imports(include=INSTRUMENTED):
        from benchmarks.fuzz.targets import run_one

        target = importlib.import_module(registry).TARGETS[name]
    target.seeds()  # build seeds and scratch files before the clock starts
    started = False

    def one_input(data: bytes) -> None:
        nonlocal started
        if not started:
            started = True
            print(f"{_START_MARK}{time.time():.3f}", file=sys.stderr, flush=True)
        run_one(target, data)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


# --- the parent: corpus, flags, log parsing ---------------------------------------------------------------


def _parse_finding(log: str, workdir: Path) -> tuple[Finding, Path | None] | None:
    """The finding a libFuzzer log reports (and the file holding its input), or None."""
    error = _ERROR.search(log)
    if error is None:
        return None
    what = error.group(1).strip()
    kind = "crash" if "fuzz target exited" in what else "timeout" if "timeout" in what else (
        "oom" if "out-of-memory" in what else what.split()[0])
    exception, location, tail = what, "", []
    if "=== Uncaught Python exception: ===" in log:
        block = log.split("=== Uncaught Python exception: ===", 1)[1].split("==", 1)[0].strip().splitlines()
        exception = block[0] if block else what
        frames = [ln.strip() for ln in block if ln.strip().startswith("File ")]
        location = frames[-1] if frames else ""
        tail = block[-16:]
    artifact = _ARTIFACT.search(log)
    path = None if artifact is None else workdir / artifact.group(1)  # an absolute group(1) replaces workdir
    data = path.read_bytes() if path is not None and path.is_file() else b""
    location, tail = location.replace(str(REPO) + "/", ""), [ln.replace(str(REPO) + "/", "") for ln in tail]
    return Finding(kind, exception, location, "", len(data), data[:256].hex(), tail), path


def _last_int(pattern: str, log: str) -> int | None:
    found = re.findall(pattern, log, re.M)
    return int(found[-1]) if found else None


def _segment(name: str, corpus: Path, workdir: Path, *, runs: int, seconds: float | None, max_len: int,
             rss_limit_mb: int, timeout_s: int, seed: int | None, registry: str) -> Segment:
    artifacts = workdir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    flags = [str(corpus), f"-runs={runs}", f"-rss_limit_mb={rss_limit_mb}", f"-timeout={timeout_s}",
             f"-max_len={max_len}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1"]
    if seconds is not None:
        flags.append(f"-max_total_time={max(1, int(seconds))}")
    if seed is not None:
        flags.append(f"-seed={seed}")
    log_path = workdir / "log.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, registry, "--", *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if seed is not None:
        env["PYTHONHASHSEED"] = str(seed)  # with -seed, the same mutations in the same order
    wall = None if seconds is None else seconds + 120 + timeout_s
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=env)
        try:
            proc.wait(timeout=wall)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ended = time.time()
    log = log_path.read_text(errors="replace")
    found = _parse_finding(log, workdir)
    mark = log.find(_START_MARK)
    began = float(log[mark + len(_START_MARK):].split()[0]) if mark >= 0 else ended
    stats = {k: int(v) for k, v in _STAT.findall(log)}
    status = _STATUS.findall(log)
    executions = stats.get("number_of_executed_units", int(status[-1][0]) if status else 0)
    return Segment(
        executions=executions,
        seconds=max(0.0, ended - began),
        coverage=int(status[-1][1]) if status else 0,
        features=int(status[-1][2]) if status else 0,
        peak_rss_mb=stats.get("peak_rss_mb", max((int(s[3]) for s in status), default=0)),
        finding=None if found is None else found[0],
        input_path=None if found is None else found[1],
        log_tail="\n".join(log.splitlines()[-40:]),
    )


def _keep_input(name: str, finding: Finding, path: Path | None) -> None:
    """Copy the finding's input to CRASH_DIR (small: inputs are at most the target's max_len)."""
    if path is None or not path.is_file():
        return
    data = path.read_bytes()
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    dest = CRASH_DIR / f"{name}-{finding.kind}-{hashlib.sha256(data).hexdigest()[:12]}.bin"
    dest.write_bytes(data)
    finding.input_file = str(dest.relative_to(REPO))


def fuzz_target(name: str, *, runs: int, max_seconds: float | None, rss_limit_mb: int, timeout_s: int,
                keep_inputs: bool = True, seed: int | None = None, registry: str = REGISTRY) -> dict[str, Any]:
    """Fuzz one target to ``runs`` executions or ``max_seconds``, restarting after new findings."""
    target = importlib.import_module(registry).TARGETS[name]
    result: dict[str, Any] = {"covers": target.covers, "runs_requested": runs, "max_seconds": max_seconds,
                              "max_len": target.max_len, "rss_limit_mb": rss_limit_mb, "timeout_s": timeout_s}
    findings: list[Finding] = []
    executions, seconds, cov, ft, rss, segments = 0, 0.0, 0, 0, 0, 0
    stopped_by, error = "runs", ""
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i, data in enumerate(target.seeds()):
            (corpus / f"seed-{i}").write_bytes(data)
        while executions < runs and segments < MAX_SEGMENTS:
            left_s = None if max_seconds is None else max_seconds - seconds
            if left_s is not None and left_s < 1:
                stopped_by = "time"
                break
            workdir = Path(tmp) / f"segment-{segments}"
            workdir.mkdir()
            seg = _segment(name, corpus, workdir, runs=runs - executions, seconds=left_s, max_len=target.max_len,
                           rss_limit_mb=rss_limit_mb, timeout_s=timeout_s, seed=seed, registry=registry)
            segments += 1
            executions += seg.executions
            seconds += seg.seconds
            cov, ft, rss = max(cov, seg.coverage), max(ft, seg.features), max(rss, seg.peak_rss_mb)
            if seg.finding is None:
                if seg.executions == 0:
                    stopped_by, error = "error", seg.log_tail
                else:
                    stopped_by = "time" if max_seconds is not None and executions < runs else "runs"
                break
            stopped_by = "finding"
            if any(f.signature == seg.finding.signature for f in findings):
                break  # the same bug again: it blocks this target until it is fixed
            findings.append(seg.finding)
            if keep_inputs:
                _keep_input(name, seg.finding, seg.input_path)
    result.update(
        executions=executions,
        seconds=round(seconds, 1),
        exec_per_s=round(executions / seconds) if seconds > 0 else 0,
        coverage=cov,
        features=ft,
        peak_rss_mb=rss,
        segments=segments,
        stopped_by=stopped_by,
        findings=[asdict(f) for f in findings],
        status="error" if error else "findings" if findings else "ok",
    )
    if error:
        result["error"] = error
    return result


# --- the CLI -------------------------------------------------------------------------------------------------


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("target", "executions", "seconds", "exec/s", "cov", "ft", "rss MB", "status")]
    for name, r in results.items():
        status = r["status"] if r["status"] != "findings" else f"{len(r['findings'])} finding(s)"
        rows.append((name, f"{r['executions']:,}", f"{r['seconds']:.0f}", f"{r['exec_per_s']:,}", str(r["coverage"]),
                     str(r["features"]), str(r["peak_rss_mb"]), status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    for name, r in results.items():
        for f in r["findings"]:
            lines.append(f"  {name}: {f['kind']}: {f['exception']} at {f['location'] or '?'} ({f['input_file']})")
    return "\n".join(lines)


def _write_json(path: Path, results: dict[str, dict[str, Any]], argv: Sequence[str]) -> None:
    from importlib.metadata import version

    import atheris  # noqa: F401  (fails early and clearly when atheris is missing)

    doc: dict[str, Any] = {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            doc = {}
    targets = {**doc.get("targets", {}), **results}
    doc = {
        "tool": f"atheris {version('atheris')} (libFuzzer)",
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine()},
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/fuzz/run.py " + " ".join(argv),
        "targets": targets,
        "totals": {
            "executions": sum(t["executions"] for t in targets.values()),
            "findings": sum(len(t["findings"]) for t in targets.values()),
            "targets": len(targets),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--child"]:  # --child NAME [REGISTRY] -- LIBFUZZER_ARGS...
        rest = args_list[2:]
        registry = REGISTRY if rest[:1] == ["--"] else rest.pop(0)
        child(args_list[1], registry, rest[1:])
        return 0
    registry = REGISTRY
    if "--registry" in args_list:  # read first: the target names and --help depend on it
        at = args_list.index("--registry")
        registry = args_list[at + 1] if at + 1 < len(args_list) else REGISTRY
    TARGETS = importlib.import_module(registry).TARGETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", help=f"comma-separated, default all: {','.join(TARGETS)}")
    parser.add_argument("--runs", type=int, default=1_000_000, help="executions per target (default 1000000)")
    parser.add_argument("--max-seconds", type=float, help="cap on fuzzing time per target")
    parser.add_argument("--rss-limit-mb", type=int, default=1024, help="memory limit of a target (default 1024)")
    parser.add_argument("--timeout-s", type=int, default=5, help="per-input time limit: a hang (default 5)")
    parser.add_argument("--json", type=Path, help="write/merge results here (e.g. benchmarks/results/fuzz.json)")
    parser.add_argument("--seed", type=int, help="libFuzzer -seed (and PYTHONHASHSEED): a repeatable run")
    parser.add_argument("--no-keep", action="store_true", help="do not copy finding inputs to fuzz-crashes/")
    parser.add_argument("--registry", default=REGISTRY, help=f"module holding TARGETS (default {REGISTRY})")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--reproduce", type=Path, metavar="FILE",
                        help="run one target (--targets NAME) on FILE in this process, without atheris, and exit")
    args = parser.parse_args(args_list)
    if args.list:
        for name, t in TARGETS.items():
            print(f"{name:20s} {t.covers}")
        return 0
    names = args.targets.split(",") if args.targets else list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.reproduce:
        if len(names) != 1:
            parser.error("--reproduce needs exactly one target: --targets NAME")
        from benchmarks.fuzz.targets import run_one

        run_one(TARGETS[names[0]], args.reproduce.read_bytes())  # an unexpected exception propagates, traceback
        print(f"{names[0]}: {args.reproduce} is parsed or refused with a typed error")
        return 0
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"fuzzing {name} ...", flush=True)
        results[name] = fuzz_target(name, runs=args.runs, max_seconds=args.max_seconds,
                                    rss_limit_mb=args.rss_limit_mb, timeout_s=args.timeout_s,
                                    keep_inputs=not args.no_keep, seed=args.seed, registry=registry)
        r = results[name]
        print(f"  {r['executions']:,} executions in {r['seconds']:.0f} s, {len(r['findings'])} finding(s), "
              f"status {r['status']}", flush=True)
    print(_table(results))
    if args.json:
        _write_json(args.json, results, args_list)
    if any(r["status"] == "error" for r in results.values()):
        return 2
    return 1 if any(r["findings"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
