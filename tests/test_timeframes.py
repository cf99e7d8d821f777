"""Time frames: windows, since/until, buckets and their error messages."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from common.timeframes import (
    MAX_BUCKETS,
    TimeFrame,
    TimeFrameError,
    bucket_bounds,
    bucket_span,
    ceil_time,
    default_bucket,
    floor_time,
    parse_bucket,
    parse_duration,
    timeframe_parse,
)

NOW = datetime(2025, 3, 30, 1, 30, tzinfo=UTC)  # the night Europe moves its clocks: UTC does not


def parse(**kwargs: str | None) -> TimeFrame:
    values: dict[str, str | None] = {"window": None, "since": None, "until": None}
    values.update(kwargs)
    return timeframe_parse(now=NOW, **values)  # type: ignore[arg-type]


def test_nothing_means_all_time() -> None:
    assert parse() == TimeFrame(since=None, until=None)


def test_a_default_window_applies_when_nothing_is_given() -> None:
    frame = timeframe_parse(window=None, since=None, until=None, now=NOW, default_window="24h")
    assert frame == TimeFrame(since=NOW - timedelta(hours=24), until=None)


@pytest.mark.parametrize(
    ("window", "span"),
    [("1h", timedelta(hours=1)), ("24h", timedelta(days=1)), ("7d", timedelta(days=7)),
     ("30d", timedelta(days=30))],
)  # fmt: skip
def test_windows_end_now(window: str, span: timedelta) -> None:
    assert parse(window=window) == TimeFrame(since=NOW - span, until=None)


def test_an_unknown_window_says_what_is_accepted() -> None:
    with pytest.raises(TimeFrameError, match=r"1h\|24h\|7d\|30d"):
        parse(window="2w")


def test_window_and_since_together_are_refused() -> None:
    with pytest.raises(TimeFrameError, match="not both"):
        parse(window="1h", since="2025-01-01")


def test_timestamps_accept_z_offsets_and_naive_utc() -> None:
    frame = parse(since="2025-01-01T10:00:00Z", until="2025-01-01T12:00:00+02:00")
    assert frame.since == datetime(2025, 1, 1, 10, tzinfo=UTC)
    assert frame.until == datetime(2025, 1, 1, 10, tzinfo=UTC)
    assert parse(since="2025-01-01").since == datetime(2025, 1, 1, tzinfo=UTC)


def test_a_bad_timestamp_says_iso_8601() -> None:
    with pytest.raises(TimeFrameError, match="ISO 8601") as info:
        parse(since="yesterday")
    assert info.value.param == "since"


def test_since_after_until_is_refused() -> None:
    with pytest.raises(TimeFrameError, match="since must not be after until"):
        parse(since="2025-01-02", until="2025-01-01")


def test_since_equal_to_until_is_an_empty_frame() -> None:
    frame = parse(since="2025-01-01", until="2025-01-01")
    assert frame.since == frame.until


@pytest.mark.parametrize(
    ("text", "seconds"), [("1m", 60), ("15m", 900), ("6h", 21600), ("1d", 86400), ("7d", 604800)]
)
def test_buckets_divide_a_day_or_are_whole_days(text: str, seconds: int) -> None:
    assert parse_bucket(text).total_seconds() == seconds


@pytest.mark.parametrize(
    "value",
    ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "1969-12-31T23:59Z", "9999-12-31"],
)
def test_timestamps_outside_1970_to_9000_are_refused_with_the_range(value: str) -> None:
    with pytest.raises(TimeFrameError, match="between 1970-01-01 and 9000-01-01") as info:
        parse(until=value)
    assert info.value.param == "until"


def test_the_ends_of_the_range_are_accepted() -> None:
    frame = parse(since="1970-01-01T00:00:00Z", until="9000-01-01T00:00:00Z")
    assert frame.since == datetime(1970, 1, 1, tzinfo=UTC)
    assert frame.until == datetime(9000, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("text", ["7m", "0m", "5s", "1w", "", "36h", "3651d", "1000000000d"])
def test_other_buckets_are_refused_with_examples(text: str) -> None:
    with pytest.raises(TimeFrameError, match="1m, 5m, 15m, 1h, 6h or 1d"):
        parse_bucket(text)


@pytest.mark.parametrize(
    ("window", "bucket"),
    [("1h", timedelta(minutes=1)), ("24h", timedelta(minutes=15)), ("7d", timedelta(hours=1)),
     ("30d", timedelta(hours=6))],
)  # fmt: skip
def test_the_default_bucket_follows_the_window(window: str, bucket: timedelta) -> None:
    assert default_bucket(parse(window=window), now=NOW) == bucket


def test_the_largest_bucket_is_ten_years() -> None:
    assert parse_bucket("3650d") == timedelta(days=3650)


@pytest.mark.parametrize(
    ("since", "until", "bucket"),
    [("2025-01-01", "2025-03-01", timedelta(days=1)),  # 59 days: 60 daily buckets
     ("2000-01-01", "2005-06-01", timedelta(days=1)),  # under 2,000 days
     ("2000-01-01", "2025-01-01", timedelta(days=7)),  # 9,132 days: weekly
     ("1970-01-01", "2100-01-01", timedelta(days=30)),
     ("1970-01-01", "3000-01-01", timedelta(days=365)),
     ("1970-01-01", "9000-01-01", timedelta(days=3650))],
)  # fmt: skip
def test_a_long_frame_gets_the_first_bucket_that_stays_within_the_cap(
    since: str, until: str, bucket: timedelta
) -> None:
    frame = parse(since=since, until=until)
    assert default_bucket(frame, now=NOW) == bucket
    assert bucket_span(frame, bucket, now=NOW)[1] <= MAX_BUCKETS


def test_bucket_arithmetic_is_exact_before_1970_and_at_the_end_of_the_range() -> None:
    before = datetime(1969, 12, 31, 23, 59, 30, 500, tzinfo=UTC)
    assert floor_time(before, 60) == datetime(1969, 12, 31, 23, 59, tzinfo=UTC)
    assert ceil_time(before, 60) == datetime(1970, 1, 1, tzinfo=UTC)
    end = datetime(9000, 1, 1, tzinfo=UTC)
    assert ceil_time(end - timedelta(seconds=1), 3650 * 86400) > end


def test_durations_for_retention() -> None:
    assert parse_duration("90d", param="x", now=NOW) == timedelta(days=90)
    with pytest.raises(TimeFrameError):
        parse_duration("ninety days", param="--older-than", now=NOW)
    # Far enough back that the cutoff would precede 1970 (or leave datetime's range).
    for too_long in ("1000000000d", "30000d"):
        with pytest.raises(TimeFrameError, match="1970"):
            parse_duration(too_long, param="--older-than", now=NOW)


def test_a_duration_is_bounded_by_the_now_its_cutoff_is_taken_from() -> None:
    # 1970-01-01 + 100 days: 100d reaches back exactly to 1970, 101d before it.
    now = datetime(1970, 4, 11, tzinfo=UTC)
    assert parse_duration("100d", param="--older-than", now=now) == timedelta(days=100)
    with pytest.raises(TimeFrameError, match="1970"):
        parse_duration("101d", param="--older-than", now=now)


@pytest.mark.parametrize("text", [" 90d", "90d ", "90 d", "90d\n", "0000000090d"])
def test_durations_are_read_as_strictly_as_buckets(text: str) -> None:
    with pytest.raises(TimeFrameError, match="90d"):
        parse_duration(text, param="--older-than", now=NOW)


# --- buckets on a viewer's clock (the dashboard) ----------------------------------------------

NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
KOLKATA = zoneinfo.ZoneInfo("Asia/Kolkata")


def test_utc_bounds_are_bucket_spans() -> None:
    now = datetime(2026, 3, 9, 12, 7, tzinfo=UTC)
    frame = TimeFrame(since=now - timedelta(days=7))
    for bucket in (timedelta(minutes=15), timedelta(hours=1), timedelta(days=1)):
        first, count = bucket_span(frame, bucket, now=now)
        bounds = bucket_bounds(frame, bucket, now=now)
        assert bounds == [first + i * bucket for i in range(count + 1)]


def test_local_days_start_at_local_midnight_and_follow_daylight_saving() -> None:
    # 2026-03-08: New York moves its clocks from 02:00 to 03:00; that day is 23 hours long.
    since = datetime(2026, 3, 6, 15, 0, tzinfo=UTC)
    now = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)
    bounds = bucket_bounds(TimeFrame(since=since), timedelta(days=1), now=now, zone=NEW_YORK)
    local = [b.astimezone(NEW_YORK) for b in bounds]
    assert all((t.hour, t.minute) == (0, 0) for t in local)
    assert [t.day for t in local] == [6, 7, 8, 9, 10, 11]
    lengths = [(b - a).total_seconds() / 3600 for a, b in pairwise(bounds)]
    assert lengths == [24, 24, 23, 24, 24]
    assert bounds[0] <= since and bounds[-1] >= now


def test_local_hours_skip_the_missing_hour_of_a_clock_change() -> None:
    since = datetime(2026, 3, 8, 5, 0, tzinfo=UTC)  # 00:00 in New York, before the change
    now = datetime(2026, 3, 8, 10, 0, tzinfo=UTC)
    bounds = bucket_bounds(TimeFrame(since=since), timedelta(hours=1), now=now, zone=NEW_YORK)
    assert [b.astimezone(NEW_YORK).hour for b in bounds] == [0, 1, 3, 4, 5, 6]
    assert all((b - a) == timedelta(hours=1) for a, b in pairwise(bounds))


def test_half_hour_zones_get_buckets_on_their_own_half_hours() -> None:
    since = datetime(2026, 5, 1, 10, 10, tzinfo=UTC)  # 15:40 in Kolkata
    now = datetime(2026, 5, 1, 14, 0, tzinfo=UTC)
    bounds = bucket_bounds(TimeFrame(since=since), timedelta(hours=1), now=now, zone=KOLKATA)
    assert bounds[0] == datetime(2026, 5, 1, 9, 30, tzinfo=UTC)  # 15:00 local
    assert all(b.astimezone(KOLKATA).minute == 0 for b in bounds)
