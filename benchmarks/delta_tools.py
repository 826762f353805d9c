"""The delta tools the benchmark compares, and how one child process is measured.

Each tool is a :class:`PatchTool`: the argv of a child that creates a patch OLD -> NEW and of one that applies it
(plus, for a Python tool, a child that only imports it: the interpreter's share of the peak RSS). edgeops and
bsdiff4 run through their Python APIs in ``python -c`` children that time the call after their imports and print
one JSON line; zstd and xdelta3 run as themselves, timed around the process. :func:`run_child` runs any of them
under ``/usr/bin/time -f %M``: a child forked straight from the benchmark would report the benchmark's own
high-water mark (Linux carries it over fork and exec), the time wrapper's child starts from the wrapper's 1 MiB.

Guarantees: nothing here raises for a tool that fails or is missing: ``missing()`` says why (with the install
command) and :class:`ChildRun` carries the exit status and the tail of stderr.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["PEERS", "SLOW_PEERS", "TIME", "TOOLS", "ChildRun", "PatchTool", "make_tools", "run_child"]

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("edgeops", "bsdiff4", "zstd", "xdelta3")
PEERS = ("bsdiff4", "zstd", "xdelta3")
SLOW_PEERS = ("bsdiff4",)
TIME = Path("/usr/bin/time")
MIB = 1 << 20
CHILD_TIMEOUT_S = 1800.0  # one create or apply; bsdiff4 on 53 MB takes minutes, not half an hour

# ---------------------------------------------------------------- tools


class PatchTool(Protocol):
    """One delta tool: the argv of a child that creates a patch and of one that applies it."""

    @property
    def name(self) -> str: ...

    def missing(self) -> str | None:
        """Why the tool cannot run here (and how to install it), or None."""

    def version(self) -> str | None: ...

    def create(self, old: Path, new: Path, patch: Path) -> list[str]: ...

    def apply(self, old: Path, patch: Path, out: Path, *, new_size: int, new_sha256: str) -> list[str]: ...

    def baseline(self) -> list[str] | None:
        """A child that only imports the tool (Python tools), to subtract the interpreter from the peak RSS."""


_EDGEOPS_CREATE = """
import dataclasses, json, sys, time
from pathlib import Path
from edgeops.delta import make_delta
t0 = time.perf_counter()
info = make_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), level=19)
seconds = time.perf_counter() - t0
doc = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else vars(info)
print(json.dumps({"seconds": seconds, "info": doc}, default=str))
"""
_EDGEOPS_APPLY = """
import json, sys, time
from pathlib import Path
from edgeops.delta import apply_delta
t0 = time.perf_counter()
sha = apply_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), expected_sha256=sys.argv[4])
print(json.dumps({"seconds": time.perf_counter() - t0, "sha256": sha}))
"""
_EDGEOPS_BASELINE = "import dataclasses, json, sys, time\nfrom pathlib import Path\nimport edgeops.delta\n"
_BSDIFF4_CREATE = """
import json, sys, time
import bsdiff4
t0 = time.perf_counter()
bsdiff4.file_diff(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""
_BSDIFF4_APPLY = """
import json, sys, time
import bsdiff4
t0 = time.perf_counter()
bsdiff4.file_patch(sys.argv[1], sys.argv[3], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""
_BSDIFF4_BASELINE = "import json, sys, time\nimport bsdiff4\n"


@dataclass(frozen=True)
class PythonTool:
    """A tool called through its Python API in a child interpreter (``python -c CODE ARGS``)."""

    name: str
    module: str
    dist: str  # the distribution whose version is reported
    create_code: str
    apply_code: str
    baseline_code: str
    install: str
    api: tuple[str, ...]  # the names the snippets call

    def missing(self) -> str | None:
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            return f"{self.module} is not importable here ({exc}): {self.install}"
        absent = [name for name in self.api if not hasattr(module, name)]
        return f"{self.module} lacks {', '.join(absent)}: {self.install}" if absent else None

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(self.dist)
        except PackageNotFoundError:
            return None

    def create(self, old: Path, new: Path, patch: Path) -> list[str]:
        return [sys.executable, "-c", self.create_code, str(old), str(new), str(patch)]

    def apply(self, old: Path, patch: Path, out: Path, *, new_size: int, new_sha256: str) -> list[str]:
        return [sys.executable, "-c", self.apply_code, str(old), str(patch), str(out), new_sha256]

    def baseline(self) -> list[str] | None:
        return [sys.executable, "-c", self.baseline_code]


def _window_log(*sizes: int) -> int:
    """log2 of the window that covers the largest file, as zstd sizes it for --patch-from."""
    return max(10, math.ceil(math.log2(max(*sizes, 1))))


@dataclass(frozen=True)
class ZstdTool:
    """``zstd -19 --patch-from=OLD``; ``--long=W`` on both sides once the window passes zstd's 128 MiB default."""

    name: str = "zstd"
    binary: str = "zstd"

    def missing(self) -> str | None:
        return None if shutil.which(self.binary) else "zstd not found: sudo apt-get install zstd"

    def version(self) -> str | None:
        return _first_line([self.binary, "--version"])

    @staticmethod
    def _long(old_size: int, new_size: int) -> list[str]:
        window = _window_log(old_size, new_size)
        return [f"--long={window}"] if window > 27 else []

    def create(self, old: Path, new: Path, patch: Path) -> list[str]:
        long = self._long(old.stat().st_size, new.stat().st_size)
        return [self.binary, "-19", f"--patch-from={old}", *long, str(new), "-o", str(patch), "-f", "-q"]

    def apply(self, old: Path, patch: Path, out: Path, *, new_size: int, new_sha256: str) -> list[str]:
        long = self._long(old.stat().st_size, new_size)
        return [self.binary, "-d", f"--patch-from={old}", *long, str(patch), "-o", str(out), "-f", "-q"]

    def baseline(self) -> list[str] | None:
        return None


@dataclass(frozen=True)
class Xdelta3Tool:
    """``xdelta3 -9 -e -s OLD NEW PATCH``; ``-B`` (source window) raised to cover OLD when it passes 64 MiB."""

    name: str = "xdelta3"
    binary: str = "xdelta3"

    def missing(self) -> str | None:
        return None if shutil.which(self.binary) else "xdelta3 not found: sudo apt-get install xdelta3"

    def version(self) -> str | None:
        return _first_line([self.binary, "-V"])

    def _window(self, old: Path) -> list[str]:
        size = old.stat().st_size
        return ["-B", str(1 << math.ceil(math.log2(size)))] if size > 64 * MIB else []

    def create(self, old: Path, new: Path, patch: Path) -> list[str]:
        return [self.binary, "-9", "-e", "-f", *self._window(old), "-s", str(old), str(new), str(patch)]

    def apply(self, old: Path, patch: Path, out: Path, *, new_size: int, new_sha256: str) -> list[str]:
        return [self.binary, "-d", "-f", *self._window(old), "-s", str(old), str(patch), str(out)]

    def baseline(self) -> list[str] | None:
        return None


def _first_line(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0].strip("* ") if text else None


def make_tools() -> dict[str, PatchTool]:
    return {
        "edgeops": PythonTool("edgeops", "edgeops.delta", "edgeops", _EDGEOPS_CREATE, _EDGEOPS_APPLY,
                              _EDGEOPS_BASELINE, "the codec of issue 4 is not (fully) in this tree yet",
                              ("make_delta", "apply_delta")),
        "bsdiff4": PythonTool("bsdiff4", "bsdiff4", "bsdiff4", _BSDIFF4_CREATE, _BSDIFF4_APPLY, _BSDIFF4_BASELINE,
                              ".venv/bin/pip install bsdiff4 (in the dev extra: pip install -e '.[dev]')",
                              ("file_diff", "file_patch")),
        "zstd": ZstdTool(),
        "xdelta3": Xdelta3Tool(),
    }


# ---------------------------------------------------------------- measuring


@dataclass(frozen=True)
class ChildRun:
    """One child process: its exit status, seconds (inside the child when it reported them), peak RSS."""

    command: list[str]
    returncode: int
    seconds: float
    peak_kib: int | None
    report: dict[str, Any]
    stderr_tail: str  # the last lines the child wrote to stderr

    @property
    def last_error(self) -> str:
        """The child's last stderr line (a Python child's exception), for a one-line note."""
        lines = [line for line in self.stderr_tail.splitlines() if line.strip()]
        return lines[-1].strip() if lines else "(nothing on stderr)"


def run_child(cmd: list[str], *, timeout: float | None = CHILD_TIMEOUT_S) -> ChildRun:
    """Run ``cmd`` under /usr/bin/time (when present) and return what it cost. Never raises for a failing child."""
    with tempfile.TemporaryDirectory(prefix="delta-bench-time-") as tmp:
        rss_file = Path(tmp) / "rss"
        full = [str(TIME), "-f", "%M", "-o", str(rss_file), *cmd] if TIME.is_file() else cmd
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(full, capture_output=True, text=True, cwd=REPO, timeout=timeout)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = -9, "", f"timed out after {exc.timeout} s"
        wall = time.perf_counter() - t0
        peak = _read_peak(rss_file)
    report: dict[str, Any] = {}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        try:
            report = json.loads(lines[-1])
        except ValueError:
            report = {}
    seconds = float(report.get("seconds", wall))
    return ChildRun(cmd, code, seconds, peak, report, "\n".join(err.strip().splitlines()[-6:]))


def _read_peak(path: Path) -> int | None:
    try:
        last = path.read_text().strip().splitlines()[-1]  # "Command exited with non-zero status N" may come first
        return int(last)
    except (OSError, IndexError, ValueError):
        return None
