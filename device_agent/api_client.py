"""A small client for the agent's local API (``edgeops-agent infer``, scripts, tests), over TCP or a Unix socket.

Guarantees: one keep-alive connection per client, used under a lock (a client may be shared by threads, one
request at a time); a request that meets a keep-alive connection the server has since closed is retried once
on a fresh connection. Errors map to the edgeops tree: no agent answering → :class:`TransportError`; a 4xx →
:class:`RequestError` with the server's message and ``status``; 503 → :class:`NoModelError`; any other 5xx →
:class:`EdgeopsError`. The address format is the agent's ``[api] address``, parsed by :func:`parse_address`.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from device_agent.service import NoModelError
from edgeops.errors import ConfigError, EdgeopsError, RequestError, TransportError

__all__ = ["ApiClient", "Endpoint", "parse_address"]


@dataclass(frozen=True)
class Endpoint:
    """Where the API listens: a Unix socket path, or a TCP host and port (0 = any free port, servers only)."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(address: str) -> Endpoint:
    """``"127.0.0.1:8780"``, ``"[::1]:8780"`` or ``"unix:/run/edgeops/agent.sock"``. Raises ConfigError."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ConfigError(f"api address {address!r}: no socket path after 'unix:'")
        return Endpoint(unix_path=path)
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"api address {address!r} is not HOST:PORT or unix:PATH")
    return Endpoint(host=host, port=int(port))


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix stream socket (the Host header says ``localhost``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _npy_bytes(arr: np.ndarray, what: str) -> bytes:
    buf = io.BytesIO()
    try:
        np.save(buf, np.asarray(arr), allow_pickle=False)
    except ValueError as exc:
        raise RequestError(f"{what} cannot be sent: {exc}") from None
    return buf.getvalue()


def _npz_bytes(feeds: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, arr in feeds.items():
            archive.writestr(f"{name}.npy", _npy_bytes(arr, f"input {name!r}"))
    return buf.getvalue()


def _error_message(status: int, reason: str, body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        doc = None  # not our JSON error body (a proxy's page?): fall back to the status line
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return f"HTTP {status} {reason}".strip()


def _raise_for(status: int, reason: str, body: bytes) -> None:
    if 200 <= status < 300:
        return
    message = _error_message(status, reason, body)
    if 400 <= status < 500:
        raise RequestError(message, status=status)
    if status == 503:
        raise NoModelError(message)
    raise EdgeopsError(f"agent API error {status}: {message}")


class ApiClient:
    """Calls ``/v1/infer``, ``/v1/status`` and ``/v1/health`` on an agent."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        """Raises ConfigError for a malformed address; connects lazily, on the first request."""
        self._endpoint = parse_address(address)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connection (the next request opens a new one)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _new_connection(self) -> http.client.HTTPConnection:
        ep = self._endpoint
        if ep.unix_path is not None:
            return _UnixHTTPConnection(ep.unix_path, self._timeout)
        return http.client.HTTPConnection(ep.host, ep.port, timeout=self._timeout)

    @staticmethod
    def _exchange(
        conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, str, bytes, bool]:
        """One request/response on ``conn``: (status, reason, body, whether the server closes)."""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            # the server may refuse a body before it is all sent (413) and close: its answer can still be read
            conn.request(method, path, body=body, headers=dict(headers))
        resp = conn.getresponse()
        return resp.status, resp.reason, resp.read(), resp.will_close

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str, bytes]:
        with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                conn = self._conn or self._new_connection()
                self._conn = conn
                try:
                    status, reason, data, will_close = self._exchange(conn, method, path, body, headers or {})
                except (ConnectionResetError, BrokenPipeError, http.client.BadStatusLine) as exc:
                    self._drop()
                    if reused and attempt == 0:
                        continue  # the server closed an idle keep-alive connection: once more on a new one
                    raise TransportError(f"agent API at {self._endpoint} dropped the connection: {exc}") from None
                except TimeoutError:
                    self._drop()
                    raise TransportError(f"agent API at {self._endpoint}: no answer within {self._timeout} s") from None
                except (OSError, http.client.HTTPException) as exc:
                    self._drop()
                    raise TransportError(f"cannot reach the agent API at {self._endpoint}: {exc}") from None
                if will_close:
                    self._drop()
                return status, reason, data
        raise TransportError(f"agent API at {self._endpoint} dropped the connection twice")  # not reached

    def _get_json(self, path: str) -> tuple[int, Any]:
        status, reason, data = self._request("GET", path, headers={"Accept": "application/json"})
        if status != 503 or path != "/v1/health":
            _raise_for(status, reason, data)
        try:
            return status, json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise EdgeopsError(f"agent API {path} answered something that is not JSON") from None

    def infer(self, feeds: Mapping[str, np.ndarray] | np.ndarray) -> tuple[dict[str, np.ndarray], str]:
        """Run one request: a mapping goes as ``.npz``, a single array as ``.npy``.

        Returns (float32 outputs by name, the model version that answered). Raises TransportError,
        RequestError (4xx, with ``status``), NoModelError (503) or EdgeopsError (other 5xx).
        """
        if isinstance(feeds, np.ndarray):
            body, content_type = _npy_bytes(feeds, "input"), "application/x-npy"
        else:
            body, content_type = _npz_bytes(feeds), "application/x-npz"
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        status, reason, data = self._request("POST", "/v1/infer", body, headers)
        _raise_for(status, reason, data)
        try:
            doc = json.loads(data)
            outputs = {str(k): np.asarray(v, dtype=np.float32) for k, v in doc["outputs"].items()}
            return outputs, str(doc["model_version"])
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
            raise EdgeopsError("agent API answered /v1/infer with a malformed body") from None

    def status(self) -> dict[str, Any]:
        """The agent's status document. Raises TransportError or EdgeopsError."""
        _, doc = self._get_json("/v1/status")
        if not isinstance(doc, dict):
            raise EdgeopsError("agent API /v1/status is not a JSON object")
        return doc

    def health(self) -> bool:
        """True when a model is loaded and serving, False when the agent answers without one (503).

        Raises TransportError when no agent answers at the address.
        """
        status, _ = self._get_json("/v1/health")
        return status == 200
