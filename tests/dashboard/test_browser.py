"""The dashboard in a real headless Chromium, against the real ASGI app on 127.0.0.1.

Every test ends with its pages' BrowserWatch clean: no console error, no uncaught exception, no
failed request and no HTTP error status (see conftest.py). Embedded leg only: the browser adds
nothing the scaled leg would test differently, and it is the slowest part of the suite.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from playwright.sync_api import expect

from tests.dashboard.conftest import POLL_TIMEOUT_MS, Dashboard, log_in, screenshot
from tests.e2e.conftest import wait_for

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]

PAGES = {
    "overview": "/dashboard/",
    "keys": "/dashboard/keys/",
    "health": "/dashboard/health/",
    "calls": "/dashboard/calls/",
    "clients": "/dashboard/clients/",
}


def calls_stat(page: Any) -> str:
    return str(page.inner_text("[data-stat=requests]"))


def test_it_logs_in_and_shows_every_page_with_data(dashboard: Dashboard, new_page: Any) -> None:
    page, _ = new_page()
    log_in(page, dashboard)

    # Overview: providers, figures, both charts drawn, models, the feed and the key table.
    page.wait_for_function("() => window.Chart && Chart.getChart('chart-calls')")
    assert page.locator(".provider").count() == 4
    assert calls_stat(page) not in ("0", "—")
    assert page.locator("#panel-models tbody tr").count() == 7
    assert page.locator("#panel-recent tbody tr").count() == 8
    # Wide enough, the feed and the models table show every column (a phone drops some).
    assert page.locator("#panel-recent th:text-is('Tokens')").is_visible()
    assert page.locator("#panel-models th:text-is('Tokens')").is_visible()
    assert page.locator("#panel-key_table tbody tr").count() == 11
    # openai-2 was rate limited with Retry-After 95 s: its countdown ticks in the page.
    row = page.locator("#panel-key_table tbody tr", has_text="openai-2")
    countdown = row.locator("time[data-until]")
    first = countdown.inner_text()
    page.wait_for_timeout(1100)
    assert re.fullmatch(r"1m \d\ds|\d+s", countdown.inner_text())
    assert countdown.inner_text() != first
    screenshot(page, "overview-light", docs="overview-light.png")

    page.goto(dashboard.url(PAGES["keys"]))
    keys = page.locator("#panel-key_details tbody tr")
    assert keys.count() == 11
    assert keys.filter(has_text="anthropic-3").locator(".badge").inner_text() == "quarantined"
    assert "req" in keys.filter(has_text="openai-1").inner_text()  # rate-limit headroom
    screenshot(page, "keys")

    page.goto(dashboard.url(PAGES["health"]))
    assert page.locator(".endpoint").count() == 4
    # A latency line per endpoint and probe kind (HTTP and ping are not one measure).
    assert page.locator(".probe-line[data-kind=http] polyline").count() == 4
    assert page.locator(".probe-line[data-kind=ping] polyline").count() == 4
    failing = page.locator(".endpoint", has_text="8444")
    assert failing.locator(".timeline .tone-bad").count() >= 1
    screenshot(page, "health")

    page.goto(dashboard.url(PAGES["calls"]))
    assert page.locator("#panel-calls tbody tr").count() == 50
    page.select_option("select[name=status]", "error")  # filters apply on change
    page.wait_for_url(re.compile(r"status=error"))
    assert page.locator("#panel-calls .badge.tone-ok").count() == 0
    screenshot(page, "calls")

    page.goto(dashboard.url(PAGES["clients"]))
    assert page.locator("#panel-clients tbody tr").count() == 6
    screenshot(page, "clients")


def test_every_page_teaches_what_to_do_on_an_empty_database(
    empty_dashboard: Dashboard, new_page: Any
) -> None:
    page, _ = new_page()
    log_in(page, empty_dashboard)
    hero = page.locator("#panel-providers .empty-hero")
    assert "Add your first upstream key" in hero.inner_text()
    assert hero.locator("a[href='/admin/keys/apikey/add/']").count() >= 1
    assert "import_config" in hero.inner_text()
    # Both first steps sit in a card alike.
    assert page.locator("#panel-providers.card .empty-hero").count() == 1
    assert page.locator("#panel-summary .card .empty-hero").count() == 1
    snippet = page.locator("#panel-summary pre")
    assert f'base_url="{empty_dashboard.url("/v1")}"' in snippet.inner_text()
    assert "# your client token" in snippet.inner_text()
    # The whole snippet shows: nothing hides behind a sideways scroll.
    assert snippet.evaluate("el => el.scrollWidth <= el.clientWidth")
    # No bare 0-1 axes: the chart cards say what will be there, and no chart is drawn yet.
    charts = page.locator("[data-chart-card]")
    assert charts.count() == 2
    for i in range(2):
        assert "Charts start with the first call" in charts.nth(i).inner_text()
        assert (
            charts.nth(i)
            .locator("canvas")
            .evaluate("c => getComputedStyle(c).visibility === 'hidden'")
        )
    page.wait_for_load_state("load")
    assert page.evaluate("Chart.getChart('chart-calls') === undefined")
    models = page.locator("#panel-models").inner_text()
    assert not re.search(r"\b0 (routes?|models?)\b", models)
    assert "Each model clients ask for" in models
    screenshot(page, "empty-overview")
    for name, path in PAGES.items():
        page.goto(empty_dashboard.url(path))
        assert page.locator("main .empty, main .empty-hero").count() >= 1, name
        screenshot(page, f"empty-{name}")


def test_the_time_frame_is_in_the_url_and_changes_the_data(
    dashboard: Dashboard, new_page: Any
) -> None:
    page, _ = new_page()
    log_in(page, dashboard)
    day = calls_stat(page)
    page.click(".segmented a:text-is('1h')")
    page.wait_for_url(re.compile(r"window=1h"))
    assert calls_stat(page) != day
    assert page.locator(".frame-picker .segmented a[aria-current]").inner_text() == "1h"
    # The frame follows the navigation, so a shared link shows the same view.
    page.click(".tabs a:text-is('Clients')")
    page.wait_for_url(re.compile(r"/dashboard/clients/\?window=1h"))

    page.click(".custom-frame summary")
    page.fill("input[name=since]", "2000-01-01T00:00")
    page.fill("input[name=until]", "2000-01-02T00:00")
    page.click(".custom-frame-form button[type=submit]")
    page.wait_for_url(re.compile(r"since=2000-01-01T00%3A00&until=2000-01-02T00%3A00"))
    assert page.locator("#panel-clients tbody").inner_text().count("no calls in this frame") == 6


def test_a_panel_updates_after_new_traffic_and_the_failover_path_opens(
    dashboard: Dashboard, fake_upstream: Any, new_page: Any, poll_every: Any
) -> None:
    from usage.recorder import get_recorder

    assert dashboard.seeded is not None
    poll_every(2)
    page, _ = new_page()
    # A frame with a fixed start: under a sliding `window` the oldest bucket could leave the
    # chart between two polls and change its total by itself.
    since = (datetime.now(UTC) - timedelta(minutes=50)).strftime("%Y-%m-%dT%H:%M")
    log_in(page, dashboard, next_path=f"/dashboard/?since={since}")
    page.wait_for_function("() => window.Chart && Chart.getChart('chart-calls')")
    before = calls_stat(page)
    # Markers that a reload, a redrawn chart or a replaced canvas would lose.
    page.evaluate(
        """() => {
            window.notReloaded = true;
            window.chartsBefore = ['chart-calls', 'chart-tokens'].map(id => Chart.getChart(id));
            window.canvasBefore = document.getElementById('chart-calls');
        }"""
    )
    total = "() => Chart.getChart('chart-calls').data.datasets.flatMap(d => d.data)"
    charted = page.evaluate(f"({total})().reduce((a, b) => a + b, 0)")

    # The preferred openai key answers 429 once: the proxy fails over to the next key.
    secret = dashboard.seeded.secrets["openai-1"]
    fake_upstream.script({"keys": {secret: {"queue": [{"fault": "429", "retry_after": 20}]}}})
    client = openai.OpenAI(
        base_url=dashboard.url("/v1"), api_key=dashboard.seeded.tokens["web-app"], max_retries=0
    )
    reply = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello dashboard"}]
    )
    client.close()
    assert reply.http_response.status_code == 200
    assert get_recorder().flush(timeout=10)

    # The summary and the chart follow by polling, without a reload.
    page.wait_for_function(
        "before => document.querySelector('[data-stat=requests]').textContent.trim() !== before",
        arg=before,
        timeout=POLL_TIMEOUT_MS,
    )
    page.wait_for_function(
        f"charted => ({total})().reduce((a, b) => a + b, 0) === charted + 2",
        arg=charted,
        timeout=POLL_TIMEOUT_MS,
    )
    assert page.evaluate("window.notReloaded") is True
    # In place: the same Chart objects on the same canvas, holding the new data.
    assert page.evaluate(
        """() => ['chart-calls', 'chart-tokens'].every(
            (id, i) => Chart.getChart(id) === window.chartsBefore[i]
        ) && document.getElementById('chart-calls') === window.canvasBefore"""
    )

    # The request at the top of the calls log opens its failover path in the drawer.
    page.goto(dashboard.url("/dashboard/calls/?window=1h&client=web-app"))
    request_id = wait_for(lambda: page.locator("tr.record").first.get_attribute("data-request"))
    page.locator("tr.record").first.click()
    drawer = page.locator("#request-detail")
    drawer.locator(".path").wait_for()
    assert request_id in drawer.inner_text()
    attempts = drawer.locator(".attempt")
    assert attempts.count() == 2
    assert "openai-1" in attempts.nth(0).inner_text()
    assert "rate limited" in attempts.nth(0).inner_text()
    assert "success" in attempts.nth(1).inner_text()
    screenshot(page, "request-failover")
    page.keyboard.press("Escape")
    assert drawer.is_hidden()


def test_the_keys_page_buttons_run_the_admin_actions(dashboard: Dashboard, new_page: Any) -> None:
    page, _ = new_page()
    log_in(page, dashboard, next_path="/dashboard/keys/?window=7d")
    row = page.locator("#panel-key_details tbody tr", has_text="openai-3")
    row.locator("button:text-is('Disable')").click()
    page.wait_for_url(re.compile(r"/dashboard/keys/\?window=7d$"))
    assert "openai-3: disabled." in page.locator(".notice").inner_text()
    expect(row.locator(".badge")).to_have_text("disabled")
    row.locator("button:text-is('Enable')").click()
    expect(row.locator(".badge")).to_have_text("active")
    row.locator("a:text-is('Edit')").click()
    page.wait_for_url(re.compile(r"/admin/keys/apikey/\d+/change/"))
    page.click("#user-tools a:text-is('Dashboard')")
    page.wait_for_url(re.compile(r"/dashboard/$"))
