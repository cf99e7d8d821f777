"""What a dashboard URL asks for: a time frame and the calls filters, read from the query string
with the monitoring API's own parsing, so that `?window=7d` means the same on a page as on
`/api/usage/stats`, and a view can be shared by copying its URL.

Every link and every poll carries the frame on: `DashboardQuery.frame_query` for the navigation,
`DashboardQuery.query` (frame and filters) for the panels of the page being looked at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from urllib.parse import urlencode

from django.http import HttpRequest
from django.utils import timezone

from common.timeframes import WINDOWS, TimeFrame, TimeFrameError, timeframe_parse
from usage.record_selectors import usage_recent_page
from usage.selectors import UsageFilters

DEFAULT_WINDOW = "24h"
FRAME_PARAMS = ("window", "since", "until")
FILTER_PARAMS = ("provider", "model", "key", "client", "status", "stream", "operation")
# The call kinds (usage.models.Operation), as the Calls page's filter offers them.
OPERATIONS = {
    "chat": "Chat",
    "responses": "Responses",
    "text_completion": "Text completion",
    "embeddings": "Embeddings",
}
_STATUSES = ("success", "error")
_STREAM = {"true": True, "false": False}


@dataclass(frozen=True)
class DashboardQuery:
    frame: TimeFrame
    now: datetime
    window: str | None  # None for a custom since/until frame
    since: str = ""  # as given, to fill the custom-frame form again
    until: str = ""
    filters: UsageFilters = field(default_factory=UsageFilters)
    params: dict[str, str] = field(default_factory=dict)  # the recognised ones, as given
    error: str | None = None  # why the frame asked for was not used

    @property
    def operations(self) -> dict[str, str]:
        return OPERATIONS

    @property
    def windows(self) -> tuple[str, ...]:
        return tuple(WINDOWS)

    @property
    def frame_query(self) -> str:
        return urlencode({k: v for k, v in self.params.items() if k in FRAME_PARAMS})

    @property
    def query(self) -> str:
        return urlencode(self.params)

    @property
    def has_filters(self) -> bool:
        return any(k in FILTER_PARAMS for k in self.params)

    @cached_property
    def ever_called(self) -> bool:
        """Has the gateway ever recorded a call? Tells "no traffic ever" (teach the first
        request) from "none in this frame" (suggest a longer one). Asked by several panels of
        a page, answered once per request: one row by the (started_at, id) index."""
        page = usage_recent_page(frame=TimeFrame(), filters=UsageFilters(), limit=1)
        return bool(page.records)

    def with_params(self, **changes: str | None) -> str:
        """The query string with some parameters changed (None drops one)."""
        params = dict(self.params)
        for name, value in changes.items():
            if value is None:
                params.pop(name, None)
            else:
                params[name] = value
        return urlencode(params)


def dashboard_query(request: HttpRequest) -> DashboardQuery:
    """Parse the frame (default: the last 24 hours) and the filters. A bad frame is not an
    error page: the page shows the default frame with a note saying what was wrong."""
    now = timezone.now()
    given = {k: request.GET.get(k, "").strip() for k in (*FRAME_PARAMS, *FILTER_PARAMS)}
    params = {k: v for k, v in given.items() if v}
    window, since, until = (params.get(k) for k in FRAME_PARAMS)
    if not (window or since or until):
        window = DEFAULT_WINDOW
    error = None
    try:
        frame = timeframe_parse(window=window, since=since, until=until, now=now)
    except TimeFrameError as exc:
        error = exc.message
        window, since, until = DEFAULT_WINDOW, None, None
        frame = timeframe_parse(window=window, since=None, until=None, now=now)
        params = {k: v for k, v in params.items() if k not in FRAME_PARAMS}
    if window:
        params = {k: v for k, v in params.items() if k not in ("since", "until")}
    status = params.get("status")
    filters = UsageFilters(
        provider=params.get("provider"),
        model=params.get("model"),
        key=params.get("key"),
        client=params.get("client"),
        status=status if status in _STATUSES else None,  # type: ignore[arg-type]
        stream=_STREAM.get(params.get("stream", "")),
        operation=params.get("operation") if params.get("operation") in OPERATIONS else None,
    )
    return DashboardQuery(
        frame=frame,
        now=now,
        window=window if not (since or until) else None,
        since=since or "",
        until=until or "",
        filters=filters,
        params=params,
        error=error,
    )
