"""Time frames of the monitoring API: `window=1h|24h|7d|30d`, or `since`/`until` (ISO 8601).

Everything is UTC. A naive timestamp is read as UTC; an offset is converted. Invalid input
raises TimeFrameError, whose message says what is accepted (the API answers 422 with it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

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
MAX_BUCKETS = 2000
WINDOW_CHOICES = "|".join(WINDOWS)
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([mhd])\s*$")
_UNITS = {"m": 60, "h": 3600, "d": 86400}
DAY = 86400


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
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


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


def parse_bucket(value: str) -> timedelta:
    """`bucket=`: N minutes, hours or days (`5m`, `6h`, `1d`). A bucket must divide a day or
    be whole days, so that buckets line up with UTC midnight."""
    match = _DURATION_RE.match(value or "")
    seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if seconds <= 0 or (DAY % seconds and seconds % DAY):
        raise TimeFrameError(
            "bucket",
            f"bucket: {value!r} is not accepted; use minutes, hours or days such as 1m, 5m, "
            "15m, 1h, 6h or 1d (dividing a day, or whole days).",
        )
    return timedelta(seconds=seconds)


def parse_duration(value: str, *, param: str) -> timedelta:
    """`90d`, `12h`, `30m`: used by retention (`--older-than`)."""
    match = _DURATION_RE.match(value or "")
    if not match:
        raise TimeFrameError(param, f"{param}: {value!r} is not a duration like 90d, 12h or 30m.")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def default_bucket(frame: TimeFrame, *, now: datetime) -> timedelta:
    """The bucket that goes with the frame's length (see DEFAULT_BUCKETS)."""
    since = frame.since or now - WINDOWS["24h"]
    length = (frame.until or now) - since
    for name, span in WINDOWS.items():
        if length <= span + timedelta(minutes=1):
            return DEFAULT_BUCKETS[name]
    return timedelta(days=1)


def floor_time(moment: datetime, seconds: int) -> datetime:
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, UTC)


def ceil_time(moment: datetime, seconds: int) -> datetime:
    floored = floor_time(moment, seconds)
    return floored if floored == moment else floored + timedelta(seconds=seconds)
