"""Time frames of the monitoring API: `window=1h|24h|7d|30d`, or `since`/`until` (ISO 8601).

Everything is UTC. A naive timestamp is read as UTC; an offset is converted. Invalid input
raises TimeFrameError, whose message says what is accepted (the API answers 422 with it).

Timestamps are bounded (EARLIEST..LATEST) and so are buckets (MAX_BUCKET), far enough inside
what `datetime` can hold that no rounding or bucket arithmetic on them can overflow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

WINDOWS: dict[str, timedelta] = {
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
# The timeseries bucket that goes with each window (about 60-120 points per chart).
DEFAULT_BUCKETS: dict[str, timedelta] = {
    "1h": timedelta(minutes=1),
    "24h": timedelta(minutes=15),
    "7d": timedelta(hours=1),
    "30d": timedelta(hours=6),
}
# Past 30 days the default bucket is the first of these that keeps the count under MAX_BUCKETS.
LONG_BUCKETS: tuple[timedelta, ...] = tuple(timedelta(days=d) for d in (1, 7, 30, 365, 3650))
MAX_BUCKETS = 2000
MAX_BUCKET = LONG_BUCKETS[-1]
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
WINDOW_CHOICES = "|".join(WINDOWS)
HOUR = 3600
DAY = 86400
# Buckets and durations: `5m`, `6h`, `90d`, nothing around them (usage.schemas declares the same
# pattern). At most 9 digits: longer numbers are out of range anyway, and int() refuses very
# long ones.
DURATION_PATTERN = r"^[0-9]{1,9}[mhd]$"
_DURATION_RE = re.compile(DURATION_PATTERN)
_UNITS = {"m": 60, "h": HOUR, "d": DAY}
_RANGE = f"between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC)"


class TimeFrameError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True, slots=True)
class TimeFrame:
    """[since, until); None on either side means unbounded (all time, or up to now)."""

    since: datetime | None = None
    until: datetime | None = None


def parse_timestamp(value: str, *, param: str) -> datetime:
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise TimeFrameError(
            param,
            f"{param}: {value!r} is not an ISO 8601 timestamp; use e.g. 2025-01-31T12:00:00Z "
            "or 2025-01-31.",
        ) from None
    try:
        # Converting 0001-01-01T00:00+14:00 or 9999-12-31T23:59-14:00 leaves datetime's range.
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        raise _out_of_range(value, param=param) from None
    if not EARLIEST <= moment <= LATEST:
        raise _out_of_range(value, param=param)
    return moment


def _out_of_range(value: str, *, param: str) -> TimeFrameError:
    return TimeFrameError(param, f"{param}: {value!r} is out of range; use a time {_RANGE}.")


def timeframe_parse(
    *,
    window: str | None,
    since: str | None,
    until: str | None,
    now: datetime,
    default_window: str | None = None,
) -> TimeFrame:
    """The frame asked for. Omitted entirely: `default_window`, or all time when None."""
    if window and (since or until):
        raise TimeFrameError("window", "Give either window or since/until, not both.")
    if window:
        span = WINDOWS.get(window.strip())
        if span is None:
            raise TimeFrameError(
                "window", f"window: {window!r} is not accepted; use one of {WINDOW_CHOICES}."
            )
        return TimeFrame(since=now - span, until=None)
    start = parse_timestamp(since, param="since") if since else None
    end = parse_timestamp(until, param="until") if until else None
    if start and end and start > end:
        raise TimeFrameError("since", "since must not be after until.")
    if start is None and end is None and default_window:
        return TimeFrame(since=now - WINDOWS[default_window], until=None)
    return TimeFrame(since=start, until=end)


def _seconds(value: str) -> int | None:
    """The seconds of a `5m`/`6h`/`90d` written as DURATION_PATTERN says; None if it is not."""
    if not _DURATION_RE.fullmatch(value or ""):
        return None
    return int(value[:-1]) * _UNITS[value[-1]]


def parse_bucket(value: str) -> timedelta:
    """`bucket=`: N minutes, hours or days (`5m`, `6h`, `1d`). A bucket must divide a day or
    be whole days, so that buckets line up with UTC midnight."""
    seconds = _seconds(value) or 0
    too_big = seconds > MAX_BUCKET.total_seconds()
    if seconds <= 0 or too_big or (DAY % seconds and seconds % DAY):
        raise TimeFrameError(
            "bucket",
            f"bucket: {value!r} is not accepted; use minutes, hours or days such as 1m, 5m, "
            f"15m, 1h, 6h or 1d (dividing a day, or whole days up to {MAX_BUCKET.days}d).",
        )
    return timedelta(seconds=seconds)


def parse_duration(value: str, *, param: str, now: datetime) -> timedelta:
    """`90d`, `12h`, `30m`: used by retention (`--older-than`). `now` is the moment the cutoff
    (now - duration) is taken from: it must stay a valid time, inside the range timestamps
    have."""
    seconds = _seconds(value)
    if seconds is None or seconds > (now - EARLIEST).total_seconds():
        raise TimeFrameError(
            param,
            f"{param}: {value!r} is not a duration like 90d, 12h or 30m (reaching back no "
            "further than 1970).",
        )
    return timedelta(seconds=seconds)


def bucket_span(frame: TimeFrame, bucket: timedelta, *, now: datetime) -> tuple[datetime, int]:
    """The first bucket's start and the number of buckets that cover the frame (a frame
    without `since` shows the 24 hours before its end). Buckets are aligned to UTC."""
    size = int(bucket.total_seconds())
    until = frame.until or now
    since = frame.since or until - WINDOWS["24h"]
    first = floor_time(since, size)
    end = ceil_time(until, size) if until > first else first + bucket
    return first, int((end - first).total_seconds()) // size


def wall_floor(local: datetime, step: timedelta) -> datetime:
    """A wall-clock time (naive) rounded down to a whole `step` counted from its midnight; a
    step of a day or more rounds down to the midnight."""
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight if step >= timedelta(days=1) else midnight + (local - midnight) // step * step


def bucket_bounds(
    frame: TimeFrame, bucket: timedelta, *, now: datetime, zone: tzinfo | None = None
) -> list[datetime]:
    """The buckets that cover the frame, as their starts followed by the last one's end (UTC).

    In UTC (zone None) they are bucket_span's: all one size, aligned to the epoch. In a time
    zone they start on that zone's clock: a day bucket at local midnight, an hour bucket on
    the local hour, a 15-minute bucket at :00, :15, :30 and :45 local. A bucket that a change
    of clock (daylight saving time) shortens or lengthens keeps its wall-clock bounds: a local
    day may last 23 or 25 hours."""
    first, count = bucket_span(frame, bucket, now=now)
    if count > MAX_BUCKETS:  # checked before a list that long is built (local: ±1 bucket)
        raise TimeFrameError(
            "bucket",
            f"bucket: {count} buckets is too many for this frame (at most {MAX_BUCKETS}); "
            "choose a larger bucket or a shorter frame.",
        )
    if zone is None:
        return [first + i * bucket for i in range(count + 1)]
    size = int(bucket.total_seconds())
    until = frame.until or now
    since = frame.since or until - WINDOWS["24h"]
    local = since.astimezone(zone).replace(tzinfo=None)
    if size % DAY == 0:
        days = size // DAY
        # Whole-day buckets are counted from the epoch's date, as in UTC (a 7-day bucket
        # starts on a Thursday, as 1970-01-01 did).
        wall = datetime(1970, 1, 1) + (local - datetime(1970, 1, 1)) // bucket * bucket
        step = timedelta(days=days)
    else:
        wall, step = wall_floor(local, bucket), bucket
    bounds: list[datetime] = []
    while True:
        # fold=0: a wall time that a clock change skips or repeats maps to its first reading,
        # so bounds never go backwards (a repeated one is dropped below).
        moment = wall.replace(tzinfo=zone).astimezone(UTC)
        if not bounds or moment > bounds[-1]:
            bounds.append(moment)
        if moment >= until and len(bounds) > 1:
            return bounds
        wall += step


def default_bucket(frame: TimeFrame, *, now: datetime) -> timedelta:
    """The bucket that goes with the frame's length (see DEFAULT_BUCKETS); past 30 days, the
    first of LONG_BUCKETS that keeps the count within MAX_BUCKETS, so that a frame years
    long asked for without `bucket=` is still answered."""
    since = frame.since or now - WINDOWS["24h"]
    length = (frame.until or now) - since
    for name, span in WINDOWS.items():
        if length <= span + timedelta(minutes=1):
            return DEFAULT_BUCKETS[name]
    for bucket in LONG_BUCKETS:
        if bucket_span(frame, bucket, now=now)[1] <= MAX_BUCKETS:
            return bucket
    return MAX_BUCKET  # unreachable within EARLIEST..LATEST; the count check reports it


def floor_time(moment: datetime, seconds: int) -> datetime:
    # Exact integer arithmetic on timedelta: no float rounding, and no OS limits on times
    # before 1970 (fromtimestamp() refuses negative values on some platforms). EARLIEST is the
    # Unix epoch, so whole-day buckets start at UTC midnight.
    step = timedelta(seconds=seconds)
    return EARLIEST + (moment - EARLIEST) // step * step


def ceil_time(moment: datetime, seconds: int) -> datetime:
    floored = floor_time(moment, seconds)
    return floored if floored == moment else floored + timedelta(seconds=seconds)
