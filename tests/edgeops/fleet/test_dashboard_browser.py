"""The dashboard in a real browser: Debian chromium driven by Playwright against a real server and SQLite store.

Each page must load with no console error (CSP violations included), no failed request and no HTTP error; the
charts must hold the stored data; the overview must follow the store without a reload.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from edgeops.fleet.http_server import DashboardServer
from edgeops.fleet.model import Alert, AlertKind, AlertLevel, ExecStatus, IngestBatch
from edgeops.fleet.store import FleetStore, open_store
from tests.support.fleet_data import RELEASE, ROLLOUT, TELEMETRY_POINTS, Fleet, fill_fleet

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Response

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE = '<img src="/x-injected" onerror="window.__pwned = 1"><b>bold</b>'  # an alert detail from a device
TIMEOUT_MS = 6000  # three polls of the page


@dataclass
class Dashboard:
    url: str
    store: FleetStore
    fleet: Fleet


@dataclass
class Watch:
    """What went wrong in a page: console errors, uncaught exceptions, failed requests, HTTP errors."""

    problems: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        page.on("response", self._response)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text}")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    db = tmp_path / "fleet.db"
    store = open_store(db)
    now = time.time()
    fleet = fill_fleet(store, now)
    hostile = Alert("pi-02", AlertKind.LATENCY, AlertLevel.ALERT, now - 5, HOSTILE, version="1.0.0")
    store.write_batch(IngestBatch(open_alerts=(hostile,)))
    server = DashboardServer(str(db), address="127.0.0.1:0")
    server.start()
    try:
        yield Dashboard(server.url, store, fleet)
    finally:
        server.stop()
        store.close()


@pytest.fixture
def page(browser: Browser, dashboard: Dashboard) -> Iterator[tuple[Page, Watch]]:
    context = browser.new_context()
    p = context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    watch = Watch()
    watch.attach(p)
    try:
        yield p, watch
    finally:
        context.close()  # before the server stops: no poll may fail on the way out


def chart(page: Page, canvas_id: str) -> Any:
    """The chart drawn on a canvas: labels, each dataset's label and points, and the elements it drew."""
    return page.evaluate(
        """(id) => {
            const c = Chart.getChart(document.getElementById(id));
            if (!c) return null;
            return {labels: c.data.labels, drawn: c.getDatasetMeta(0).data.length, width: c.width,
                    datasets: c.data.datasets.map((d) => ({label: d.label, data: d.data}))};
        }""",
        canvas_id,
    )


def wait_for_points(page: Page, canvas_id: str) -> None:
    page.wait_for_function(
        "(id) => { const c = Chart.getChart(document.getElementById(id)); return c && c.data.datasets[0].data.length }",
        arg=canvas_id,
    )


def test_overview_shows_counts_charts_alerts_and_live_rollout_progress(
    page: tuple[Page, Watch], dashboard: Dashboard
) -> None:
    from playwright.sync_api import expect

    p, watch = page
    p.goto(dashboard.url + "/")
    expect(p.get_by_test_id("devices-total")).to_have_text("4")
    expect(p.get_by_test_id("devices-online")).to_have_text("3")
    expect(p.get_by_test_id("devices-offline")).to_have_text("1")
    versions = chart(p, "chart-versions")
    assert versions["labels"] == ["1.0.0", "1.1.0", "none"] and versions["datasets"][0]["data"] == [2, 1, 1]
    assert versions["drawn"] == 3 and versions["width"] > 0
    assert chart(p, "chart-state")["datasets"][0]["data"] == [3, 1]

    # every string from the API is text: the hostile alert detail shows as written and builds no element
    alert = p.locator('#alerts-body tr[data-kind="latency"]')
    expect(alert).to_contain_text(HOSTILE)
    assert p.locator("#alerts-body img, #alerts-body b").count() == 0
    assert p.evaluate("window.__pwned") is None

    card = p.locator(f'[data-rollout-id="{ROLLOUT}"]')
    expect(card.get_by_test_id("rollout-status")).to_have_text("running")
    expect(card.get_by_test_id("rollout-succeeded")).to_have_text("1")
    expect(card.get_by_test_id("phase")).to_have_count(2)
    second = card.locator('[data-phase="1"] [data-testid="phase-bar"]')
    expect(second.locator(".seg")).to_have_count(2)  # in progress + queued
    expect(second.locator(".seg.succeeded")).to_have_count(0)

    p.evaluate("window.__notReloaded = true")
    rollout = dashboard.store.get_rollout(ROLLOUT)
    assert rollout is not None
    pi02 = next(e for e in dashboard.fleet.executions if e.device_id == "pi-02")
    dashboard.store.save_rollout(rollout, [replace(pi02, status=ExecStatus.SUCCEEDED, updated_at=time.time())])
    expect(card.get_by_test_id("rollout-succeeded")).to_have_text("2")
    expect(second.locator(".seg.succeeded")).to_have_count(1)
    expect(card.get_by_test_id("rollout-in-progress")).to_have_text("0")
    assert p.evaluate("window.__notReloaded") is True

    p.locator('[data-device-id="pi-01"] [data-testid="device-link"]').click()
    p.wait_for_url("**/device/pi-01")
    expect(p.get_by_test_id("device-id")).to_have_text("pi-01")
    assert watch.problems == []


