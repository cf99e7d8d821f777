"""At a phone's width (390 px) every page fits: the document never scrolls sideways. Wide
tables may scroll inside their own card; the overview's feed and models tables instead keep
the columns a glance needs and drop the rest, so that nothing hides behind a scroll."""

from __future__ import annotations

from typing import Any

import pytest

from tests.dashboard.conftest import Dashboard, log_in, screenshot

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]

PHONE = 390
FITS = "document.scrollingElement.scrollWidth <= innerWidth"
# The calls page last: its rows open the drawer.
PAGES = ["/dashboard/", "/dashboard/keys/", "/dashboard/health/", "/dashboard/clients/",
         "/dashboard/calls/"]  # fmt: skip
KEPT = {
    "recent": ("When", "Model", "Outcome", "Latency"),
    "models": ("Model", "Requests", "Errors", "Cost"),
}


def test_every_page_and_the_request_drawer_fit_a_phone(dashboard: Dashboard, new_page: Any) -> None:
    page, _ = new_page(width=PHONE)
    log_in(page, dashboard)
    assert page.evaluate("innerWidth") == PHONE

    # The overview's small tables fit without a sideways scroll of their own.
    for panel, kept in KEPT.items():
        wrap = page.locator(f"#panel-{panel} .table-wrap")
        assert wrap.evaluate("w => w.scrollWidth <= w.clientWidth"), f"{panel} scrolls sideways"
        for column in kept:
            assert wrap.locator(f"th:text-is('{column}')").is_visible(), (panel, column)
        assert wrap.locator("th:text-is('Tokens')").is_hidden(), panel
    # A status code stays; the word that repeats it goes.
    assert page.locator("#panel-recent tr.record .badge").first.inner_text().strip().isdigit()
    screenshot(page, "overview-phone")

    for path in PAGES:
        page.goto(dashboard.url(path))
        assert page.evaluate(FITS), path
    # The custom frame's form opens on the screen, not beyond its edge.
    page.click(".custom-frame summary")
    assert page.locator(".custom-frame-form").evaluate(
        "f => f.getBoundingClientRect().right <= innerWidth"
    )
    assert page.evaluate(FITS)

    # The request drawer: all of it on the screen.
    page.locator("tr.record").first.click()
    drawer = page.locator("#request-detail")
    drawer.locator(".path").wait_for()
    page.wait_for_timeout(250)  # its slide-in
    assert drawer.evaluate(
        "d => d.getBoundingClientRect().right <= innerWidth && d.scrollWidth <= d.clientWidth"
    )
    assert page.evaluate(FITS)
    screenshot(page, "request-phone")
