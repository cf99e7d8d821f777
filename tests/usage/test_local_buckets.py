"""Timeseries buckets on a viewer's clock (the dashboard's charts): rows of the UTC rollups
fold into local days and local hours, on SQLite and on Postgres alike."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

import pytest

from common.timeframes import TimeFrame
from tests.usage.monitoring import call, write_calls
from usage.selectors import UsageFilters, usage_timeseries

pytestmark = pytest.mark.django_db

NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
KOLKATA = zoneinfo.ZoneInfo("Asia/Kolkata")


def test_a_late_evening_call_counts_on_its_local_day() -> None:
    # 03:30 UTC on 2026-03-09 is 23:30 on the 8th in New York (EDT, the day clocks changed).
    write_calls([call(started_at=datetime(2026, 3, 9, 3, 30, tzinfo=UTC))])
    write_calls([call(started_at=datetime(2026, 3, 9, 4, 30, tzinfo=UTC))])  # 00:30 the 9th
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    frame = TimeFrame(since=datetime(2026, 3, 7, 5, 0, tzinfo=UTC))  # midnight, the 7th
    buckets = usage_timeseries(
        frame=frame, bucket=timedelta(days=1), filters=UsageFilters(), now=now, zone=NEW_YORK
    )
    by_day = {b.start.astimezone(NEW_YORK).day: b.totals.calls for b in buckets}
    assert by_day == {7: 0, 8: 1, 9: 1, 10: 0}
    # In UTC both fall on the 9th.
    utc = usage_timeseries(frame=frame, bucket=timedelta(days=1), filters=UsageFilters(), now=now)
    assert {b.start.day: b.totals.calls for b in utc if b.totals.calls} == {9: 2}


def test_half_hour_zones_get_exact_quarter_hours_and_approximate_hours() -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    base = now.replace(minute=0) - timedelta(hours=3)  # a whole UTC hour
    # Two calls in one UTC hour, on either side of its half hour: two Kolkata hours.
    write_calls([call(started_at=base + timedelta(minutes=10))])
    write_calls([call(started_at=base + timedelta(minutes=40))])

    def busy(bucket: timedelta) -> list[tuple[datetime, int]]:
        buckets = usage_timeseries(
            frame=TimeFrame(since=base - timedelta(hours=1)),
            bucket=bucket,
            filters=UsageFilters(),
            now=now,
            zone=KOLKATA,
        )
        return [(b.start, b.totals.calls) for b in buckets if b.totals.calls]

    # Quarter hours come from minute rows: exact.
    assert busy(timedelta(minutes=15)) == [(base, 1), (base + timedelta(minutes=30), 1)]
    # Hours come from hour rows (docs/dashboard.md): the UTC hour counts in the local hour
    # its start falls in, which began half an hour before it.
    assert busy(timedelta(hours=1)) == [(base - timedelta(minutes=30), 2)]


def test_utc_buckets_that_split_hours_are_exact() -> None:
    # The API's bucket=90m: 00:00-01:30 and 01:30-03:00, read from minute rows.
    day = datetime(2026, 5, 1, tzinfo=UTC)
    write_calls([call(started_at=day + timedelta(minutes=70))])
    write_calls([call(started_at=day + timedelta(minutes=100))])
    buckets = usage_timeseries(
        frame=TimeFrame(since=day, until=day + timedelta(hours=3)),
        bucket=timedelta(minutes=90),
        filters=UsageFilters(),
        now=day + timedelta(days=1),
    )
    assert [(b.start, b.totals.calls) for b in buckets] == [
        (day, 1),
        (day + timedelta(minutes=90), 1),
    ]
