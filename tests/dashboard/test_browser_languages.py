"""In a real browser: the dashboard in the browser's language and time zone, the language
picker (remembered, followed by the admin), local chart labels with UTC one click away, and the
overview's stream switch, whose figures are the monitoring API's for the same calls."""

from __future__ import annotations

import gettext
import json
from datetime import datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.utils import translation

from llmrotate_site.dashboard.templatetags.dashboard import compact, ms
from tests.dashboard.conftest import Dashboard, log_in, screenshot

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]

CHART = "() => window.Chart && Chart.getChart('chart-calls')?.data.labels.length"
NAV = "[...document.querySelectorAll('nav.tabs a')].map(a => a.textContent.trim())"


def _in(code: str, message: str) -> str:
    with translation.override(code):
        return translation.gettext(message)


def _js_in(code: str, message: str) -> str:
    """A string of the scripts' catalogue (djangojs), as /i18n/js/ serves it."""
    catalogue = gettext.translation("djangojs", settings.LOCALE_PATHS[0], languages=[code])
    return catalogue.gettext(message)


def test_the_page_is_in_japanese_when_the_browser_asks_for_it(
    dashboard: Dashboard, new_page: Any
) -> None:
    page, _ = new_page(locale="ja-JP")
    log_in(page, dashboard)
    assert page.get_attribute("html", "lang") == "ja"
    nav = page.evaluate(NAV)
    assert nav[0] == _in("ja", "Overview") != "Overview"
    # The scripts' strings too (the JavaScript catalogue): the chart's series names.
    page.wait_for_function(CHART)
    label = page.evaluate("Chart.getChart('chart-calls').data.datasets[0].label")
    assert label == _js_in("ja", "Successes") != "Successes"
    assert page.input_value("#language-select") == "ja"
    page.wait_for_timeout(400)  # the charts' first animation
    # (The test machine has no CJK font, so its glyphs show as boxes here; README shows German.)
    screenshot(page, "overview-ja")


def test_the_picker_switches_to_german_and_it_stays_german(
    dashboard: Dashboard, new_page: Any
) -> None:
    page, _ = new_page(locale="en-US")
    log_in(page, dashboard, next_path="/dashboard/calls/")
    assert page.get_attribute("html", "lang") == "en"
    with page.expect_navigation():
        page.select_option("#language-select", "de")
    assert page.url.endswith("/dashboard/calls/")  # back where the viewer was
    assert page.get_attribute("html", "lang") == "de"
    assert page.evaluate(NAV)[0] == _in("de", "Overview")
    page.reload()
    assert page.get_attribute("html", "lang") == "de"
    page.goto(dashboard.url("/dashboard/"))
    page.wait_for_function(CHART)
    page.wait_for_timeout(400)  # the charts' first animation
    screenshot(page, "overview-de", docs="overview-de.png")
    # The browser still asks for English; the choice wins, in the admin too.
    page.goto(dashboard.url("/admin/"))
    assert page.get_attribute("html", "lang") == "de"


def _bucket_starts(page: Any) -> list[datetime]:
    data = json.loads(page.text_content("#timeseries-data"))
    return [datetime.fromisoformat(label) for label in data["labels"]]


def test_a_browser_in_new_york_sees_local_hours_with_utc_one_click_away(
    dashboard: Dashboard, new_page: Any
) -> None:
    page, _ = new_page(timezone_id="America/New_York")
    log_in(page, dashboard)
    # The first visit tells the server the browser's zone (a cookie) and loads once more.
    page.wait_for_function("() => document.body.dataset.timeZone === 'America/New_York'")
    page.wait_for_function(CHART)
    starts = _bucket_starts(page)
    new_york = ZoneInfo("America/New_York")
    first = starts[0].astimezone(new_york)
    assert (first.minute, first.second) == (0, 0), "the 24h chart starts on a local hour"
    labels = page.evaluate("Chart.getChart('chart-calls').data.labels")
    assert labels[0] == first.strftime("%H:%M")
    assert labels[0] != starts[0].strftime("%H:%M")  # not the UTC hour
    assert "America/New_York" in page.text_content("footer")

    with page.expect_navigation():
        page.click("[data-time-zone-pick=utc]")
    page.wait_for_function(CHART)
    assert page.evaluate("document.body.dataset.timeZone") == "UTC"
    labels = page.evaluate("Chart.getChart('chart-calls').data.labels")
    assert labels[0] == _bucket_starts(page)[0].strftime("%H:%M")
    page.reload()  # remembered
    assert page.evaluate("document.body.dataset.timeZone") == "UTC"
    with page.expect_navigation():
        page.click("[data-time-zone-pick=local]")
    page.wait_for_function("() => document.body.dataset.timeZone === 'America/New_York'")


def _stat(page: Any, name: str) -> str:
    return str(page.text_content(f"#panel-summary [data-stat='{name}']")).strip()


@pytest.mark.parametrize(
    ("switch", "figures"),
    [
        (
            "true",
            {
                "ttft-p50": ("ttft_stats", ms),
                "ttlt-p50": ("ttlt_stats", ms),
                "tokens-per-second-p50": ("streamed_tokens_per_second_stats", compact),
            },
        ),
        (
            "false",
            {
                "duration-p50": ("duration_stats", ms),
                "tokens-per-second-p50": ("unstreamed_tokens_per_second_stats", compact),
            },
        ),
    ],
)
def test_the_stream_switch_shows_the_apis_figures(
    dashboard: Dashboard, new_page: Any, switch: str, figures: dict[str, Any]
) -> None:
    page, _ = new_page()
    log_in(page, dashboard)
    everything = _stat(page, "requests")
    page.click(f".stream-switch [data-stream='{switch}']")
    page.wait_for_url(f"**stream={switch}**")
    assert page.get_attribute(f".stream-switch [data-stream='{switch}']", "aria-current")
    # The API asked for the same frame (the page's since, up to now).
    since = str(page.get_attribute("#panel-summary .stat-grid", "data-since"))
    api = page.request.get(
        dashboard.url(f"/api/usage/stats?since={quote(since)}&stream={switch}")
    ).json()
    assert _stat(page, "requests") == compact(api["requests"]) != everything
    for name, (field, fmt) in figures.items():
        assert api[field]["p50"] is not None, field
        assert _stat(page, name) == fmt(api[field]["p50"]), name
    # Kept in the URL like the time frame: the polls and the other pages carry it.
    assert f"stream={switch}" in str(page.get_attribute("#panel-summary", "hx-get"))
    page.click("nav.tabs a[href*='/calls/']")
    page.wait_for_url(f"**/calls/**stream={switch}**")
