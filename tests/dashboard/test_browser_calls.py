"""The calls log in the browser: each filter narrows the list to exactly the calls it names,
and the "Older →" link pages through all of them once each.

The calls are written here, a known set in which every filter matches a different number of
them, so that a filter which did nothing (or the wrong thing) could not show the right count.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from django.utils import timezone

from tests.dashboard.conftest import Dashboard, log_in
from tests.usage.monitoring import call, write_calls
from usage.calls import CallData

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]

CALLS = "/dashboard/calls/?window=24h"


def _traffic() -> list[CallData]:
    now = timezone.now()
    calls = []
    for i in range(23):
        anthropic = i < 7
        error = i % 4 == 1
        started = now - timedelta(minutes=i + 1)
        calls.append(
            call(
                request_id=f"req-calls-{i:02d}",
                started_at=started,
                finished_at=started + timedelta(milliseconds=300),
                provider="anthropic" if anthropic else "openai",
                provider_kind="anthropic" if anthropic else "openai",
                requested_model="claude-haiku" if anthropic else "o3-mini" if i in (7, 8, 9)
                else "gpt-4o-mini",
                key_id="anthropic-1" if anthropic else "openai-2" if i % 4 == 0 else "openai-1",
                client="batch-jobs" if i % 5 == 0 else "web-app",
                outcome="upstream_error" if error else "success",
                status_code=503 if error else 200,
                error_type="server_error" if error else "",
                stream=i % 3 == 0,
            )
        )  # fmt: skip
    return calls


# filter -> (how the page sets it, which calls it keeps)
FILTERS: dict[str, tuple[str, Callable[[CallData], bool]]] = {
    "provider": ("anthropic", lambda c: c.provider == "anthropic"),
    "model": ("o3-mini", lambda c: c.requested_model == "o3-mini"),
    "key": ("openai-2", lambda c: c.key_id == "openai-2"),
    "client": ("batch-jobs", lambda c: c.client == "batch-jobs"),
    "status": ("error", lambda c: c.outcome != "success"),
    "stream": ("true", lambda c: c.stream),
}


def _shown(page: Any) -> list[str]:
    rows = page.locator("#panel-calls tr.record")
    return [str(rows.nth(i).get_attribute("data-request")) for i in range(rows.count())]


def test_older_pages_through_every_call_once_and_each_filter_narrows_them(
    configured_dashboard: Dashboard, new_page: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmrotate_site.dashboard import panels

    monkeypatch.setattr(panels, "CALLS_PER_PAGE", 10)  # 23 calls: three pages
    calls = _traffic()
    write_calls(calls)
    expected = {
        name: {c.request_id for c in calls if keep(c)} for name, (_, keep) in FILTERS.items()
    }
    sizes = [len(ids) for ids in expected.values()]
    # Each filter tells: no two keep as many calls, none keeps all, all fit one page.
    assert len(set(sizes)) == len(sizes) and max(sizes) < 10

    page, _ = new_page()
    log_in(page, configured_dashboard, next_path=CALLS)
    pages = [_shown(page)]
    while page.locator("a[rel=next]").count():
        with page.expect_navigation():
            page.click("a[rel=next]")
        pages.append(_shown(page))
        assert page.locator("a:text-is('← Newest')").count() == 1
    assert [len(p) for p in pages] == [10, 10, 3]
    seen = [request_id for p in pages for request_id in p]
    assert len(seen) == len(set(seen))  # no call twice
    # All of them, newest first across the pages.
    assert seen == [c.request_id for c in sorted(calls, key=lambda c: c.started_at, reverse=True)]

    page.goto(configured_dashboard.url(CALLS))
    for name, (value, _) in FILTERS.items():
        # Back to no filter, quietly: the one change below is the only one the form sees.
        page.eval_on_selector_all(
            "form.filters select, form.filters input[name=model]",
            "fields => fields.forEach(field => { field.value = ''; })",
        )
        with page.expect_navigation():
            if name == "model":  # a text box with suggestions: applies on Enter
                page.fill("input[name=model]", value)
                page.press("input[name=model]", "Enter")
            else:  # a select: applies as soon as it changes
                page.select_option(f"select[name={name}]", value)
        given = {k: v for k, v in parse_qsl(urlsplit(page.url).query) if v}
        assert given == {"window": "24h", name: value}  # this filter alone
        shown = _shown(page)
        assert set(shown) == expected[name] and len(shown) == len(expected[name]), name
