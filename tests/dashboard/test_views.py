"""The dashboard's views through Django's test client: who may see them, what each page and
panel answers, the request view, and the key actions. Both legs (SQLite and Postgres)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from keys.models import ApiKey
from llmrotate_site.dashboard.panels import PANELS
from llmrotate_site.dashboard.views import PAGES
from tests.factories import ApiKeyFactory
from tests.usage.monitoring import call, write_calls

pytestmark = pytest.mark.django_db

PAGE_URLS = ["/dashboard/", "/dashboard/keys/", "/dashboard/health/", "/dashboard/calls/",
             "/dashboard/clients/"]  # fmt: skip


@pytest.fixture
def staff(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    return client


def at(moment: datetime, **overrides: Any) -> Any:
    return call(started_at=moment, finished_at=moment + timedelta(milliseconds=420), **overrides)


def test_it_redirects_anonymous_visitors_to_the_admin_login(client: Client) -> None:
    for url in PAGE_URLS:
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/?next=")


def test_it_refuses_users_who_are_not_staff(client: Client) -> None:
    client.force_login(User.objects.create_user("someone", password="pw"))
    assert client.get("/dashboard/")["Location"].startswith("/admin/login/")


def staff_user(username: str, *permissions: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=permissions))
    return user


def test_staff_need_the_view_call_record_permission_for_pages_and_polls(client: Client) -> None:
    clerk = staff_user("clerk", "view_apikey")
    client.force_login(clerk)
    poll_headers = {"HX-Request": "true", "HX-Current-URL": "http://testserver/dashboard/"}
    for url in PAGE_URLS:
        assert client.get(url).status_code == 403, url
    poll = client.get("/dashboard/panels/summary/", headers=poll_headers)
    assert poll.status_code == 403
    assert "HX-Redirect" not in poll

    clerk.user_permissions.add(Permission.objects.get(codename="view_callrecord"))
    for url in PAGE_URLS:
        assert client.get(url).status_code == 200, url
    assert client.get("/dashboard/panels/summary/", headers=poll_headers).status_code == 200


def test_a_poll_after_the_session_ended_sends_the_tab_to_the_login_page(client: Client) -> None:
    response = client.get(
        "/dashboard/panels/summary/",
        headers={
            "HX-Request": "true",
            "HX-Current-URL": "http://testserver/dashboard/calls/?window=7d&status=error",
        },
    )
    assert response.status_code == 200
    assert response.content == b""
    assert response["HX-Redirect"] == (
        "/admin/login/?next=%2Fdashboard%2Fcalls%2F%3Fwindow%3D7d%26status%3Derror"
    )


def test_the_root_redirects_to_the_dashboard(client: Client) -> None:
    assert client.get("/")["Location"] == "/dashboard/"


def test_every_page_renders_on_an_empty_database(staff: Client) -> None:
    for url in PAGE_URLS:
        response = staff.get(url)
        assert response.status_code == 200, url
    overview = staff.get("/dashboard/").content.decode()
    assert "Add your first upstream key" in overview
    assert 'base_url="http://testserver/v1"' in overview


def test_every_page_and_panel_renders_with_traffic(staff: Client) -> None:
    ApiKeyFactory(key_id="k1")
    now = datetime.now(UTC)
    write_calls(
        [at(now - timedelta(minutes=m), key_id="k1") for m in range(5)]
        + [at(now, key_id="k1", outcome="rate_limited", status_code=429)]
    )
    for url in PAGE_URLS:
        assert staff.get(url).status_code == 200, url
    for name in PANELS:
        response = staff.get(f"/dashboard/panels/{name}/?window=1h")
        assert response.status_code == 200, name
        assert f'id="panel-{name}"' in response.content.decode()
    assert set(PAGES["overview"][1]) <= set(PANELS)


def test_a_panel_carries_the_page_query_into_its_polling_url(staff: Client) -> None:
    html = staff.get("/dashboard/calls/?window=7d&status=error&bogus=1").content.decode()
    assert 'hx-get="/dashboard/panels/calls/?window=7d&amp;status=error"' in html
    assert "every 5s [document.visibilityState === 'visible']" in html


def test_an_unknown_panel_is_a_404(staff: Client) -> None:
    assert staff.get("/dashboard/panels/nope/").status_code == 404


def test_a_bad_time_frame_shows_a_note_and_the_default_frame(staff: Client) -> None:
    html = staff.get("/dashboard/?since=yesterday").content.decode()
    assert "is not an ISO 8601 timestamp" in html
    assert 'href="?window=24h" aria-current="true"' in html


def test_a_custom_frame_filters_the_calls(staff: Client) -> None:
    old = datetime(2025, 1, 1, 12, tzinfo=UTC)
    write_calls([at(old, requested_model="old-model"), at(datetime.now(UTC), requested_model="x")])
    html = staff.get("/dashboard/calls/?since=2025-01-01T00:00&until=2025-01-02T00:00")
    assert "old-model" in html.content.decode()
    assert ">x</a>" not in html.content.decode()


def chart_data(client: Client, query: str) -> dict[str, Any]:
    html = client.get(f"/dashboard/panels/timeseries/?{query}").content.decode()
    found = re.search(r'<script id="timeseries-data" type="application/json">(.*?)</script>', html)
    assert found, html
    return dict(json.loads(found.group(1)))


def test_the_polled_chart_data_says_whether_any_call_was_ever_made(staff: Client) -> None:
    # The empty chart's wording depends on it, and the first call may come while the page is
    # open: so it travels with every poll, not only with the page.
    past = "since=2000-01-01T00:00&until=2000-01-02T00:00"
    assert chart_data(staff, past)["empty"] is True
    assert chart_data(staff, past)["ever_called"] is False
    write_calls([at(datetime.now(UTC))])
    assert chart_data(staff, past)["ever_called"] is True
    # The page's first paint agrees with it.
    page = staff.get(f"/dashboard/?{past}").content.decode()
    assert '<p class="chart-empty-title" data-empty-when="ever">No calls in this' in page
    assert '<p class="chart-empty-title" data-empty-when="never" hidden>' in page


def test_the_overview_asks_once_whether_any_call_was_ever_made(staff: Client) -> None:
    from llmrotate_site.dashboard import query

    with mock.patch.object(
        query, "usage_recent_page", wraps=query.usage_recent_page
    ) as ever_called:
        response = staff.get("/dashboard/?since=2000-01-01T00:00&until=2000-01-02T00:00")
    assert response.status_code == 200
    assert ever_called.call_count == 1  # four panels want to know


def test_the_request_view_shows_every_attempt(staff: Client) -> None:
    now = datetime.now(UTC)
    write_calls(
        [
            at(now, request_id="r1", attempt=1, key_id="a", outcome="rate_limited"),
            at(now, request_id="r1", attempt=2, key_id="b"),
        ]
    )
    page = staff.get("/dashboard/calls/r1/").content.decode()
    assert "<html" in page and page.count('class="attempt ') == 2
    partial = staff.get("/dashboard/calls/r1/", headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial and "rate limited" in partial
    assert staff.get("/dashboard/calls/missing/").status_code == 404


def _post_action(client: Client, key_id: str, action: str) -> Any:
    return client.post(f"/dashboard/keys/{key_id}/{action}/?window=7d")


def test_the_key_actions_call_the_admin_service(staff: Client) -> None:
    ApiKeyFactory(key_id="k1")
    response = _post_action(staff, "k1", "disable")
    assert response.status_code == 302
    assert response["Location"] == "/dashboard/keys/?window=7d"
    assert ApiKey.objects.get(key_id="k1").enabled is False
    _post_action(staff, "k1", "enable")
    assert ApiKey.objects.get(key_id="k1").enabled is True
    assert _post_action(staff, "k1", "reset").status_code == 302
    assert _post_action(staff, "k1", "explode").status_code == 404
    assert _post_action(staff, "missing", "disable").status_code == 404
    assert staff.get("/dashboard/keys/k1/disable/").status_code == 405


def test_the_key_actions_need_the_change_permission(client: Client) -> None:
    ApiKeyFactory(key_id="k1")
    client.force_login(staff_user("viewer", "view_apikey", "view_callrecord"))
    assert _post_action(client, "k1", "disable").status_code == 403
    keys_page = client.get("/dashboard/keys/")
    assert keys_page.status_code == 200
    assert "Disable</button>" not in keys_page.content.decode()


def test_the_key_actions_need_a_csrf_token() -> None:
    ApiKeyFactory(key_id="k1")
    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    assert _post_action(client, "k1", "disable").status_code == 403
    assert ApiKey.objects.get(key_id="k1").enabled is True


def test_edit_links_to_the_keys_admin_change_page(staff: Client) -> None:
    key = ApiKeyFactory(key_id="k1")
    response = staff.get("/dashboard/keys/k1/admin/")
    assert response["Location"] == f"/admin/keys/apikey/{key.pk}/change/"


def test_the_admin_links_to_the_dashboard(staff: Client) -> None:
    assert 'href="/dashboard/">Dashboard</a>' in staff.get("/admin/").content.decode()
