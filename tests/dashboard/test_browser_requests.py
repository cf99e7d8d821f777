"""The #9 fields in the browser: on the Calls page, in a request's drawer, and the overview's
Reconciliation panel, each visible (not only in the HTML) in a real Chromium."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.dashboard.conftest import Dashboard, log_in, screenshot
from tests.dashboard.test_views_requests import failover_request, other_requests
from tests.usage.monitoring import write_calls

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]


def test_the_calls_page_a_request_and_the_reconciliation_panel_show_the_new_fields(
    configured_dashboard: Dashboard, new_page: Any
) -> None:
    now = datetime.now(UTC)
    write_calls(failover_request(now) + other_requests(now))
    page, _ = new_page()
    log_in(page, configured_dashboard, next_path="/dashboard/calls/?window=1h")

    answered = page.locator("tr.record[data-request=r-tools][data-final=true]")
    for field in ("data-client-status", "data-origin", "data-session", "data-tools"):
        expect(answered.locator(f"[{field}]")).to_be_visible()
    expect(answered.locator("[data-client-status]")).to_have_text("200")
    expect(answered.locator("[data-origin]")).to_have_text("Helper App")
    expect(answered.locator("[data-session]")).to_have_text("sess-42 · turn 3")
    expect(answered.locator("[data-tools]")).to_have_text("2 tool calls")
    expect(answered).to_contain_text("TTLT 900 ms")
    retried = page.locator("tr.record[data-request=r-tools][data-final=false]")
    expect(retried.locator("[data-client-status]")).to_have_text("not final")
    gone = page.locator("tr.record[data-request=r-gone] [data-client-status]")
    expect(gone).to_contain_text("client hung up")
    screenshot(page, "calls-requests")

    answered.locator("a.req-link").click()
    drawer = page.locator("#request-detail")
    drawer.locator(".path").wait_for()
    for fact in ("client-status", "tools", "origin", "session", "prompt-tokens"):
        expect(drawer.locator(f"[data-fact={fact}]").last).to_be_visible()
    expect(drawer.locator("[data-fact=client-status]")).to_contain_text("200")
    expect(drawer.locator("[data-fact=tools]")).to_contain_text("get_weather")
    expect(drawer.locator("[data-fact=origin]")).to_contain_text("https://app.example")
    expect(drawer.locator("[data-fact=session]")).to_contain_text("sess-42")
    expect(drawer.locator("[data-fact=prompt-tokens]").last).to_contain_text(
        "110 reported · 100 counted · 104 forwarded · +10.0%"
    )
    screenshot(page, "request-fields")

    page.goto(configured_dashboard.url("/dashboard/?window=1h"))
    panel = page.locator("#panel-reconciliation")
    panel.scroll_into_view_if_needed()
    row = panel.locator("tr[data-reconciliation='openai-main/gpt-4o-mini']")
    expect(row).to_be_visible()
    expect(row.locator("[data-difference]")).to_have_text("+10.0%")
