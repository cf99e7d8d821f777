"""Wire capture in the browser (#11): the warning on every page while capture files exist, and a
request page's "capture" link opening the Wire capture section, which htmx fills with the legs
and a stream's chunk table, in a real Chromium."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from tests.dashboard.conftest import Dashboard, log_in, screenshot
from tests.dashboard.test_capture_views import stream_records, stream_request

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_a_request_page_opens_its_capture_and_shows_the_chunks(
    configured_dashboard: Dashboard, capture_dir: Path, new_page: Any, color_scheme: str
) -> None:
    now = timezone.now()
    stream_request(capture_dir, now)
    stream_records(now)
    page, _ = new_page(color_scheme=color_scheme)
    log_in(page, configured_dashboard, next_path="/dashboard/calls/r-stream/")

    warning = page.locator("[data-capture-warning]")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("Wire capture files exist")
    expect(warning).to_contain_text("prompts, completions and headers")

    details = page.locator("details.capture")
    expect(details).to_be_visible()
    # Nothing is read from the capture files until asked.
    expect(details.locator(".capture-leg")).to_have_count(0)

    page.locator(".attempt", has_text="openai-2").locator("a[data-capture-link]").click()
    leg = page.locator("#capture-attempt-2")
    expect(leg).to_be_visible()
    expect(details).to_have_attribute("open", "")
    rows = leg.locator("table[data-chunks] tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator("[data-at]")).to_have_text("212.5 ms")
    expect(rows.nth(1).locator("[data-gap]")).to_have_text("17.6 ms")
    expect(rows.nth(2)).to_contain_text("data: [DONE]")
    expect(page.locator("#capture-client")).to_contain_text("Bearer sk-…wxyz")
    expect(page.locator("#capture-attempt-1")).to_contain_text("slow down")
    # Still the request page: the link opened the section in place.
    assert page.url.endswith("/dashboard/calls/r-stream/")
    screenshot(page, f"request-capture-{color_scheme}")
