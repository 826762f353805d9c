"""The agent's local inference API: HTTP/1.1 on 127.0.0.1 (or any host:port) or a Unix socket, stdlib only.

Endpoints: ``POST /v1/infer`` (JSON, ``.npy`` or ``.npz`` body), ``GET /v1/status``, ``GET /v1/health``.
This module only turns bytes into arrays and results into bytes; every model-specific check (names, shapes,
dtypes) belongs to the :class:`~device_agent.service.InferenceService`.

Guarantees:

- A body larger than ``max_request_bytes`` is refused with 413 before any of it is read; a request without a
  ``Content-Length`` gets 411. A ``.npy`` header is checked against the bytes that follow before anything is
  allocated, and an ``.npz`` may not unpack to more than ``NPZ_EXPANSION`` × ``max_request_bytes``.
- Pickles, object, string and complex arrays are refused; nothing from a request is executed.
- Every error is a JSON ``{"error": "..."}`` with a specific status (400, 404, 405, 411, 413, 415, 503, 500);
  server faults are logged, never sent to the client as a traceback.
- A connection whose body was not read is closed after the answer, so keep-alive never desynchronises.
- Inference never touches the network: a request thread calls the service and nothing else.
"""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import socketserver
import stat
import threading
import time
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import numpy as np

from device_agent.api_client import Endpoint, parse_address
from device_agent.service import InferenceResult, InferenceService, NoModelError
from edgeops import bounded_json
from edgeops.errors import ConfigError, EdgeopsError, RequestError
from edgeops.manifest import TensorInfo

__all__ = ["ApiServer", "decode_request"]

log = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Edgeops-Model-Version"
NPY_TYPE, NPZ_TYPE, JSON_TYPE = "application/x-npy", "application/x-npz", "application/json"
_TYPES_HINT = f"use {JSON_TYPE}, {NPY_TYPE} or {NPZ_TYPE}"
NPZ_EXPANSION = 8  # an .npz may unpack to at most this many times max_request_bytes
IDLE_TIMEOUT_S = 30.0  # a connection that sends nothing for this long is closed
LINGER_S = 1.0  # after refusing a body: how long to discard what the client still sends before closing
LINGER_MAX_BYTES = 64 * 1024 * 1024  # ... and at most this much of it
_NUMERIC_KINDS = "biuf"
_ROUTES: dict[str, dict[str, str]] = {
    "/v1/infer": {"POST": "_infer"},
    "/v1/status": {"GET": "_status"},
    "/v1/health": {"GET": "_health"},
}


# --- decoding ------------------------------------------------------------------------------------------------


