"""The dashboard in the viewer's language and time zone; the JSON APIs in English and UTC.

Language: Accept-Language picks one of settings.LANGUAGES until the viewer picks one with the
dashboard's picker (Django's set_language: the django_language cookie), which the admin then
follows too. Time zone: the llmrotate_tz cookie (app.js keeps it on the browser's zone).
"""

from __future__ import annotations

import gettext
import json
import re
import zoneinfo
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from django.utils import timezone, translation

from llmrotate_site.dashboard.views import PAGES
from llmrotate_site.viewer import ViewerMiddleware
from tests.dashboard.conftest import text
from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls

api = monitoring.api
monitor_token = monitoring.monitor_token

pytestmark = [pytest.mark.django_db, pytest.mark.embedded]  # no data layer of its own

CODES = [code for code, _ in settings.LANGUAGES]


def _in(code: str, message: str) -> str:
    with translation.override(code):
        return translation.gettext(message)


def _lang(html: str) -> str:
    found = re.search(r'<html lang="([^"]+)"', html)
    assert found, "no <html lang>"
    return found.group(1)


@pytest.mark.parametrize("code", CODES)
def test_every_page_speaks_the_browsers_language(staff: Client, code: str) -> None:
    write_calls([call(started_at=datetime.now(UTC) - timedelta(minutes=3))])
    for name in PAGES:
        url = "/dashboard/" if name == "overview" else f"/dashboard/{name}/"
        response = staff.get(url, headers={"accept-language": f"{code},en;q=0.5"})
        assert response.status_code == 200, url
        html = response.content.decode()
        assert _lang(html) == code
        assert response.headers["Content-Language"] == code
        # The page's own words: the navigation and the overview's headings.
        for word in ("Overview", "Calls", "Experiments", "Log out"):
            assert _in(code, word) in text(html), (code, word)
        if code != "en":
            assert _in(code, "Overview") != "Overview", f"{code} has no translation"


def test_the_picked_language_is_remembered_and_the_admin_follows_it(staff: Client) -> None:
    response = staff.post("/i18n/setlang/", {"language": "de", "next": "/dashboard/calls/"})
    assert response.status_code == 302 and response.headers["Location"] == "/dashboard/calls/"
    cookie = response.cookies[settings.LANGUAGE_COOKIE_NAME]
    assert cookie.value == "de" and int(cookie["max-age"]) == settings.LANGUAGE_COOKIE_AGE
    # Over the browser's own choice, on the dashboard and in the admin.
    page = staff.get("/dashboard/", headers={"accept-language": "ja"}).content.decode()
    assert _lang(page) == "de" and "Übersicht" in page
    admin = staff.get("/admin/", headers={"accept-language": "ja"}).content.decode()
    assert _lang(admin) == "de"
    assert _in("de", "Dashboard") in text(admin)
    assert "Website-Verwaltung" in admin or "Verwaltung" in admin  # Django's own German


def test_a_language_outside_the_list_falls_back_to_english(staff: Client) -> None:
    html = staff.get("/dashboard/", headers={"accept-language": "pt-BR,pt;q=0.9"})
    assert _lang(html.content.decode()) == "en"


def test_chinese_browsers_get_simplified_chinese(staff: Client) -> None:
    html = staff.get("/dashboard/", headers={"accept-language": "zh-CN,zh;q=0.9"})
    assert _lang(html.content.decode()) == "zh-hans"


def test_the_javascript_catalogue_follows_the_language(client: Client) -> None:
    client.cookies[settings.LANGUAGE_COOKIE_NAME] = "ja"
    js = client.get("/i18n/js/").content.decode()
    japanese = gettext.translation(
        "djangojs", localedir=settings.LOCALE_PATHS[0], languages=["ja"]
    ).gettext("just now")
    assert japanese != "just now"
    assert json.dumps(japanese)[1:-1] in js  # the catalogue is JSON (non-ASCII escaped)


def test_numbers_follow_the_language(staff: Client) -> None:
    write_calls(
        [call(started_at=datetime.now(UTC) - timedelta(minutes=1), cost_usd=Decimal("1234.5"))]
    )
    english = staff.get("/dashboard/", headers={"accept-language": "en"}).content.decode()
    german = staff.get("/dashboard/", headers={"accept-language": "de"}).content.decode()
    assert "$1,234.50" in english
    assert "$1.234,50" in german


