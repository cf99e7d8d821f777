"""`manage.py prune_usage` and the `usage_prune` service behind the scheduled task."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.utils import timezone

from common.timeframes import TimeFrame
from tests.usage.monitoring import call, write_calls
from usage.filters import UsageFilters
from usage.models import CallRecord, DayRollup, HourRollup, MinuteRollup
from usage.selectors import usage_stats, usage_timeseries
from usage.services import usage_prune
from usage.tasks import usage_prune as usage_prune_task

pytestmark = pytest.mark.django_db


@pytest.fixture
def history() -> None:
    now = timezone.now()
    write_calls([call(started_at=now - timedelta(days=d)) for d in (1, 50, 100, 200, 200)])


@pytest.mark.usefixtures("history")
def test_it_deletes_old_records_and_minute_rollups_but_keeps_hours_and_days() -> None:
    hours, days = HourRollup.objects.count(), DayRollup.objects.count()
    result = usage_prune(older_than=timedelta(days=90), batch_size=1)
    assert (result.records, result.minute_rollups) == (3, 2)
    assert CallRecord.objects.count() == 2
    assert MinuteRollup.objects.count() == 2
    assert (HourRollup.objects.count(), DayRollup.objects.count()) == (hours, days)


@pytest.mark.usefixtures("history")
def test_it_reports_progress_batch_by_batch() -> None:
    seen: list[int] = []
    usage_prune(older_than=timedelta(days=90), batch_size=2, progress=seen.append)
    # Records two at a time; minute rollups one whole hour at a time (one row in each here).
    assert seen == [2, 3, 4, 5]


@pytest.mark.usefixtures("history")
@override_settings(LLMROTATE_USAGE_RETENTION_DAYS=30)
def test_the_setting_is_the_default_and_the_task_applies_it() -> None:
    assert usage_prune_task() == 4 + 3
    assert CallRecord.objects.count() == 1


@pytest.mark.usefixtures("history")
@override_settings(LLMROTATE_USAGE_RETENTION_DAYS=0)
def test_zero_days_keeps_everything() -> None:
    assert usage_prune().cutoff is None
    out = io.StringIO()
    call_command("prune_usage", stdout=out)
    assert "keeping everything" in out.getvalue()
    assert CallRecord.objects.count() == 5


@pytest.mark.usefixtures("history")
def test_the_command_takes_older_than() -> None:
    out = io.StringIO()
    call_command("prune_usage", "--older-than", "150d", "--batch-size", "1", stdout=out)
    assert "deleted 2 call records and 1 minute rollups" in out.getvalue()
    assert CallRecord.objects.count() == 3


def test_the_command_refuses_a_bad_duration() -> None:
    with pytest.raises(CommandError, match="90d"):
        call_command("prune_usage", "--older-than", "soon")


# After a prune the minute rollups begin at 12:00 on CUTOFF's day; hour and day rows stay.
NOW = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
CUTOFF = NOW - timedelta(days=90)  # 2025-03-03 12:30
HOUR = CUTOFF.replace(minute=0)


@pytest.fixture
def pruned() -> None:
    write_calls([call(started_at=HOUR - timedelta(minutes=m)) for m in (50, 10)]  # 11:10, 11:50
                + [call(started_at=HOUR + timedelta(minutes=10))])  # fmt: skip
    usage_prune(older_than=timedelta(days=90), now=NOW)


@pytest.mark.usefixtures("pruned")
def test_minute_rollups_go_in_whole_hours() -> None:
    assert CallRecord.objects.count() == 0
    assert list(MinuteRollup.objects.values_list("bucket_start", flat=True)) == [
        HOUR + timedelta(minutes=10)
    ]


@pytest.mark.usefixtures("pruned")
def test_an_edge_before_the_minute_rollups_is_read_at_hour_resolution() -> None:
    def calls(since: datetime, until: datetime | None = None) -> int:
        frame = TimeFrame(since=since, until=until)
        return usage_stats(frame=frame, filters=UsageFilters(), now=NOW).calls

    # Not an undercount: the whole 11:00 hour counts, as documented.
    assert calls(HOUR - timedelta(minutes=30)) == 3
    assert calls(HOUR - timedelta(minutes=30), HOUR - timedelta(minutes=20)) == 2
    # From the hour the minute rows cover, minute resolution again.
    assert calls(HOUR + timedelta(minutes=5)) == 1
    assert calls(HOUR + timedelta(minutes=15)) == 0
    assert calls(HOUR - timedelta(days=1)) == 3


@pytest.mark.usefixtures("pruned")
def test_a_pruned_hour_shows_in_the_first_of_its_sub_hour_buckets() -> None:
    frame = TimeFrame(since=HOUR - timedelta(hours=1), until=HOUR + timedelta(hours=1))
    buckets = usage_timeseries(
        frame=frame, bucket=timedelta(minutes=15), filters=UsageFilters(), now=NOW
    )
    assert [(b.start.strftime("%H:%M"), b.totals.calls) for b in buckets if b.totals.calls] == [
        ("11:00", 2), ("12:00", 1)
    ]  # fmt: skip
