"""The viewer's language and time zone, for the pages people read: the dashboard, the admin and
the language switch. Everything else (the monitoring and config APIs, /healthz, /metrics) stays
in English and UTC whatever the caller's browser says: those are machine contracts, and a
translated error message or a local timestamp would break the programs that read them. (The
proxy's own paths never reach Django's middleware; see asgi.py.)

Language: Django's LocaleMiddleware (the `django_language` cookie the dashboard's picker sets,
then Accept-Language). Time zone: the `llmrotate_tz` cookie, which static/dashboard/app.js sets
to the browser's zone (or to UTC, when the viewer asks for UTC); without it, UTC.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import tzinfo
from functools import lru_cache

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.middleware.locale import LocaleMiddleware
from django.utils import timezone, translation

TIME_ZONE_COOKIE = "llmrotate_tz"
# "utc" when the viewer asked for UTC; otherwise app.js keeps TIME_ZONE_COOKIE on the browser's.
TIME_ZONE_CHOICE_COOKIE = "llmrotate_tz_choice"
VIEWER_PATHS = ("/dashboard/", "/admin/", "/i18n/")
# IANA names are short ASCII paths (America/Argentina/ComodRivadavia is among the longest).
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+){0,2}")


@lru_cache(maxsize=256)
def _zone(name: str) -> tzinfo | None:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None


def viewer_time_zone(name: str | None) -> tzinfo | None:
    """The zone a cookie names, or None for a missing, malformed or unknown one (the page is
    then in UTC). The cookie is the browser's to write, so it is checked before it is used."""
    if not name or len(name) > 64 or not _ZONE_NAME.fullmatch(name):
        return None
    return _zone(name)


class ViewerMiddleware(LocaleMiddleware):
    def process_request(self, request: HttpRequest) -> None:
        if not request.path.startswith(VIEWER_PATHS):
            # A thread that served a German page before must not answer an API call in German.
            translation.activate(settings.LANGUAGE_CODE)
            timezone.deactivate()
            return
        super().process_request(request)
        zone = viewer_time_zone(request.COOKIES.get(TIME_ZONE_COOKIE))
        if zone is None:
            timezone.deactivate()
        else:
            timezone.activate(zone)

    def process_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        if not request.path.startswith(VIEWER_PATHS):
            return response
        return super().process_response(request, response)