def test_device_page_charts_hold_the_stored_telemetry(page: tuple[Page, Watch], dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    p, watch = page
    p.goto(dashboard.url + "/device/pi-01")
    expect(p.get_by_test_id("fact-version")).to_have_text("1.1.0")
    expect(p.get_by_test_id("fact-state")).to_have_text("online")
    wait_for_points(p, "chart-latency")
    rows = dashboard.fleet.telemetry
    latency = chart(p, "chart-latency")
    assert [d["label"] for d in latency["datasets"]] == ["p50", "p95", "p99"]
    assert [len(d["data"]) for d in latency["datasets"]] == [TELEMETRY_POINTS] * 3
    assert [pt["y"] for pt in latency["datasets"][1]["data"]] == pytest.approx([r.p95_ms for r in rows])
    assert [pt["x"] for pt in latency["datasets"][0]["data"]] == pytest.approx([r.received_at for r in rows])
    assert latency["drawn"] == TELEMETRY_POINTS and latency["width"] > 0
    drift = chart(p, "chart-drift")
    assert drift["datasets"][0]["label"] == "PSI (max)"
    assert [pt["y"] for pt in drift["datasets"][0]["data"]] == pytest.approx([r.drift_psi_max for r in rows])
    expect(p.get_by_test_id("latest-p95")).to_have_text(f"{rows[-1].p95_ms:.2f}")
    expect(p.get_by_test_id("event")).to_have_count(4)
    expect(p.get_by_test_id("slot-change")).to_have_count(3)
    expect(p.get_by_test_id("slot-change").nth(1)).to_contain_text("automatic rollback")
    expect(p.get_by_test_id("device-alert")).to_have_count(1)
    assert watch.problems == []


def test_release_page_shows_lineage_figures_payloads_and_rollouts(
    page: tuple[Page, Watch], dashboard: Dashboard
) -> None:
    from playwright.sync_api import expect

    p, watch = page
    p.goto(f"{dashboard.url}/release/{RELEASE}")
    expect(p.get_by_test_id("fact-sha256")).to_have_text("22" * 32)
    expect(p.get_by_test_id("fact-approval")).to_have_text("pending")
    source = p.locator('[data-testid="lineage-source"] [data-key="sha256"] td')
    expect(source).to_have_text("5a" * 32)  # LINEAGE's source hash
    expect(p.locator('[data-testid="lineage-data"] [data-key="calib_sha256"] td')).to_have_text("c4" * 32)
    expect(p.locator('[data-testid="lineage-toolchain"] [data-key="tensorflow"] td')).to_have_text("2.19.0")
    expect(p.locator('[data-testid="lineage-build"] [data-key="precision"] td')).to_have_text("int8")
    expect(p.locator('[data-testid="gate-figure"][data-key="metrics.agreement"] td')).to_have_text("0.996")
    expect(p.get_by_test_id("payload")).to_have_count(2)
    expect(p.locator('[data-testid="payload"][data-kind="delta"]')).to_contain_text("1.0.0")
    card = p.locator(f'[data-rollout-id="{ROLLOUT}"]')
    expect(card.get_by_test_id("rollout-group")).to_have_text("lab")
    expect(card.get_by_test_id("rollout-succeeded")).to_have_text("1")
    assert watch.problems == []
