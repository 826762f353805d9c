"""A small disk for one child process: its data directory on a tiny filesystem it can fill up and free again.

Two mechanisms; :func:`mechanism` picks the first that works on this machine (probed once, then cached):

- ``tmpfs``: the child runs in a mount namespace of its own (``unshare -m`` as root, else ``unshare -rm``: a user
  namespace in which the caller is root) where a tmpfs of ``size`` bytes is mounted on the directory. Writes past
  the size fail with ENOSPC, as on a full partition. Only the mount namespace differs: loopback TCP to a broker
  outside works. The mount is private: the parent sees the empty directory beneath it, and it vanishes with the
  child, so anything that must be checked on the small disk after a fault (a restart, a retry once space is
  freed) is done by the child, which reports JSON on stdout.
- ``rlimit``: where no namespace can be made (a container without CAP_SYS_ADMIN and with user namespaces off),
  the child gets a real kernel limit instead, RLIMIT_FSIZE (SIGXFSZ ignored): a write past ``size`` bytes into any
  one file fails with EFBIG. It is per file, not per filesystem, so it is a coarser full disk; the errors reach
  the same code paths.

``EDGEOPS_SMALL_DISK=tmpfs|rlimit`` forces one (to run the fallback on a machine where the namespace works).
The child learns which mechanism it runs under from the same variable and fills and frees its disk through
:class:`Ballast`: a ballast file sized to leave N bytes free (tmpfs), or the soft file-size limit (rlimit).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ENV", "MECHANISMS", "Ballast", "SmallDiskRun", "mechanism", "run", "run_json"]

ENV = "EDGEOPS_SMALL_DISK"
MECHANISMS = ("tmpfs", "rlimit")
BALLAST = ".ballast"  # the ballast file's name in the small disk's root
_FILL_TRIES = 50
_MOUNT = 'mount -t tmpfs -o size="$1",mode=0755 tmpfs "$2" || exit 97; shift 2; exec "$@"'


@dataclass(frozen=True)
class SmallDiskRun:
    mechanism: str  # "tmpfs" or "rlimit"
    returncode: int
    stdout: str
    stderr: str


def _unshare_commands() -> list[list[str]]:
    if shutil.which("unshare") is None:
        return []
    as_root = [["unshare", "-m"]] if os.geteuid() == 0 else []
    return [*as_root, ["unshare", "-rm"]]


@functools.cache
def _namespace_command() -> tuple[str, ...] | None:
    """The ``unshare`` prefix that gives a child a private mount namespace it can mount a tmpfs in, or None."""
    for prefix in _unshare_commands():
        with tempfile.TemporaryDirectory(prefix="small-disk-probe-") as probe:
            try:
                done = subprocess.run(
                    [*prefix, "sh", "-c", _MOUNT, "sh", "64k", probe, "sh", "-c", ': > "$0/probe"', probe],
                    capture_output=True,
                    timeout=10,
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0 and not (Path(probe) / "probe").exists():  # written on the tmpfs, not here
                return tuple(prefix)
    return None


def mechanism() -> str:
    """``tmpfs`` when a private mount namespace with a tmpfs can be made here, else ``rlimit`` (or what
    ``EDGEOPS_SMALL_DISK`` forces). Raises ValueError for an unknown forced value."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in MECHANISMS:
            raise ValueError(f"{ENV}={forced!r}: expected one of {MECHANISMS}")
        if forced == "tmpfs" and _namespace_command() is None:
            raise RuntimeError(f"{ENV}=tmpfs, but no mount namespace can be made on this machine")
        return forced
    return "tmpfs" if _namespace_command() is not None else "rlimit"


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing


def run(
    argv: Sequence[str],
    directory: Path,
    *,
    size: int,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> SmallDiskRun:
    """Run ``argv`` with ``directory`` on a small disk of ``size`` bytes (tmpfs), or with a ``size``-byte file-size
    limit (rlimit); ``EDGEOPS_SMALL_DISK`` in its environment says which. ``directory`` is created when missing.

    Raises subprocess.TimeoutExpired (the child killed) after ``timeout`` s; RuntimeError when the tmpfs could
    not be mounted although the probe could.
    """
    mech = mechanism()
    directory.mkdir(parents=True, exist_ok=True)
    child_env = {**(os.environ if env is None else env), ENV: mech}
    if mech == "tmpfs":
        prefix = _namespace_command()
        if prefix is None:
            raise RuntimeError(f"{ENV}=tmpfs, but no mount namespace can be made on this machine")
        cmd = [*prefix, "sh", "-c", _MOUNT, "sh", str(size), str(directory), *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env, cwd=cwd)
        if done.returncode == 97:
            raise RuntimeError(f"cannot mount a tmpfs on {directory}: {done.stderr.strip()}")
    else:

        def limit() -> None:
            _ignore_sigxfsz()
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=child_env, cwd=cwd, preexec_fn=limit
        )
    return SmallDiskRun(mech, done.returncode, done.stdout, done.stderr)


def run_json(argv: Sequence[str], directory: Path, *, size: int, timeout: float, **kw: Any) -> dict[str, Any]:
    """:func:`run`, and the JSON object the child printed as its last stdout line, with ``mechanism`` added.

    Raises RuntimeError (with the child's stderr tail) when it exited non-zero or printed no JSON object.
    """
    done = run(argv, directory, size=size, timeout=timeout, **kw)
    lines = done.stdout.strip().splitlines()
    try:
        doc = json.loads(lines[-1]) if lines else None
    except ValueError:
        doc = None
    if done.returncode != 0 or not isinstance(doc, dict):
        raise RuntimeError(
            f"small-disk child ({done.mechanism}) exited {done.returncode} without a result: {done.stderr[-3000:]}"
        )
    return {**doc, "mechanism": done.mechanism}


class Ballast:
    """Fills and frees the small disk this process runs on (in the child; see the module docstring).

    ``root`` is the directory :func:`run` was given. Under ``tmpfs`` a ballast file in it takes all but the
    requested free bytes; under ``rlimit`` the soft RLIMIT_FSIZE is lowered to them (per file) and raised back.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.mechanism = os.environ.get(ENV, "")
        if self.mechanism not in MECHANISMS:
            raise RuntimeError(f"not on a small disk: {ENV} is {self.mechanism!r}")
        if self.mechanism == "rlimit":
            _ignore_sigxfsz()
            self._hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    @property
    def path(self) -> Path:
        return self.root / BALLAST

    def free_bytes(self) -> int:
        """Bytes a file may still take: free space on the tmpfs, or the file-size limit."""
        if self.mechanism == "tmpfs":
            st = os.statvfs(self.root)
            return st.f_bavail * st.f_frsize
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return -1 if soft == resource.RLIM_INFINITY else soft

    def fill(self, leave: int = 0) -> None:
        """Leave about ``leave`` bytes (rounded down to whole pages on tmpfs) for everything else."""
        if self.mechanism == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (leave, self._hard))
            return
        self.free()
        page = os.statvfs(self.root).f_frsize
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _ in range(_FILL_TRIES):  # the process under test writes meanwhile: measure again and retry
                take = max(0, self.free_bytes() - leave)
                take -= take % page
                try:
                    if take:
                        os.posix_fallocate(fd, 0, take)  # all or nothing on tmpfs
                    return
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
            raise RuntimeError(f"could not fill {self.root} to {leave} free bytes in {_FILL_TRIES} tries")
        finally:
            os.close(fd)

    def free(self) -> None:
        """Give the space back (remove the ballast, or lift the limit)."""
        if self.mechanism == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (self._hard, self._hard))
            return
        self.path.unlink(missing_ok=True)
