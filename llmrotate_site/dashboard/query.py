"""What a dashboard URL asks for: a time frame and the calls filters, read from the query string
with the monitoring API's own parsing, so that `?window=7d` means the same on a page as on
`/api/usage/stats`, and a view can be shared by copying its URL.

Every link and every poll carries the frame on: `DashboardQuery.frame_query` for the navigation,
`DashboardQuery.query` (frame and filters) for the panels of the page being looked at.

The viewer's time zone (llmrotate_site.viewer) shapes the charts and the custom frame: a chart
of a window starts on a local boundary (the last hour on the minute, 24 hours on the local
hour, 7 and 30 days at local midnight; `DashboardQuery.chart_frame`), so that its buckets are
local hours and local days, and a custom since/until without an offset is local time. The
figures of a window are over exactly that window, as the API's; the queries stay in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from functools import cached_property
from urllib.parse import urlencode

from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from common.timeframes import (
    DEFAULT_BUCKETS,
    WINDOWS,
    TimeFrame,
    TimeFrameError,
    default_bucket,
    timeframe_parse,
    wall_floor,
)
from usage.record_selectors import usage_recent_page
from usage.selectors import UsageFilters

DEFAULT_WINDOW = "24h"
FRAME_PARAMS = ("window", "since", "until")
FILTER_PARAMS = ("provider", "model", "key", "client", "status", "stream", "operation")
# What every link carries from page to page: the frame, and the overview's stream switch.
CARRIED_PARAMS = (*FRAME_PARAMS, "stream")
# The call kinds (usage.models.Operation), as the Calls page's filter offers them.
OPERATIONS = {
    "chat": _("Chat"),
    "responses": _("Responses"),
    "text_completion": _("Text completion"),
    "embeddings": _("Embeddings"),
}
# The overview's switch: every panel shows all calls, streamed ones or the others.
STREAM_VIEWS = {"": _("All"), "true": _("Streamed"), "false": _("Non-streamed")}
# Where a window's start is rounded down to, on the viewer's clock.
WINDOW_ALIGN = {
    "1h": timedelta(minutes=1),
    "24h": timedelta(hours=1),
    "7d": timedelta(days=1),
    "30d": timedelta(days=1),
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
        return {key: str(label) for key, label in OPERATIONS.items()}

    @property
    def windows(self) -> tuple[str, ...]:
        return tuple(WINDOWS)

    @property
    def stream_views(self) -> dict[str, str]:
        return {key: str(label) for key, label in STREAM_VIEWS.items()}

    @property
    def stream(self) -> str:
        return self.params.get("stream", "") if self.params.get("stream") in _STREAM else ""

    @property
    def zone(self) -> tzinfo:
        return timezone.get_current_timezone()

    @property
    def chart_frame(self) -> TimeFrame:
        """The frame the charts show: a window from the local boundary at or before its
        start (up to one WINDOW_ALIGN longer), a custom frame as it is."""
        if not self.window or self.frame.since is None:
            return self.frame
        since = local_floor(self.frame.since, WINDOW_ALIGN[self.window], self.zone)
        return TimeFrame(since=since, until=self.frame.until)

    @property
    def bucket(self) -> timedelta:
        """The charts' bucket: the window's (a window that starts on a local boundary is up
        to a bucket longer than the window), else the one that goes with the frame's length."""
        if self.window:
            return DEFAULT_BUCKETS[self.window]
        return default_bucket(self.frame, now=self.now)

    @property
    def bucket_zone(self) -> tzinfo | None:
        """The zone chart buckets follow: None for UTC, whose buckets the API's are."""
        return None if timezone.get_current_timezone_name() == "UTC" else self.zone

    @property
    def frame_query(self) -> str:
        return urlencode({k: v for k, v in self.params.items() if k in CARRIED_PARAMS})

    @property
    def frame_only_query(self) -> str:
        """The frame alone: the Calls page's "Clear" drops every filter, the stream one too."""
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


def local_floor(moment: datetime, step: timedelta, zone: tzinfo) -> datetime:
    """`moment` rounded down to a whole `step` on the clock of `zone` (a minute, an hour, or
    local midnight), in UTC."""
    floored = wall_floor(moment.astimezone(zone).replace(tzinfo=None), step)
    return floored.replace(tzinfo=zone).astimezone(UTC)


def _local_timestamp(value: str | None, zone: tzinfo) -> str | None:
    """The custom frame's form sends wall-clock times (datetime-local): those are the viewer's.
    A timestamp with an offset (a shared URL, an API-style Z) keeps its own."""
    if not value:
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value  # timeframe_parse reports it
    if moment.tzinfo is not None or value.strip().endswith(("Z", "z")):
        return value
    try:
        return moment.replace(tzinfo=zone).isoformat()
    except OverflowError:
        return value


def _wall_clock(moment: datetime | None, zone: tzinfo) -> str | None:
    """A moment as a datetime-local input shows it: the viewer's wall clock, to the minute."""
    return None if moment is None else moment.astimezone(zone).strftime("%Y-%m-%dT%H:%M")


def _frame(
    window: str | None, since: str | None, until: str | None, now: datetime, zone: tzinfo
) -> TimeFrame:
    return timeframe_parse(
        window=window,
        since=_local_timestamp(since, zone),
        until=_local_timestamp(until, zone),
        now=now,
    )


def dashboard_query(request: HttpRequest) -> DashboardQuery:
    """Parse the frame (default: the last 24 hours) and the filters. A bad frame is not an
    error page: the page shows the default frame with a note saying what was wrong."""
    now = timezone.now()
    zone = timezone.get_current_timezone()
    given = {k: request.GET.get(k, "").strip() for k in (*FRAME_PARAMS, *FILTER_PARAMS)}
    params = {k: v for k, v in given.items() if v}
    window, since, until = (params.get(k) for k in FRAME_PARAMS)
    if not (window or since or until):
        window = DEFAULT_WINDOW
    error = None
    try:
        frame = _frame(window, since, until, now, zone)
    except TimeFrameError as exc:
        error = exc.message
        window, since, until = DEFAULT_WINDOW, None, None
        frame = _frame(window, None, None, now, zone)
        params = {k: v for k, v in params.items() if k not in FRAME_PARAMS}
    if window:
        params = {k: v for k, v in params.items() if k not in ("since", "until")}
        since = until = None
    else:
        # The URL says which moment, not which wall clock: a link shared with a colleague in
        # another zone, or the page switched to UTC, shows the same frame. The form gets the
        # viewer's wall-clock times back.
        for name, moment in (("since", frame.since), ("until", frame.until)):
            if moment is not None:
                params[name] = moment.astimezone(zone).isoformat()
        since, until = _wall_clock(frame.since, zone), _wall_clock(frame.until, zone)
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
        window=window,
        since=since or "",
        until=until or "",
        filters=filters,
        params=params,
        error=error,
    )