def _decode_npy(data: bytes, what: str = "body") -> np.ndarray:
    """One ``.npy`` (no pickles); the header must describe exactly the bytes that follow. Raises RequestError."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, tokenize.TokenError) as exc:
        raise RequestError(f"{what} is not a valid .npy: {exc}") from None
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS:
        raise RequestError(f"{what} has dtype {dtype}; send numbers (bool, int, uint or float)")
    count = math.prod(shape)
    if len(data) - buf.tell() != count * dtype.itemsize:
        raise RequestError(f"{what}: .npy data does not match its header (shape {shape}, dtype {dtype})")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
    return np.array(flat.reshape(shape, order="F" if fortran else "C"), dtype=dtype.newbyteorder("="), order="C")


def _decode_npz(data: bytes, limit: int) -> dict[str, np.ndarray]:
    """One array per input name from an ``.npz`` (stored or deflated). Raises RequestError."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise RequestError(f"body is not a valid .npz: {exc}") from None
    if not infos:
        raise RequestError("the .npz holds no arrays")
    if sum(i.file_size for i in infos) > limit:
        raise RequestError(f"the .npz unpacks to more than {limit} bytes", status=413)
    out: dict[str, np.ndarray] = {}
    for info in infos:
        name = info.filename[: -len(".npy")]
        if not info.filename.endswith(".npy") or not name or name in out:
            raise RequestError(f".npz member {info.filename!r} is not a uniquely named .npy")
        try:
            raw = archive.read(info)
        except (zipfile.BadZipFile, zlib.error, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise RequestError(f".npz member {info.filename!r} cannot be read: {exc}") from None
        out[name] = _decode_npy(raw, what=f".npz member {info.filename!r}")
    return out


def _json_array(name: str, value: Any, dtype: str | None) -> np.ndarray:
    """A nested list as float32, or as the schema's integer dtype (whole numbers in range only)."""
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError, RecursionError, OverflowError):
        raise RequestError(f"input {name!r} is not a rectangular nested list of numbers") from None
    if raw.dtype.kind not in _NUMERIC_KINDS:
        raise RequestError(f"input {name!r} is not a rectangular nested list of numbers")
    try:
        want = np.dtype(dtype) if dtype else np.dtype(np.float32)
    except TypeError:
        want = np.dtype(np.float32)
    if want.kind not in "iu":
        return raw.astype(np.float32)
    as_float = raw.astype(np.float64)
    info = np.iinfo(cast(Any, want))
    if raw.size and (
        not np.all(np.isfinite(as_float))
        or np.any(as_float != np.round(as_float))
        or as_float.min() < info.min
        or as_float.max() > info.max
    ):
        raise RequestError(f"input {name!r} takes whole numbers in [{info.min}, {info.max}] ({want})")
    return raw.astype(want)


def _single_name(schema: list[TensorInfo] | None) -> str:
    return schema[0].name if schema is not None and len(schema) == 1 else "input"


def _decode_json(body: bytes, schema: list[TensorInfo] | None) -> dict[str, np.ndarray]:
    try:
        doc = bounded_json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError("body is not valid JSON") from None
    if isinstance(doc, dict) and isinstance(doc.get("inputs"), dict) and doc["inputs"]:
        inputs: Mapping[str, Any] = doc["inputs"]
    elif isinstance(doc, dict) and "input" in doc and "inputs" not in doc:
        inputs = {_single_name(schema): doc["input"]}
    else:
        raise RequestError('JSON body needs "inputs" (an object of arrays by input name) or "input" (one array)')
    dtypes = {t.name: t.dtype for t in schema or []}
    return {name: _json_array(name, value, dtypes.get(name)) for name, value in inputs.items()}


def decode_request(
    content_type: str, body: bytes, schema: list[TensorInfo] | None, *, max_bytes: int
) -> dict[str, np.ndarray]:
    """Arrays by input name from a request body. Raises RequestError (415 for an unknown content type)."""
    if content_type == JSON_TYPE:
        return _decode_json(body, schema)
    if content_type == NPY_TYPE:
        return {_single_name(schema): _decode_npy(body)}
    if content_type == NPZ_TYPE:
        return _decode_npz(body, NPZ_EXPANSION * max_bytes)
    raise RequestError(f"unsupported content type {content_type!r}: {_TYPES_HINT}", status=415)


# --- encoding ------------------------------------------------------------------------------------------------


