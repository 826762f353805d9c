"""The fleet dashboard over HTTP: pages, a read-only JSON API and Prometheus ``/metrics`` (stdlib server).

Routes (GET only)::

    /                      overview page            /api/overview          views.overview
    /device/<id>           device page              /api/devices           {"devices": [device_summary...]}
    /release/<id>          release page                                    ?group= &profile= &online=true|false
    /static/<file>         files of dashboard/      /api/devices/<id>      views.device_view (?window=seconds)
    /metrics               Prometheus text          /api/releases          {"releases": [release_summary...]}
                                                    /api/releases/<id>     views.release_view
                                                    /api/rollouts          {"rollouts": [rollout_view...]}
                                                                           ?status=running,paused &limit=50
                                                    /api/rollouts/<id>     views.rollout_view with executions

Guarantees:

- Only GET is served: any other method gets 405 (``Allow: GET``) and the connection is closed, since a body it
  may carry is not read. Unknown paths and ids get a 404 JSON ``{"error": ...}`` (an HTML page for the
  ``/device/`` and ``/release/`` pages), a malformed query 400, a store that is down 503, anything else 500;
  the client never sees a traceback (faults are logged).
- ``/static/`` serves only regular files inside the package's ``dashboard/`` folder with a known suffix: a
  segment that is empty, starts with a dot or holds a separator (also percent-encoded) is refused with 404, and
  the resolved path must still lie inside the folder (symbolic links out of it are refused).
- Every answer carries a Content-Security-Policy that allows only this origin (no inline script or style),
  ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``; JSON answers ``Cache-Control:
  no-store``. JSON never holds NaN or infinities (they become ``null``).

It does not authenticate or encrypt: bind it to 127.0.0.1 (the default) or put it behind a reverse proxy that
does. The server owns one store connection (``open_store``), shared by its request threads and its metrics
collector, opened by :meth:`DashboardServer.start` and closed by :meth:`DashboardServer.stop`.
"""

from __future__ import annotations

import html
import json
import logging
import math
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edgeops.errors import StorageError
from edgeops.fleet import views
from edgeops.fleet.metrics import build_registry
from edgeops.fleet.model import RolloutStatus
from edgeops.fleet.store import FleetStore, open_store

