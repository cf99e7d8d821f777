"""`manage.py seed_usage`: realistic records through the production write path."""

from __future__ import annotations

import io
from collections import Counter
from datetime import UTC, datetime

import pytest
from django.core.management import call_command
from django.db.models import Sum

from usage.models import CallRecord, DayRollup, HourRollup, MinuteRollup, Outcome
from usage.seeding import TrafficGenerator, diurnal_weight

pytestmark = pytest.mark.django_db
END = datetime(2025, 6, 2, tzinfo=UTC)


def test_it_writes_exactly_n_records_and_their_rollups() -> None:
    out = io.StringIO()
    call_command(
        "seed_usage", "--records=3000", "--days=2", f"--end={END.isoformat()}",
        "--batch-size=700", stdout=out, stderr=io.StringIO(),
    )  # fmt: skip
    assert "seeded 3,000 call records" in out.getvalue()
    assert CallRecord.objects.count() == 3000
    for model in (MinuteRollup, HourRollup, DayRollup):
        assert model.objects.aggregate(n=Sum("calls"))["n"] == 3000
    tokens = CallRecord.objects.aggregate(n=Sum("total_tokens"))["n"]
    assert DayRollup.objects.aggregate(n=Sum("total_tokens"))["n"] == tokens


def test_the_traffic_is_varied_and_fails_over() -> None:
    start = datetime(2025, 6, 1, tzinfo=UTC)
    calls = list(TrafficGenerator(records=20_000, start=start, end=END, seed=3))
    assert len(calls) == 20_000
    # Four providers, and "" for the requests answered without an attempt.
    assert len({c.provider for c in calls} - {""}) == 4
    assert all(c.attempt == 0 for c in calls if not c.provider)
    assert len({c.client for c in calls}) == 6
    assert len({c.key_id for c in calls}) >= 10
    outcomes = Counter(c.outcome for c in calls)
    assert set(outcomes) == {o.value for o in Outcome}
    assert any(c.attempt > 1 and c.provider == "azure-eu" for c in calls)  # a fallback step
    streams = [c for c in calls if c.stream and c.outcome == Outcome.SUCCESS]
    assert streams and all(c.ttft_ms for c in streams)
    assert any(c.usage_source == "estimated" for c in calls)
    # Diurnal: the afternoon peak sees clearly more calls than the small hours.
    by_hour = Counter(c.started_at.hour for c in calls)
    assert by_hour[14] > 2 * by_hour[2]
    assert diurnal_weight(datetime(2025, 6, 2, 14, tzinfo=UTC)) > diurnal_weight(
        datetime(2025, 6, 2, 2, tzinfo=UTC)
    )


def test_shards_split_the_same_traffic() -> None:
    start = datetime(2025, 6, 1, tzinfo=UTC)
    parts = [
        list(TrafficGenerator(records=5000, start=start, end=END, shard=(i, 3))) for i in range(3)
    ]
    assert sum(len(p) for p in parts) == 5000
    assert max(c.started_at for c in parts[0]) < min(c.started_at for c in parts[1])
