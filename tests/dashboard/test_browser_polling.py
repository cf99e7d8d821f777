"""Polling follows the tab: panels refresh while it is visible, not at all while it is hidden,
and at once when it is shown again; and what a poll brings changes the page in place.

The tab's visibility is the page's `document.visibilityState` (headless Chromium has no tab to
hide), set the way a browser sets it: the property, then a `visibilitychange` event.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llmrotate_site.dashboard.views import PAGES
from tests.dashboard.conftest import POLL_TIMEOUT_MS, Dashboard, log_in, set_visibility
from tests.usage.monitoring import call, write_calls

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]

OVERVIEW_PANELS = set(PAGES["overview"][1])


def _panel_requests(page: Any) -> list[str]:
    """The names of the panels the page asks for, in order, as they happen."""
    names: list[str] = []

    def seen(request: Any) -> None:
        if "/dashboard/panels/" in request.url:
            names.append(request.url.split("/dashboard/panels/")[1].split("/")[0])

    page.on("request", seen)
    return names


def _until_every_panel(page: Any, polls: list[str], *, within_ms: int) -> None:
    # Requests are reported while Playwright waits, so wait in small steps.
    for _ in range(within_ms // 100):
        if set(polls) >= OVERVIEW_PANELS:
            return
        page.wait_for_timeout(100)


def test_a_hidden_tab_stops_polling_and_refreshes_at_once_when_shown(
    empty_dashboard: Dashboard, new_page: Any, poll_every: Any
) -> None:
    poll_every(1)
    page, _ = new_page()
    log_in(page, empty_dashboard)
    polls = _panel_requests(page)
    _until_every_panel(page, polls, within_ms=5000)
    assert set(polls) >= OVERVIEW_PANELS, "visible, every panel polls"

    set_visibility(page, "hidden")
    page.wait_for_timeout(300)  # a poll already on its way
    polls.clear()
    page.wait_for_timeout(2500)  # two intervals and a half
    assert polls == []

    # A minute between polls now: whatever the page asks for within seconds is not a poll.
    poll_every(60)
    page.reload()
    polls.clear()
    set_visibility(page, "hidden")
    set_visibility(page, "visible")
    _until_every_panel(page, polls, within_ms=3000)
    page.wait_for_timeout(200)  # and nothing more
    assert sorted(polls) == sorted(OVERVIEW_PANELS)


def test_an_empty_chart_rewords_itself_when_the_first_call_arrives(
    empty_dashboard: Dashboard, new_page: Any, poll_every: Any
) -> None:
    poll_every(1)
    page, _ = new_page()
    # A frame in the past: it stays empty whatever arrives, only its wording may change.
    log_in(page, empty_dashboard)
    page.goto(empty_dashboard.url("/dashboard/?since=2000-01-01T00:00&until=2000-01-02T00:00"))
    chart = page.locator("[data-chart-card]").first
    assert "Charts start with the first call" in chart.inner_text()
    now = datetime.now(UTC)
    write_calls([call(started_at=now, finished_at=now + timedelta(milliseconds=300))])
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-chart-card]')].every(card =>
            card.innerText.includes('No calls in this time frame')
            && !card.innerText.includes('Charts start with the first call'))""",
        timeout=POLL_TIMEOUT_MS,
    )