__all__ = ["CSP", "DASHBOARD_DIR", "DashboardRoutes", "DashboardServer", "Reply", "parse_listen_address"]

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
STATIC_TYPES = {
    ".html": HTML_TYPE,
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
MAX_WINDOW_S = 90 * 86400.0  # the longest telemetry window a device view may ask for (the rollup retention)
MAX_ROLLOUTS = 1000  # the most rollouts /api/rollouts lists
IDLE_TIMEOUT_S = 30.0  # a kept-alive connection that sends nothing for this long is closed


@dataclass(frozen=True)
class Reply:
    """One HTTP answer, before it meets a socket."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


class _BadQuery(ValueError):
    """A query parameter the API does not accept (answered with 400)."""


def _finite(doc: Any) -> Any:
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_finite(v) for v in doc]
    return doc


def json_reply(status: int, doc: Any) -> Reply:
    try:
        body = json.dumps(doc, allow_nan=False, default=str)
    except ValueError:  # a NaN or an infinity somewhere: null it
        body = json.dumps(_finite(doc), allow_nan=False, default=str)
    return Reply(status, body.encode(), JSON_TYPE, (("Cache-Control", "no-store"),))


def _not_found(what: str) -> Reply:
    return json_reply(404, {"error": f"not found: {what}"})


def _html_not_found(kind: str, ident: str) -> Reply:
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Not found</title>'
        f'<link rel="stylesheet" href="/static/style.css"></head><body><main><h1>Not found</h1>'
        f'<p data-testid="not-found">Unknown {html.escape(kind)} <code>{html.escape(ident)}</code>.</p>'
        f'<p><a href="/">Back to the overview</a></p></main></body></html>'
    )
    return Reply(404, page.encode(), HTML_TYPE, (("Cache-Control", "no-store"),))


def _one(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _BadQuery(f"{name} given more than once")
    return values[0]


def _number(query: Mapping[str, list[str]], name: str, default: float, lo: float, hi: float) -> float:
    raw = _one(query, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _BadQuery(f"{name} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise _BadQuery(f"{name} must be within [{lo:g}, {hi:g}], got {raw!r}")
    return value


def _statuses(query: Mapping[str, list[str]]) -> list[RolloutStatus] | None:
    raw = query.get("status")
    if not raw:
        return None
    out = []
    for word in ",".join(raw).split(","):
        try:
            out.append(RolloutStatus(word.strip()))
        except ValueError:
            raise _BadQuery(f"unknown rollout status {word!r}") from None
    return out


class DashboardRoutes:
    """The routing and rendering of the dashboard, without sockets: a request target in, a :class:`Reply` out.

    ``clock`` gives the service's time (``time.time`` by default)."""

    def __init__(
        self,
        store: FleetStore,
        registry: CollectorRegistry,
        *,
        window_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store, self._registry, self._window_s, self._clock = store, registry, window_s, clock

    def get(self, target: str) -> Reply:
        """Answer ``GET target``. Never raises: faults become 500 (logged), a store that is down 503."""
        parts = urlsplit(target)
        try:
            segments = [unquote(s, errors="strict") for s in parts.path.split("/")[1:]]
            query = parse_qs(parts.query, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            return json_reply(400, {"error": "the request target is not valid UTF-8"})
        try:
            return self._dispatch(segments, query)
        except _BadQuery as exc:
            return json_reply(400, {"error": str(exc)})
        except StorageError as exc:
            log.warning("dashboard: the fleet store is unavailable: %s", exc)
            return json_reply(503, {"error": "the fleet store is unavailable"})
        except Exception:
            log.exception("dashboard: GET %s failed", parts.path)
            return json_reply(500, {"error": "internal error"})

    def _dispatch(self, seg: list[str], query: Mapping[str, list[str]]) -> Reply:
        if seg in ([""], ["index.html"]):
            return self._static(["index.html"])
        if seg == ["favicon.ico"]:
            return Reply(204, b"", "image/x-icon")
        if seg == ["metrics"]:
            return Reply(200, generate_latest(self._registry), CONTENT_TYPE_LATEST, (("Cache-Control", "no-store"),))
        if len(seg) >= 2 and seg[0] == "static":
            return self._static(seg[1:])
        if len(seg) == 2 and seg[0] == "device" and seg[1]:
            found = self._store.get_device(seg[1]) is not None
            return self._static(["device.html"]) if found else _html_not_found("device", seg[1])
        if len(seg) == 2 and seg[0] == "release" and seg[1]:
            found = self._store.get_release(seg[1]) is not None
            return self._static(["release.html"]) if found else _html_not_found("release", seg[1])
        if len(seg) in (2, 3) and seg[0] == "api":
            return self._api(seg[1], seg[2] if len(seg) == 3 else None, query)
        return _not_found("/".join(seg))

    def _api(self, collection: str, ident: str | None, query: Mapping[str, list[str]]) -> Reply:
        store = self._store
        if ident == "":
            return _not_found(f"api/{collection}/")
        if collection == "overview" and ident is None:
            return json_reply(200, views.overview(store, self._clock()))
        if collection == "devices" and ident is None:
            return json_reply(200, {"devices": self._devices(query)})
        if collection == "devices" and ident is not None:
            window = _number(query, "window", self._window_s, 1.0, MAX_WINDOW_S)
            device = views.device_view(store, ident, self._clock(), window)
            return _not_found(f"device {ident}") if device is None else json_reply(200, device)
        if collection == "releases" and ident is None:
            releases = [views.release_summary(r, lineage=False) for r in store.list_releases()]
            return json_reply(200, {"releases": releases})
        if collection == "releases" and ident is not None:
            release = views.release_view(store, ident)
            return _not_found(f"release {ident}") if release is None else json_reply(200, release)
        if collection == "rollouts" and ident is None:
            limit = int(_number(query, "limit", 50, 0, MAX_ROLLOUTS))
            return json_reply(200, {"rollouts": views.rollouts_view(store, statuses=_statuses(query), limit=limit)})
        if collection == "rollouts" and ident is not None:
            rollout = store.get_rollout(ident)
            if rollout is None:
                return _not_found(f"rollout {ident}")
            doc = views.rollout_view(rollout, store.list_executions(ident), include_executions=True)
            return json_reply(200, doc)
        return _not_found(f"api/{collection}")

    def _devices(self, query: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        online_word = _one(query, "online")
        online: bool | None = None
        if online_word is not None:
            if online_word.lower() not in ("true", "false", "1", "0"):
                raise _BadQuery(f"online must be true or false, got {online_word!r}")
            online = online_word.lower() in ("true", "1")
        found = self._store.list_devices(group=_one(query, "group"), profile=_one(query, "profile"), online=online)
        return [views.device_summary(d) for d in found]

    def _static(self, rel: list[str]) -> Reply:
        if any(not s or s.startswith(".") or "/" in s or "\\" in s or "\x00" in s for s in rel):
            return _not_found("static file")
        path = DASHBOARD_DIR.joinpath(*rel)
        content_type = STATIC_TYPES.get(path.suffix)
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return _not_found("static file")
        if content_type is None or not resolved.is_relative_to(DASHBOARD_DIR) or not resolved.is_file():
            return _not_found("static file")
        try:
            body = resolved.read_bytes()
        except OSError:
            return _not_found("static file")
        return Reply(200, body, content_type, (("Cache-Control", "no-cache"),))


_SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server_version = "edgeops-fleet"
    sys_version = ""

    def do_GET(self) -> None:
        self._send(self.server.routes.get(self.path))

    def _refuse_method(self) -> None:
        self.close_connection = True  # a body it may carry is not read
        reply = json_reply(405, {"error": f"method {self.command} not allowed; use GET"})
        self._send(Reply(reply.status, reply.body, reply.content_type, (*reply.headers, ("Allow", "GET"))))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, unknown method, headers too long) as JSON too."""
        self.close_connection = True
        self._send(json_reply(code, {"error": message or self.responses.get(code, ("error", ""))[0]}))

    def _send(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for key, value in (*_SECURITY_HEADERS, *reply.headers):
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(reply.body)
        except OSError as exc:  # the client went away mid-answer
            log.debug("dashboard: could not answer %s: %s", getattr(self, "path", "?"), exc)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: %s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, routes: DashboardRoutes) -> None:
        self.routes = routes
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:  # HTTPServer's version does a reverse DNS lookup we do not need
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def parse_listen_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port); port 0 means a free port.

    Raises ValueError for anything else."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address must be HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 listen address needs brackets ([::1]:8080), got {address!r}")
    return host, int(port_text)


class DashboardServer:
    """The dashboard, API and metrics on ``address``, served by daemon threads between start() and stop()."""

    def __init__(
        self,
        store_url: str,
        *,
        address: str = "127.0.0.1:8080",
        counters: Callable[[], Mapping[str, float]] | None = None,
        window_s: float = 3600,
    ) -> None:
        """Nothing is opened or bound until :meth:`start`. Raises ValueError for a malformed address or a
        window that is not positive."""
        self._host, self._port = parse_listen_address(address)
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self._store_url, self._counters, self._window_s = store_url, counters, float(window_s)
        self._store: FleetStore | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound server (the real port when 0 was asked). RuntimeError before start."""
        if self._server is None:
            raise RuntimeError("DashboardServer is not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._server.server_port}"

    def start(self) -> None:
        """Open the store and serve. Raises StorageError when the store cannot be opened, OSError when the
        address cannot be bound (in use, not local), RuntimeError when already started."""
        if self._server is not None:
            raise RuntimeError("DashboardServer already started")
        store = open_store(self._store_url)
        try:
            routes = DashboardRoutes(store, build_registry(store, self._counters), window_s=self._window_s)
            server = _Server(self._host, self._port, routes)
        except BaseException:
            store.close()
            raise
        self._store, self._server = store, server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="edgeops-dashboard", daemon=True
        )
        self._thread.start()
        log.info("dashboard on %s", self.url)

    def stop(self) -> None:
        """Stop serving and close the store connection; idempotent."""
        server, thread, store = self._server, self._thread, self._store
        self._server, self._thread, self._store = None, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)
        if store is not None:
            store.close()
