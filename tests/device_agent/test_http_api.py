"""The local inference API and its client, against a real server (TCP and Unix socket) over the real digits
ONNX model in onnxruntime."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import socket
import stat
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.api_client import ApiClient
from device_agent.http_api import ApiServer
from device_agent.service import InferenceResult, NoModelError
from edgeops.errors import ConfigError, EdgeopsError, RequestError, TransportError
from tests.support.digits_service import DigitsService

VERSION = "1.4.2"


@pytest.fixture(scope="module")
def service(digits_dir: Path) -> DigitsService:
    return DigitsService(digits_dir / "digits.onnx", version=VERSION)


@pytest.fixture(scope="module")
def images(digits_dir: Path) -> np.ndarray:
    return np.load(digits_dir / "eval_nchw.npz")["x"][:64]


@pytest.fixture(scope="module")
def server(service: DigitsService) -> Iterator[ApiServer]:
    api = ApiServer(service, "127.0.0.1:0", max_request_bytes=1024 * 1024)
    api.start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="eo-api-"))  # short: a Unix socket path has a ~100-byte limit
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def empty_server() -> Iterator[ApiServer]:
    api = ApiServer(DigitsService(None), "127.0.0.1:0")
    api.start()
    yield api
    api.stop()


def _conn(api: ApiServer) -> http.client.HTTPConnection:
    host, port = api.address.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=10)


def _post(api: ApiServer, body: bytes, content_type: str, accept: str = "application/json") -> tuple[int, Any, bytes]:
    conn = _conn(api)
    try:
        conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": content_type, "Accept": accept})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, arr in arrays.items():
            archive.writestr(f"{name}.npy", _npy(arr))
    return buf.getvalue()


def _savez_compressed(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, image=image)
    return buf.getvalue()


def _raw(api: ApiServer, request: bytes) -> tuple[http.client.HTTPResponse, socket.socket]:
    host, port = api.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(request)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp, sock


# --- answers -----------------------------------------------------------------------------------------------------


def test_json_npy_and_npz_bodies_answer_what_the_runtime_answers(
    server: ApiServer, service: DigitsService, images: np.ndarray
) -> None:
    x = images[:10]
    assert service.runner is not None
    want = service.runner.run({"image": x})["probs"]
    bodies = [
        (json.dumps({"inputs": {"image": x.tolist()}}).encode(), "application/json"),
        (json.dumps({"input": x.tolist()}).encode(), "application/json; charset=utf-8"),
        (_npy(x), "application/x-npy"),
        (_npz(image=x), "application/x-npz"),
        (_savez_compressed(x), "application/x-npz"),  # what np.savez_compressed writes: deflated members
    ]
    for body, content_type in bodies:
        status, headers, data = _post(server, body, content_type)
        assert status == 200, data
        assert headers["X-Edgeops-Model-Version"] == VERSION
        doc = json.loads(data)
        assert doc["model_version"] == VERSION and doc["latency_ms"] >= 0
        np.testing.assert_allclose(np.asarray(doc["outputs"]["probs"], dtype=np.float32), want, rtol=0, atol=1e-6)
        assert np.array_equal(np.argmax(doc["outputs"]["probs"], axis=1), np.argmax(want, axis=1))


def test_accept_npy_returns_the_first_output_as_npy(
    server: ApiServer, service: DigitsService, images: np.ndarray
) -> None:
    assert service.runner is not None
    status, headers, data = _post(server, _npy(images[:3]), "application/x-npy", accept="application/x-npy")
    assert status == 200
    assert headers["Content-Type"] == "application/x-npy"
    assert headers["X-Edgeops-Model-Version"] == VERSION
    got = np.load(io.BytesIO(data), allow_pickle=False)
    np.testing.assert_allclose(got, service.runner.run({"image": images[:3]})["probs"], atol=1e-6)


def test_status_and_health(server: ApiServer, empty_server: ApiServer) -> None:
    with ApiClient(server.address) as client:
        assert client.health() is True
        assert client.status()["active"] == {"version": VERSION}
    with ApiClient(empty_server.address) as client:
        assert client.health() is False  # up, but nothing to serve
        assert client.status()["active"] == {"version": None}
    conn = _conn(empty_server)
    conn.request("GET", "/v1/health")
    resp = conn.getresponse()
    assert resp.status == 503 and json.loads(resp.read())["ok"] is False
    conn.close()


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status", "needle"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b'{"inputs": {"image": [[1, 2], [3]]}}', "application/json", 400, "rectangular"),
        (b'{"inputs": {"image": ["a", "b"]}}', "application/json", 400, "numbers"),
        (b'{"image": [1, 2]}', "application/json", 400, '"inputs"'),
        (b"not numpy at all", "application/x-npy", 400, "not a valid .npy"),
        (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "application/x-npy", 400, "dtype object"),
        (_npy(np.ones((1, 1, 8, 8), np.complex64)), "application/x-npy", 400, "complex64"),
        (_npy(np.ones((1000, 1, 8, 8), np.float32))[:4096], "application/x-npy", 400, "does not match its header"),
        (b"PK\x03\x04 broken zip", "application/x-npz", 400, "not a valid .npz"),
        (_npz(other=np.ones((1, 1, 8, 8), np.float32)), "application/x-npz", 400, "the model takes 'image'"),
        (_npy(np.ones((2, 64), np.float32)), "application/x-npy", 400, "expected (N, 1, 8, 8)"),
        (b"1,2,3", "text/csv", 415, "unsupported content type"),
    ],
)
def test_bad_bodies_get_a_specific_json_error(
    server: ApiServer, body: bytes, content_type: str, status: int, needle: str
) -> None:
    got, headers, data = _post(server, body, content_type)
    assert got == status
    assert headers["Content-Type"] == "application/json"
    assert needle in json.loads(data)["error"]
    assert b"Traceback" not in data


def test_unknown_path_and_wrong_method(server: ApiServer) -> None:
    conn = _conn(server)
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/infer", 405), ("POST", "/v1/status", 405)):
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        resp = conn.getresponse()
        assert resp.status == status
        assert "error" in json.loads(resp.read())
        if status == 405:
            assert resp.headers["Allow"] in ("POST", "GET")
        conn.close()
    conn.close()


def test_missing_content_length_is_411(server: ApiServer) -> None:
    resp, sock = _raw(server, b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n\r\n")
    assert resp.status == 411
    assert "Content-Length" in json.loads(resp.read())["error"]
    sock.close()


def test_oversized_body_is_413_before_it_is_sent(server: ApiServer) -> None:
    request = (
        b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\nContent-Length: 1000000000\r\n\r\n"
    )
    start = time.monotonic()
    resp, sock = _raw(server, request)  # no body sent: a server waiting for it would time the read out (5 s)
    assert resp.status == 413
    assert "limit" in json.loads(resp.read())["error"]
    assert time.monotonic() - start < 2
    assert resp.headers["Connection"] == "close"
    sock.close()


def test_keep_alive_survives_an_error(server: ApiServer, images: np.ndarray) -> None:
    conn = _conn(server)
    conn.request("POST", "/v1/infer", body=b"{bad", headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and resp.read()
    conn.request("POST", "/v1/infer", body=_npy(images[:1]), headers={"Content-Type": "application/x-npy"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["model_version"] == VERSION
    conn.close()


def test_no_model_is_503(empty_server: ApiServer, images: np.ndarray) -> None:
    status, headers, data = _post(empty_server, _npy(images[:1]), "application/x-npy")
    assert status == 503
    assert "no model" in json.loads(data)["error"]
    assert "X-Edgeops-Model-Version" not in headers
    with ApiClient(empty_server.address) as client, pytest.raises(NoModelError):
        client.infer(images[:1])


def test_stop_closes_kept_alive_connections_and_frees_the_port(service: DigitsService, images: np.ndarray) -> None:
    api = ApiServer(service, "127.0.0.1:0")
    api.start()
    address = api.address
    conn = _conn(api)
    conn.request("POST", "/v1/infer", body=_npy(images[:1]), headers={"Content-Type": "application/x-npy"})
    assert conn.getresponse().read()
    api.stop()
    conn.request("GET", "/v1/health")  # the same kept-alive connection, after stop
    resp = conn.getresponse()
    assert resp.status == 503 and "stopping" in json.loads(resp.read())["error"]
    assert resp.will_close
    conn.close()
    with pytest.raises(TransportError):
        ApiClient(address, timeout=2).health()
    again = ApiServer(service, address)  # the port can be bound again at once
    again.start()
    try:
        assert ApiClient(again.address).health() is True
    finally:
        again.stop()


def test_bad_addresses_are_config_errors(service: DigitsService, server: ApiServer) -> None:
    for address in ("8780", "localhost:", "unix:", "host:99999"):
        with pytest.raises(ConfigError):
            ApiServer(service, address)
    taken = ApiServer(service, server.address)
    with pytest.raises(ConfigError, match="cannot listen"):
        taken.start()


# --- Unix socket -------------------------------------------------------------------------------------------------


def test_unix_socket_server_and_client(service: DigitsService, sock_dir: Path, images: np.ndarray) -> None:
    path = sock_dir / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file left by an agent that died
    stale.close()
    api = ApiServer(service, f"unix:{path}")
    api.start()
    try:
        assert api.address == f"unix:{path}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with ApiClient(api.address) as client:
            assert client.health() is True
            outputs, version = client.infer({"image": images[:5]})
            assert version == VERSION
            assert service.runner is not None
            np.testing.assert_allclose(outputs["probs"], service.runner.run({"image": images[:5]})["probs"], atol=1e-6)
        with pytest.raises(ConfigError, match="already serves"):
            ApiServer(service, f"unix:{path}").start()  # a live agent's socket is not taken over
    finally:
        api.stop()
    assert not path.exists()
    with pytest.raises(TransportError):
        ApiClient(f"unix:{path}", timeout=2).health()


def test_a_regular_file_is_not_removed_as_a_stale_socket(service: DigitsService, sock_dir: Path) -> None:
    path = sock_dir / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        ApiServer(service, f"unix:{path}").start()
    assert path.read_text() == "keep me"


# --- client ------------------------------------------------------------------------------------------------------


def test_client_over_tcp(server: ApiServer, service: DigitsService, images: np.ndarray) -> None:
    assert service.runner is not None
    want = service.runner.run({"image": images[:7]})["probs"]
    with ApiClient(server.address) as client:
        for feeds in (images[:7], {"image": images[:7]}):
            outputs, version = client.infer(feeds)
            assert version == VERSION
            assert outputs["probs"].dtype == np.float32
            np.testing.assert_allclose(outputs["probs"], want, atol=1e-6)
        with pytest.raises(RequestError, match=r"expected \(N, 1, 8, 8\)") as info:
            client.infer(images[:7].reshape(7, 64))
        assert info.value.status == 400
        client.infer(np.zeros((2000, 1, 8, 8), np.float32))  # 512 kB: within this server's 1 MiB limit
        with pytest.raises(RequestError) as info:
            client.infer(np.zeros((5000, 1, 8, 8), np.float32))  # 1.28 MB > 1 MiB
        assert info.value.status == 413
        with pytest.raises(RequestError) as info:
            client.infer(np.zeros((80_000, 1, 8, 8), np.float32))  # 20 MB: more than the socket buffers hold
        assert info.value.status == 413  # the answer, not a connection reset
        assert client.health() is True  # the client reconnects after the server closed on 413


def test_client_cannot_connect_is_transport_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nobody listens there now
    client = ApiClient(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(TransportError):
        client.infer(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(TransportError):
        client.status()


def test_client_server_error_is_edgeops_error(digits_dir: Path) -> None:
    class Broken(DigitsService):
        def infer(self, feeds: Mapping[str, np.ndarray]) -> InferenceResult:
            raise ZeroDivisionError("a bug")

    api = ApiServer(Broken(digits_dir / "digits.onnx"), "127.0.0.1:0")
    api.start()
    try:
        with ApiClient(api.address) as client, pytest.raises(EdgeopsError, match="internal error") as info:
            client.infer(np.zeros((1, 1, 8, 8), np.float32))
        assert not isinstance(info.value, RequestError | NoModelError)
        assert "ZeroDivisionError" not in str(info.value)  # no traceback leaks to the client
    finally:
        api.stop()


def test_eight_threads_in_parallel_are_all_answered(
    server: ApiServer, service: DigitsService, images: np.ndarray
) -> None:
    assert service.runner is not None
    want = service.runner.run({"image": images})["probs"]
    errors: list[str] = []

    def worker(k: int) -> None:
        with ApiClient(server.address) as client:
            for i in range(10):
                lo = (k * 10 + i) % 60
                outputs, version = client.infer({"image": images[lo : lo + 4]})
                if version != VERSION or not np.allclose(outputs["probs"], want[lo : lo + 4], atol=1e-6):
                    errors.append(f"thread {k} request {i}: wrong answer")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_npz_bomb_is_refused(server: ApiServer) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("image.npy", _npy(np.zeros((40_000, 1, 8, 8), np.float32)))  # 10 MB → a few kB
    status, _, data = _post(server, buf.getvalue(), "application/x-npz")
    assert status == 413
    assert "unpacks to more than" in json.loads(data)["error"]