def _tolist(arr: np.ndarray) -> Any:
    a = np.asarray(arr)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        obj = a.astype(object)
        obj[~np.isfinite(a)] = None  # NaN/inf are not JSON: null
        return obj.tolist()
    return a.tolist()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _tolist(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _result_json(result: InferenceResult) -> bytes:
    doc = {
        "model_version": result.version,
        "latency_ms": round(float(result.latency_ms), 3),
        "outputs": {name: _tolist(arr) for name, arr in result.outputs.items()},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# --- HTTP plumbing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    service: InferenceService
    max_request_bytes: int
    stopping: threading.Event  # set by stop(): kept-alive connections get 503 and are closed


class _HasContext(Protocol):
    context: _Context


class _HttpError(Exception):
    """An answer decided by the front end itself (404, 405, 411, 413, 415, ...)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeops-agent"
    timeout = IDLE_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # headers and body go out in two writes: with Nagle on, each answer waits ~40 ms for a delayed ACK
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    _body_pending = False  # the request has a body this handler has not read (close after answering)

    @property
    def _ctx(self) -> _Context:
        return cast(_HasContext, self.server).context

    def version_string(self) -> str:
        return self.server_version  # no Python version on the wire

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        length = self.headers.get("Content-Length")
        may_have_body = self.command in ("POST", "PUT", "PATCH")
        self._body_pending = bool(self.headers.get("Transfer-Encoding")) or (
            length != "0" if may_have_body else length not in (None, "0")
        )
        path = urlsplit(self.path).path
        try:
            if self._ctx.stopping.is_set():
                self.close_connection = True  # and this kept-alive connection with it
                raise _HttpError(503, "the agent is stopping")
            route = _ROUTES.get(path)
            if route is None:
                raise _HttpError(404, f"no endpoint {path}")
            if self.command not in route:
                raise _HttpError(405, f"{path} takes {', '.join(route)}", {"Allow": ", ".join(route)})
            cast(Callable[[], None], getattr(self, route[self.command]))()
        except _HttpError as exc:
            self._send_json(exc.status, {"error": str(exc)}, exc.headers)
        except RequestError as exc:
            self._send_json(exc.status, {"error": str(exc)})
        except NoModelError as exc:
            self._send_json(503, {"error": str(exc) or "no model is loaded"})
        except EdgeopsError as exc:
            log.error("api: %s %s failed: %s", self.command, path, exc)
            self._send_json(500, {"error": str(exc)})
        except Exception:  # a bug or a runtime's untyped error: log it, answer 500, keep serving
            log.exception("api: %s %s failed", self.command, path)
            self._send_json(500, {"error": "internal error (see the agent log)"})

    def _read_body(self) -> tuple[str, bytes]:
        """(content type, body) once the length and type are acceptable; the 411/413/415 checks read nothing."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise _HttpError(411, "Content-Length is required")
        if not raw.strip().isdigit():
            raise _HttpError(400, f"bad Content-Length {raw!r}")
        length = int(raw)
        if length > self._ctx.max_request_bytes:
            raise _HttpError(413, f"body of {length} bytes is over the {self._ctx.max_request_bytes}-byte limit")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type not in (JSON_TYPE, NPY_TYPE, NPZ_TYPE):
            raise _HttpError(415, f"unsupported content type {content_type!r}: {_TYPES_HINT}")
        try:
            body = self.rfile.read(length)
        except OSError as exc:
            raise _HttpError(408, f"request body not received: {exc}") from None
        if len(body) != length:
            raise _HttpError(400, f"body ended after {len(body)} of {length} bytes")
        self._body_pending = False
        return content_type, body

    def _infer(self) -> None:
        content_type, body = self._read_body()
        ctx = self._ctx
        feeds = decode_request(content_type, body, ctx.service.input_schema(), max_bytes=ctx.max_request_bytes)
        result = ctx.service.infer(feeds)
        headers = {MODEL_VERSION_HEADER: result.version}
        accept = [a.split(";")[0].strip().lower() for a in (self.headers.get("Accept") or "").split(",")]
        if NPY_TYPE in accept and result.outputs:
            buf = io.BytesIO()
            np.save(buf, np.asarray(next(iter(result.outputs.values()))), allow_pickle=False)
            self._send(200, buf.getvalue(), NPY_TYPE, headers)
        else:
            self._send(200, _result_json(result), JSON_TYPE, headers)

    def _status(self) -> None:
        self._send_json(200, self._ctx.service.status())

    def _health(self) -> None:
        schema = self._ctx.service.input_schema()
        if schema is None:
            self._send_json(503, {"ok": False, "error": "no model is loaded"})
            return
        inputs = [{"name": t.name, "shape": t.shape, "dtype": t.dtype} for t in schema]
        self._send_json(200, {"ok": True, "inputs": inputs})

    def _send_json(self, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc, default=_json_default).encode(), JSON_TYPE, headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self._body_pending or self.close_connection:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            if self._body_pending:
                self._linger()
        except OSError as exc:  # the client went away mid-answer
            log.debug("api: could not answer %s %s: %s", self.command, self.path, exc)
            self.close_connection = True

    def _linger(self) -> None:
        """Half-close, then discard what the client still sends for a moment (bounded) before the socket closes.

        Closing with unread bytes makes the kernel send a reset that can destroy the answer in the client's
        buffer; a client still sending an oversized body must be able to read its 413.
        """
        sock = self.connection
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_S)
        deadline, drained = time.monotonic() + LINGER_S, 0
        try:
            while time.monotonic() < deadline and drained < LINGER_MAX_BYTES:
                chunk = sock.recv(256 * 1024)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError as exc:  # timeout or reset: the client is done either way
            log.debug("api: linger ended: %s", exc)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, unsupported method, headers too long) as JSON too."""
        self._body_pending = True
        reason = message or self.responses.get(code, ("error", ""))[0]
        self._send(code, json.dumps({"error": reason}).encode(), JSON_TYPE)


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, endpoint: Endpoint, context: _Context) -> None:
        self.context = context
        self.address_family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        super().__init__((endpoint.host, endpoint.port), _Handler)

    def server_bind(self) -> None:  # HTTPServer's version does a reverse DNS lookup we do not need
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, context: _Context) -> None:
        self.context = context
        super().__init__(path, _Handler)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead agent; refuse a live one or a file that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"api socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: stale
        return
    except OSError as exc:
        raise ConfigError(f"api socket {path} cannot be checked: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise ConfigError(f"another process already serves on {path}")


class ApiServer:
    """The local inference API over a service; serves in a daemon thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, service: InferenceService, address: str, *, max_request_bytes: int = 16 * 1024 * 1024) -> None:
        """Raises ConfigError for a malformed address; nothing is bound until :meth:`start`."""
        self._endpoint = parse_address(address)
        self._service, self._max_request_bytes = service, max_request_bytes
        self._stopping = threading.Event()
        self._server: _TcpServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._bound = self._endpoint

    @property
    def address(self) -> str:
        """The bound address once started (the real port when 0 was asked), else the configured one."""
        return str(self._bound)

    def start(self) -> None:
        """Bind and serve. Raises ConfigError when the address cannot be listened on (in use, no such dir)."""
        if self._server is not None:
            raise RuntimeError("ApiServer already started")
        ep = self._endpoint
        self._stopping = threading.Event()
        context = _Context(self._service, self._max_request_bytes, self._stopping)
        try:
            if ep.unix_path is not None:
                _clear_stale_socket(Path(ep.unix_path))
                server: _TcpServer | _UnixServer = _UnixServer(ep.unix_path, context)
                try:
                    Path(ep.unix_path).chmod(0o660)
                except OSError:
                    server.server_close()
                    Path(ep.unix_path).unlink(missing_ok=True)
                    raise
            else:
                server = _TcpServer(ep, context)
                self._bound = Endpoint(host=ep.host, port=server.server_port)
        except OSError as exc:
            raise ConfigError(f"api cannot listen on {ep}: {exc.strerror or exc}") from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="edgeops-api", daemon=True
        )
        self._thread.start()
        log.info("api: serving on %s", self.address)

    def stop(self) -> None:
        """Stop accepting, close the listening socket and remove a Unix socket file. Idempotent.

        Requests already running finish; a kept-alive connection's next request is answered 503 and closed.
        """
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)
        if self._endpoint.unix_path is not None:
            path = Path(self._endpoint.unix_path)
            if path.is_socket():
                path.unlink(missing_ok=True)
