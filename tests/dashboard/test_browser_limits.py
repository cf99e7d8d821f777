"""The Limits page in a real headless Chromium, against the real ASGI app on 127.0.0.1: it
loads clean (no console error, no failed request), its countdowns tick, its panel refreshes
itself with new usage, and an empty gateway says how to set limits."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from playwright.sync_api import expect

from keys.limits import Estimate, Lease, Meter, key_meters, spec_lease, spec_meters, usd_units
from keys.models import ApiKey, ClientToken, Limit, Route
from keys.routing import invalidate_routing_cache, routing_snapshot_sync
from tests.dashboard.conftest import POLL_TIMEOUT_MS, Dashboard, log_in, screenshot
from tests.usage.test_limits_api import clear_of_the_minute_end, reserve

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]


def reserve_in_thread(meters: Sequence[Meter], leases: Sequence[Lease] = ()) -> None:
    # Playwright's loop is this thread's running loop: asyncio.run needs a thread of its own.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(reserve, meters, leases).result()


def test_the_limits_page_shows_usage_and_refreshes_itself(
    configured_dashboard: Dashboard, new_page: Any, poll_every: Any
) -> None:
    web = ClientToken.objects.get(name="web-app")
    limit = Limit.objects.create(
        client=web, requests_per_minute=100, usd_per_day=Decimal(10), max_concurrent=8
    )
    Limit.objects.create(route=Route.objects.get(name="gpt-4o"), tokens_per_day=1_000_000)
    ApiKey.objects.filter(key_id="openai-1").update(requests_per_minute=500)
    invalidate_routing_cache()
    clear_of_the_minute_end(margin=15)  # the page must see this minute's reservations
    spec = routing_snapshot_sync().limits[("web-app", "")]
    meters = spec_meters(spec, Estimate(usd=usd_units(Decimal("2.5"))), now=time.time(), zone="UTC")
    lease = spec_lease(spec)
    assert lease is not None
    reserve_in_thread(meters, [lease])
    reserve_in_thread(key_meters("openai-1", rpm=500, tpm=None, tokens=0, now=time.time()))

    poll_every(1)
    page, _ = new_page()
    log_in(page, configured_dashboard, next_path="/dashboard/limits/")
    expect(page.locator(".tabs a[aria-current=page]")).to_have_text("Limits")
    rows = page.locator(f"#limits-table tr[data-limit-id='{limit.pk}']")
    expect(rows).to_have_count(3)  # requests/minute, usd/day, concurrency
    first = rows.first
    expect(first.locator("[data-used]")).to_have_text("1")
    expect(first.locator("[data-remaining]")).to_have_text("99")
    expect(rows.nth(1).locator("[data-used]")).to_have_text("$2.50")
    # The bar is drawn (25 % of the daily budget), not only in the HTML.
    bar = rows.nth(1).locator(".bar span")
    expect(bar).to_be_visible()
    assert bar.evaluate("el => el.getBoundingClientRect().width") > 0
    # The reset countdown is ticked by the page's script (seconds left, not a clock time).
    expect(first.locator("time[data-until]")).to_have_text(re.compile(r"^\d+s$"))
    expect(page.locator("#limits-keys tr[data-key='openai-1'] [data-used]")).to_have_text("1")
    expect(
        page.locator("#limits-budgets tr[data-client='web-app'] [data-budget-day]")
    ).to_have_text("$10.00")
    screenshot(page, "limits")

    # More traffic: the panel polls and shows it without a reload.
    reserve_in_thread(spec_meters(spec, Estimate(), now=time.time(), zone="UTC"))
    expect(first.locator("[data-used]")).to_have_text("2", timeout=POLL_TIMEOUT_MS)
    expect(page.locator(f"#limits-table tr[data-limit-id='{limit.pk}']").first).to_be_visible()


def test_an_empty_gateway_says_how_to_set_limits(empty_dashboard: Dashboard, new_page: Any) -> None:
    page, _ = new_page()
    log_in(page, empty_dashboard, next_path="/dashboard/limits/")
    empty = page.locator("#limits-empty")
    expect(empty).to_be_visible()
    expect(empty).to_contain_text("No limits set")
    expect(empty.locator("a[href='/admin/keys/limit/add/']").first).to_be_visible()
    expect(empty).to_contain_text("import_config")
    screenshot(page, "empty-limits")