@pytest.mark.parametrize("path", ["/api/usage/stats?window=nope", "/v1/usage/stats?start_date=x"])
def test_the_json_apis_stay_english_whatever_the_viewer_chose(
    api: Client, path: str, settings: Any
) -> None:
    api.cookies[settings.LANGUAGE_COOKIE_NAME] = "de"
    api.cookies["llmrotate_tz"] = "Asia/Tokyo"
    response = api.get(path, headers={"accept-language": "de"})
    assert response.status_code == 422
    assert "Content-Language" not in response.headers
    body = response.content.decode()
    assert "is not" in body or "Input should be" in body, body  # English, as documented


def test_a_thread_that_served_a_local_page_answers_the_api_in_english_and_utc(
    rf: RequestFactory,
) -> None:
    """Language and zone are per thread: the middleware must reset them for every path it
    does not localise, or an API call would inherit the previous page's."""
    seen: list[tuple[str, str]] = []

    def view(request: HttpRequest) -> HttpResponse:
        seen.append((translation.get_language(), timezone.get_current_timezone_name()))
        return HttpResponse("ok")

    middleware = ViewerMiddleware(view)
    for path in ("/dashboard/", "/api/usage/stats"):
        request = rf.get(path, headers={"accept-language": "de"})
        request.COOKIES["llmrotate_tz"] = "Asia/Kolkata"
        response = middleware(request)
    assert seen == [("de", "Asia/Kolkata"), ("en", "UTC")]
    assert "Content-Language" not in response.headers


def test_times_are_shown_in_the_viewers_zone(staff: Client) -> None:
    staff.cookies["llmrotate_tz"] = "America/New_York"
    html = staff.get("/dashboard/").content.decode()
    assert 'data-time-zone="America/New_York"' in html
    assert "America/New_York" in text(html)
    staff.cookies["llmrotate_tz"] = "Mars/Olympus_Mons"  # not a zone: UTC, no error
    assert 'data-time-zone="UTC"' in staff.get("/dashboard/").content.decode()
    staff.cookies["llmrotate_tz"] = "../../etc/passwd"
    assert 'data-time-zone="UTC"' in staff.get("/dashboard/").content.decode()


def test_a_window_starts_on_the_viewers_hour_and_day(staff: Client) -> None:
    staff.cookies["llmrotate_tz"] = "Asia/Kolkata"  # UTC+05:30
    for window, check in (
        ("24h", lambda t: (t.minute, t.second) == (0, 0)),
        ("7d", lambda t: (t.hour, t.minute, t.second) == (0, 0, 0)),
    ):
        html = staff.get(f"/dashboard/panels/timeseries/?window={window}").content.decode()
        labels = re.search(r'"labels": \[(.*?)\]', html)
        assert labels, html
        first = datetime.fromisoformat(labels.group(1).split(",")[0].strip().strip('"'))
        local = first.astimezone(zoneinfo.ZoneInfo("Asia/Kolkata"))
        assert check(local), (window, local)


def test_bar_widths_stay_css_numbers_in_languages_with_a_decimal_comma(staff: Client) -> None:
    """A localised 33,3 in a style attribute is invalid CSS: every bar would be full width."""
    now = datetime.now(UTC)
    write_calls(
        [call(started_at=now - timedelta(minutes=m), requested_model="a") for m in range(3)]
    )
    write_calls([call(started_at=now - timedelta(minutes=1), requested_model="b")])
    widths = []
    for url in ("/dashboard/", "/dashboard/clients/", "/dashboard/limits/"):
        html = staff.get(url, headers={"accept-language": "de"}).content.decode()
        widths += re.findall(r'style="width: ([^%"]*)%', html)
    assert widths, "no bars rendered"
    assert all(re.fullmatch(r"\d+(\.\d+)?", w) for w in widths), widths
    assert "33.3" in widths or "25.0" in widths or "75.0" in widths, widths


def test_a_custom_frame_is_local_time_and_its_url_names_the_moment(staff: Client) -> None:
    staff.cookies["llmrotate_tz"] = "America/New_York"
    html = staff.get("/dashboard/calls/?since=2026-01-31T12:00").content.decode()
    # The form shows the viewer's wall clock; the links and polls carry the offset.
    assert 'name="since" value="2026-01-31T12:00"' in html
    assert "since=2026-01-31T12%3A00%3A00-05%3A00" in html
    # The shared link, opened in UTC: the same moment on a UTC clock.
    staff.cookies["llmrotate_tz"] = "UTC"
    html = staff.get("/dashboard/calls/?since=2026-01-31T12%3A00%3A00-05%3A00").content.decode()
    assert 'name="since" value="2026-01-31T17:00"' in html


def test_clear_drops_the_stream_filter_too(staff: Client) -> None:
    html = staff.get("/dashboard/calls/?window=7d&stream=true").content.decode()
    assert 'href="?window=7d">Clear</a>' in html
