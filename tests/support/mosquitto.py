"""A real mosquitto broker for tests, on a free 127.0.0.1 port in its own work directory.

Tests can stop, kill and restart it on the same port (to test reconnects, spooling and the last will) and add
configuration lines (TLS listeners, ACLs) through ``extra_config``. :meth:`MosquittoBroker.tls` runs the
configuration ``edgeops pki init`` wrote (mutual TLS, CRL, ACL) on a free port instead of the plain listener.
Its log is ``workdir/mosquitto.log``; a start that fails raises RuntimeError with the log's tail.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["MosquittoBroker", "free_port", "mosquitto_binary", "pki_listener_config"]

_START_TIMEOUT_S = 10.0


def mosquitto_binary() -> str:
    """The mosquitto executable; RuntimeError when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    raise RuntimeError("mosquitto is not installed (needed by the MQTT tests): run `make system-deps`")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pki_listener_config(pki_dir: Path, port: int) -> str:
    """``pki_dir/mosquitto.conf`` (from ``edgeops pki init``) with its listener moved to ``127.0.0.1:port``."""
    lines = (Path(pki_dir) / "mosquitto.conf").read_text().splitlines()
    return "\n".join(f"listener {port} 127.0.0.1" if ln.startswith("listener ") else ln for ln in lines) + "\n"


class MosquittoBroker:
    """One mosquitto process; ``start``/``stop``/``kill``/``restart`` keep the same port."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_config: str = "",
        *,
        persistence: bool = False,
        plain_listener: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self._plain_listener = plain_listener  # False: extra_config brings the listener(s) and the auth settings
        self._port = port if port is not None else free_port()
        self._extra_config = extra_config
        self._persistence = persistence  # True: sessions and retained messages survive stop()/restart()
        self._proc: subprocess.Popen[bytes] | None = None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        self._stderr_path = self.workdir / "mosquitto.stderr"

    @classmethod
    def tls(cls, workdir: Path, pki_dir: Path, *, persistence: bool = False) -> MosquittoBroker:
        """A broker run by ``pki_dir/mosquitto.conf`` on a free 127.0.0.1 port: mutual TLS only (client certificate
        required, CN = user name), the PKI's CRL and ACL; no plain listener. Connect with :attr:`tls_url`."""
        port = free_port()
        return cls(workdir, port, pki_listener_config(pki_dir, port), persistence=persistence, plain_listener=False)

    @property
    def tls_url(self) -> str:
        return f"mqtts://{self.host}:{self._port}"

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its configuration and the ACL file."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("mosquitto is not running")
        self._proc.send_signal(signal.SIGHUP)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _config(self) -> str:
        plain = [f"listener {self._port} {self.host}", "allow_anonymous true"] if self._plain_listener else []
        lines = [
            *plain,
            f"persistence {'true' if self._persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # as root mosquitto drops to user "mosquitto", which could not write the log in workdir
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        return "\n".join(lines) + "\n" + self._extra_config + "\n"

    def start(self) -> None:
        """Start mosquitto and wait until the port accepts connections (RuntimeError if it does not)."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        self.config_path.write_text(self._config())
        with self._stderr_path.open("ab") as err_file:
            self._proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=err_file
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._stderr_path.read_text(errors="replace")
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start: {err.strip()} {self._log_tail()}")
            try:
                with socket.create_connection((self.host, self._port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self._port} within {_START_TIMEOUT_S} s {self._log_tail()}")

    def stop(self) -> None:
        """SIGTERM and wait (mosquitto closes every connection cleanly; wills of live clients are sent)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and wait: the broker vanishes without a word."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "log: " + " | ".join(tail)
