"""The dashboard's Limits page through Django's test client: who may see it, the empty state,
and the figures of each limit, key and budget. Both legs."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from keys.limits import Estimate, Reading, key_meters, spec_lease, spec_meters, usd_units
from keys.routing import routing_snapshot_sync
from tests.usage.monitoring import call, write_calls
from tests.usage.test_limits_api import Gateway, clear_of_the_minute_end, reserve
from usage import limit_selectors

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    return client


def row(html: str, attribute: str) -> str:
    """The <tr> that carries `attribute` (e.g. data-limit-id="3"), or its first one."""
    found = re.search(rf"<tr {attribute}[^>]*>(.*?)</tr>", html, re.S)
    assert found, f"no row with {attribute}"
    return found.group(1)


def cell(row_html: str, name: str) -> str:
    found = re.search(rf"<td [^>]*{name}[^>]*>(.*?)</td>", row_html, re.S)
    assert found, f"no {name} cell in {row_html}"
    return re.sub(r"<[^>]+>", "", found.group(1)).strip()


def test_anonymous_visitors_go_to_the_login_page(client: Client) -> None:
    response = client.get("/dashboard/limits/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=")


def test_staff_need_the_monitoring_permission(client: Client) -> None:
    clerk = User.objects.create_user("clerk", password="pw", is_staff=True)
    client.force_login(clerk)
    assert client.get("/dashboard/limits/").status_code == 403
    assert client.get("/dashboard/panels/limits/").status_code == 403
    clerk.user_permissions.add(Permission.objects.get(codename="view_callrecord"))
    client.force_login(User.objects.get(pk=clerk.pk))
    assert client.get("/dashboard/limits/").status_code == 200


def test_the_page_is_in_the_navigation(staff: Client) -> None:
    html = staff.get("/dashboard/limits/?window=7d").content.decode()
    assert '<a href="/dashboard/limits/?window=7d" aria-current="page">Limits</a>' in html
    assert (
        '<a href="/dashboard/limits/?window=7d"'
        in staff.get("/dashboard/?window=7d").content.decode()
    )


def test_without_limits_it_says_how_to_set_them(staff: Client) -> None:
    html = staff.get("/dashboard/limits/").content.decode()
    assert 'id="limits-empty"' in html
    assert "No limits set" in html
    assert 'href="/admin/keys/limit/add/"' in html
    assert "limits:" in html and "import_config" in html
    assert 'id="limits-table"' not in html


def test_it_shows_each_limit_with_used_limit_remaining_and_reset(staff: Client) -> None:
    gateway = Gateway()
    clear_of_the_minute_end()
    now = time.time()
    spec = routing_snapshot_sync().limits[("app", "")]
    lease = spec_lease(spec)
    assert lease is not None
    estimate = Estimate(tokens=10, usd=usd_units(Decimal("4.50")))
    reserve(spec_meters(spec, estimate, now=now, zone="UTC"), [lease])
    reserve(key_meters("openai-1", rpm=500, tpm=20_000, tokens=700, now=now))

    html = staff.get("/dashboard/limits/").content.decode()
    assert 'id="limits-empty"' not in html
    assert html.count(f'data-limit-id="{gateway.app_limit.pk}"') == 4  # 3 meters, concurrency
    first = row(html, f'data-limit-id="{gateway.app_limit.pk}"')
    assert "app" in first and "any route" in first
    assert (cell(first, "data-used"), cell(first, "data-limit")) == ("1", "60")
    assert cell(first, "data-remaining") == "59"
    assert re.search(r'<time datetime="[^"]+\+00:00" data-until', first)
    # The daily budget is 90 % used: the bar is amber, 90 % wide.
    assert '<span class="tone-warn" style="width: 90.0%; background: var(--tone)">' in html
    assert "$4.50" in html and "$0.500" in html  # used, remaining
    pair = row(html, f'data-limit-id="{gateway.pair_limit.pk}"')
    assert "ci" in pair and "on gpt-4o-mini" in pair
    keys = row(html, 'data-key="openai-1"')
    assert (cell(keys, "data-used"), cell(keys, "data-limit")) == ("1", "500")
    assert "openai-2" not in html  # no limits of its own


def test_it_shows_each_clients_spend_against_its_budget(staff: Client) -> None:
    Gateway()
    write_calls(
        [call(client="app", started_at=timezone.now() - timedelta(seconds=1), cost_usd=Decimal(4))]
    )
    html = staff.get("/dashboard/limits/").content.decode()
    app = row(html, 'data-client="app"')
    assert (cell(app, "data-spend-day"), cell(app, "data-budget-day")) == ("$4.00", "$5.00")
    assert (cell(app, "data-spend-month"), cell(app, "data-budget-month")) == ("$4.00", "$100.00")
    assert 'aria-label="80% of the daily budget"' in app
    assert 'aria-label="4% of the monthly budget"' in app
    ci = row(html, 'data-client="ci"')
    assert cell(ci, "data-budget-day") == "none"
    assert "of the daily budget" not in ci  # no bar without a budget


def test_the_panel_polls_and_renders_alone(staff: Client) -> None:
    Gateway()
    page = staff.get("/dashboard/limits/?window=1h").content.decode()
    assert 'hx-get="/dashboard/panels/limits/?window=1h"' in page
    partial = staff.get("/dashboard/panels/limits/?window=1h", headers={"HX-Request": "true"})
    assert partial.status_code == 200
    text = partial.content.decode()
    assert "<html" not in text and 'id="panel-limits"' in text and 'id="limits-table"' in text


def test_an_unreadable_store_is_said_not_shown_as_zero(
    staff: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = Gateway()

    class Unreachable:
        def read(self, keys: Sequence[str], lease_keys: Sequence[str], *, now: float) -> Reading:
            return Reading(error=True)

    monkeypatch.setattr(limit_selectors, "get_limiter", Unreachable)
    html = staff.get("/dashboard/limits/").content.decode()
    assert "cannot be read" in html
    first = row(html, f'data-limit-id="{gateway.app_limit.pk}"')
    assert cell(first, "data-used") == "—"
    assert cell(first, "data-limit") == "60"


def test_no_secret_or_token_is_on_the_page(staff: Client) -> None:
    gateway = Gateway()
    html = staff.get("/dashboard/limits/").content.decode()
    assert gateway.key.raw_secret not in html
    for token in (gateway.app, gateway.ci):
        assert token.raw_token not in html
        assert token.token_hash not in html
