"""A device clock that is wrong for real: processes run under libfaketime with an offset a test can step.

The process's wall clock (``time()``, ``gettimeofday``, ``clock_gettime(CLOCK_REALTIME)``: what Python's
``time.time``, SQLite and OpenSSL's certificate checks read) is the real one plus an offset read from a file;
``CLOCK_MONOTONIC`` is left alone (``FAKETIME_DONT_FAKE_MONOTONIC=1``), as on a device whose wall clock NTP steps.
:meth:`SkewedClock.step` rewrites the file (atomically) and the process sees the new offset at its next clock
read (``FAKETIME_NO_CACHE=1``; about 7 µs per ``time.time()``, monotonic reads unaffected).

libfaketime is the Debian package ``faketime`` (``make system-deps`` installs it). Two of its quirks, measured
with 0.9.10 and Python 3.11 (libfaketime issues #390 and #426):

- without ``FAKETIME_DONT_FAKE_MONOTONIC`` the monotonic clock is offset too, and every ``threading`` wait with a
  timeout hangs (glibc hands the kernel a faked absolute deadline);
- with it, ``time.sleep`` fails with ``EINVAL`` (Python 3.11 sleeps with ``clock_nanosleep(CLOCK_MONOTONIC,
  TIMER_ABSTIME)`` and libfaketime converts that deadline as if the monotonic clock were faked).

So an agent is started through this module's ``__main__`` (:func:`agent_argv`), which replaces ``time.sleep``
with a ``select``-based sleep on the monotonic clock before running ``device_agent.cli``; paho's reconnect wait
is the agent's only ``time.sleep``. Everything else, onnxruntime's threads included, runs unchanged.
"""

from __future__ import annotations

import glob
import os
import select
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import SupportsIndex

__all__ = ["SkewedClock", "agent_argv", "libfaketime"]

_LIBRARY_GLOBS = ("/usr/lib/*/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1")


def libfaketime() -> Path:
    """The multi-threaded libfaketime; RuntimeError when it is not installed."""
    for pattern in _LIBRARY_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0])
    raise RuntimeError("libfaketime is not installed (needed by the clock-skew tests): run `make system-deps`")


def _spec(offset_s: float) -> str:
    return f"{offset_s:+.3f}"


class SkewedClock:
    """The offset (seconds, may be negative) the processes started with :meth:`env` add to the real wall clock."""

    def __init__(self, workdir: Path, offset_s: float = 0.0) -> None:
        self.library = libfaketime()
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self.path = Path(workdir) / "faketime.rc"
        self.offset_s = 0.0
        self.step(offset_s)

    def step(self, offset_s: float) -> None:
        """Set the offset, as NTP (or a person) stepping the device's clock; seen at the next clock read."""
        fd, tmp = tempfile.mkstemp(prefix=".faketime.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(_spec(offset_s) + "\n")
        os.replace(tmp, self.path)
        self.offset_s = float(offset_s)

    def now(self) -> float:
        """The time the skewed processes read now (Unix seconds)."""
        return time.time() + self.offset_s

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with libfaketime preloaded and pointed at the offset."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k != "FAKETIME"}
        env["LD_PRELOAD"] = " ".join(p for p in (str(self.library), env.get("LD_PRELOAD", "")) if p)
        env["FAKETIME_TIMESTAMP_FILE"] = str(self.path)
        env["FAKETIME_NO_CACHE"] = "1"
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        return env


def agent_argv(*args: str) -> list[str]:
    """The command line of ``edgeops-agent ARGS...`` run under a skewed clock (with :meth:`SkewedClock.env`)."""
    return [sys.executable, "-m", "tests.support.skewed_clock", *args]


def _monotonic_sleep(secs: float | SupportsIndex) -> None:
    """``time.sleep`` without ``clock_nanosleep(TIMER_ABSTIME)``: waits on the monotonic clock in ``select``."""
    seconds = float(secs)
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        select.select([], [], [], left)


def main(argv: Sequence[str] | None = None) -> int:
    time.sleep = _monotonic_sleep  # see the module docstring: libfaketime issue #426
    from device_agent.cli import main as agent_main

    return agent_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
