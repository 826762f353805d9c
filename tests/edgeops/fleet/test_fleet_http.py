"""The dashboard server on a real socket (port 0) over a real SQLite store: routes, errors, static files,
headers and Prometheus /metrics."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edgeops.errors import StorageError
from edgeops.fleet.http_server import DashboardRoutes, DashboardServer, parse_listen_address
from edgeops.fleet.metrics import build_registry
from edgeops.fleet.model import ExecStatus
from edgeops.fleet.store import FleetStore, open_store
from tests.support.fleet_data import RELEASE, ROLLOUT, TELEMETRY_POINTS, Fleet, fill_fleet

GRAFANA = Path(__file__).resolve().parents[3] / "examples" / "grafana" / "edgeops-fleet.json"
COUNTERS = {"stored": 41.0, "rejected": 2.0, "rate_limited": 0.0}


class Client:
    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body)  # the path is sent as given: no normalisation
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, path: str, status: int = 200) -> Any:
        code, headers, body = self.request("GET", path)
        assert code == status, (path, code, body[:300])
        assert headers["content-type"] == "application/json"
        assert headers["cache-control"] == "no-store"
        return json.loads(body)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Client, FleetStore, Fleet]]:
    db = tmp_path / "fleet.db"
    store = open_store(db)
    fleet = fill_fleet(store, time.time())  # the server's clock is the real one
    server = DashboardServer(str(db), address="127.0.0.1:0", counters=lambda: COUNTERS)
    server.start()
    try:
        yield Client(server.url), store, fleet
    finally:
        server.stop()
        store.close()


def test_json_api_routes(served: tuple[Client, FleetStore, Fleet]) -> None:
    client, _, fleet = served
    ov = client.json("/api/overview")
    assert ov["devices"]["total"] == 4 and ov["devices"]["online"] == 3
    devices = client.json("/api/devices")["devices"]
    assert [d["device_id"] for d in devices] == ["jet-01", "pi-01", "pi-02", "pi-03"]
    assert [d["device_id"] for d in client.json("/api/devices?online=false")["devices"]] == ["pi-03"]
    assert [d["device_id"] for d in client.json("/api/devices?profile=jetson")["devices"]] == ["jet-01"]
    one = client.json("/api/devices/pi-01")
    assert len(one["series"]) == TELEMETRY_POINTS  # the server's window: one hour
    assert one["latest"]["seq"] == fleet.telemetry[-1].seq
    assert len(client.json("/api/devices/pi-01?window=10800")["series"]) == TELEMETRY_POINTS + 1
    releases = client.json("/api/releases")["releases"]
    assert {r["release_id"] for r in releases} == {RELEASE, "digits-1.0.0-rpi4"}
    assert "lineage" not in releases[0]
    assert client.json(f"/api/releases/{RELEASE}")["release"]["lineage"]["precision"] == "int8"
    assert [r["id"] for r in client.json("/api/rollouts?status=running")["rollouts"]] == [ROLLOUT]
    rollout = client.json(f"/api/rollouts/{ROLLOUT}")
    assert [e["status"] for e in rollout["executions"]] == ["skipped", "succeeded", "in_progress", "queued"]


def test_api_follows_the_store(served: tuple[Client, FleetStore, Fleet]) -> None:
    client, store, fleet = served
    assert client.json(f"/api/rollouts/{ROLLOUT}")["counts"]["succeeded"] == 1
    rollout = store.get_rollout(ROLLOUT)
    assert rollout is not None
    done = [replace(e, status=ExecStatus.SUCCEEDED) for e in fleet.executions if e.device_id in ("pi-02", "pi-03")]
    store.save_rollout(rollout, done)
    assert client.json(f"/api/rollouts/{ROLLOUT}")["counts"]["succeeded"] == 3
    assert client.json("/api/overview")["rollouts"][0]["per_phase"][1]["counts"]["succeeded"] == 2


def test_unknown_ids_and_paths_are_404_json(served: tuple[Client, FleetStore, Fleet]) -> None:
    client, _, _ = served
    for path in ("/api/devices/nobody", "/api/releases/nope", "/api/rollouts/r-0", "/api/nothing", "/nope",
                 "/api/devices/", "/api/overview/extra", "/api/devices/pi-01/more"):  # fmt: skip
        assert "error" in client.json(path, status=404)
    code, headers, body = client.request("GET", "/device/nobody")
    assert code == 404 and headers["content-type"].startswith("text/html") and b"nobody" in body
    code, _, body = client.request("GET", "/release/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert code == 404 and b"&lt;script&gt;alert(1)" in body and b"<script>" not in body


def test_bad_queries_are_400(served: tuple[Client, FleetStore, Fleet]) -> None:
    client, _, _ = served
    assert "online" in client.json("/api/devices?online=maybe", status=400)["error"]
    assert "window" in client.json("/api/devices/pi-01?window=-5", status=400)["error"]
    assert "status" in client.json("/api/rollouts?status=exploded", status=400)["error"]
    assert "limit" in client.json("/api/rollouts?limit=x", status=400)["error"]


def test_only_get_is_allowed(served: tuple[Client, FleetStore, Fleet]) -> None:
    client, _, _ = served
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, headers, body = client.request(method, "/api/overview", body=b'{"x": 1}')
        assert code == 405 and headers["allow"] == "GET", method
        assert json.loads(body)["error"].startswith(f"method {method}")
    code, headers, body = client.request("HEAD", "/")
    assert code == 405 and body == b""
    code, _, body = client.request("BREW", "/")
    assert code == 501 and "error" in json.loads(body)


def test_static_files_and_pages_are_served_with_a_strict_csp(served: tuple[Client, FleetStore, Fleet]) -> None:
    client, _, _ = served
    for path, kind, marker in (
        ("/", "text/html", b'data-page="overview"'),
        ("/device/pi-01", "text/html", b'data-page="device"'),
        (f"/release/{RELEASE}", "text/html", b'data-page="release"'),
        ("/static/app.js", "text/javascript", b"textContent"),
        ("/static/style.css", "text/css", b".bar"),
        ("/static/vendor/chart.umd.min.js", "text/javascript", b"Chart.js v4.6.1"),
    ):
        code, headers, body = client.request("GET", path)
        assert code == 200 and headers["content-type"].startswith(kind) and marker in body, path
        assert headers["content-security-policy"].startswith("default-src 'self'"), path
        assert "unsafe" not in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"


def test_path_traversal_is_refused(served: tuple[Client, FleetStore, Fleet]) -> None:
    client, _, _ = served
    for path in (
        "/static/../http_server.py",
        "/static/%2e%2e/http_server.py",
        "/static/..%2fhttp_server.py",
        "/static/vendor/../../views.py",
        "/static/vendor/%2e%2e%2f%2e%2e%2fstore.py",
        "/static/%2fetc%2fpasswd",
        "/static//etc/passwd",
        "/static/..%5cviews.py",
        "/static/.hidden",
        "/static/vendor",
        "/static/",
    ):
        code, headers, body = client.request("GET", path)
        assert code in (400, 404), path
        assert b"import" not in body and b"root:" not in body, path
        assert headers["content-type"] == "application/json", path


def test_metrics_parse_and_have_per_device_series(served: tuple[Client, FleetStore, Fleet]) -> None:
    client, _, fleet = served
    code, headers, body = client.request("GET", "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    families = list(text_string_to_metric_families(body.decode()))
    for family in families:
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    latest = fleet.telemetry[-1]
    assert value("edgeops_store_up") == 1
    assert value("edgeops_devices", state="online") == 3 and value("edgeops_devices", state="offline") == 1
    assert value("edgeops_devices_by_version", version="1.0.0") == 2
    assert value("edgeops_device_online", device="pi-03") == 0
    assert value("edgeops_device_latency_ms", device="pi-01", version="1.1.0", quantile="0.5") == latest.p50_ms
    assert value("edgeops_device_latency_ms", device="pi-01", version="1.1.0", quantile="0.99") == latest.p99_ms
    assert value("edgeops_device_requests", device="pi-01", version="1.1.0") == latest.requests
    assert value("edgeops_device_errors", device="pi-01", version="1.1.0") == latest.errors
    assert value("edgeops_device_drift_psi", device="pi-01", version="1.1.0") == latest.drift_psi_max
    assert ("edgeops_device_drift_psi", (("device", "pi-02"), ("version", "1.0.0"))) not in samples  # psi null
    assert value("edgeops_alerts_open", kind="drift") == 1 and value("edgeops_alerts_open", kind="offline") == 0
    assert value("edgeops_rollout_executions", rollout=ROLLOUT, status="succeeded") == 1
    assert value("edgeops_rollout_executions", rollout=ROLLOUT, status="queued") == 1
    assert value("edgeops_telemetry_rows") == TELEMETRY_POINTS + 2
    assert value("edgeops_ingest_messages_total", outcome="stored") == 41
    # the Grafana example charts only series the server exports
    exported = {f.name for f in families} | {name for name, _ in samples}
    charted = set(re.findall(r"edgeops_[a-z_]+", GRAFANA.read_text()))
    assert charted and charted <= exported, charted - exported


def test_two_servers_in_one_process_have_their_own_registries(tmp_path: Path) -> None:
    a = DashboardServer(str(tmp_path / "a.db"), address="127.0.0.1:0")
    b = DashboardServer(str(tmp_path / "b.db"), address="127.0.0.1:0")
    a.start()
    b.start()
    try:
        for server in (a, b):
            code, _, body = Client(server.url).request("GET", "/metrics")
            assert code == 200 and b'edgeops_devices{state="online"} 0.0' in body
    finally:
        a.stop()
        b.stop()
    with pytest.raises(RuntimeError):
        _ = a.url


class _DownStore:
    """A store whose database is gone: every read raises StorageError."""

    def __getattr__(self, name: str) -> Any:
        def down(*args: object, **kwargs: object) -> Any:
            raise StorageError(f"{name}: database is locked")

        return down


class _BrokenStore:
    def __getattr__(self, name: str) -> Any:
        def broken(*args: object, **kwargs: object) -> Any:
            raise KeyError("secret-internal-detail")

        return broken


def _routes(store: Any) -> DashboardRoutes:
    registry: CollectorRegistry = build_registry(store, lambda: COUNTERS)
    return DashboardRoutes(store, registry)


def test_a_store_that_is_down_gives_503_and_store_up_0() -> None:
    routes = _routes(_DownStore())
    reply = routes.get("/api/overview")
    assert reply.status == 503 and json.loads(reply.body) == {"error": "the fleet store is unavailable"}
    metrics = routes.get("/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    assert "edgeops_store_up 0.0" in text and 'edgeops_ingest_messages_total{outcome="stored"} 41.0' in text


def test_a_fault_gives_500_without_a_traceback() -> None:
    reply = _routes(_BrokenStore()).get("/api/devices")
    assert reply.status == 500 and json.loads(reply.body) == {"error": "internal error"}
    assert b"secret-internal-detail" not in reply.body and b"Traceback" not in reply.body


def test_listen_addresses() -> None:
    assert parse_listen_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", "host:99999", "::1:80", ":80"):
        with pytest.raises(ValueError):
            parse_listen_address(bad)
