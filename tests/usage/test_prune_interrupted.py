"""A prune that dies midway (a crash, a killed worker) leaves the minute rollups in whole
hours: reads take every hour from the oldest minute row on as complete, so a partial hour
would undercount every frame with an edge in it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import QuerySet

from common.timeframes import TimeFrame
from tests.usage.monitoring import call, write_calls
from usage.filters import UsageFilters
from usage.models import MinuteRollup
from usage.selectors import usage_stats
from usage.services import usage_prune

pytestmark = pytest.mark.django_db

NOW = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
TEN = datetime(2025, 3, 3, 10, tzinfo=UTC)  # the cutoff (90 days) is 12:30 that day
MINUTES = (10, 50, 70, 110, 130)  # 10:10, 10:50, 11:10, 11:50 pruned; 12:10 kept


class Died(Exception):
    pass


def calls(since: datetime) -> int:
    return usage_stats(frame=TimeFrame(since=since), filters=UsageFilters(), now=NOW).calls


@pytest.mark.parametrize("dies_at", [2, 3, 4])
def test_a_prune_that_dies_midway_never_undercounts(
    monkeypatch: pytest.MonkeyPatch, dies_at: int
) -> None:
    write_calls([call(started_at=TEN + timedelta(minutes=m)) for m in MINUTES])
    real_delete = QuerySet.delete
    deletes = 0

    def delete(self: QuerySet[object]) -> tuple[int, dict[str, int]]:
        nonlocal deletes
        if self.model is MinuteRollup:
            deletes += 1
            if deletes == dies_at:
                raise Died
        return real_delete(self)

    monkeypatch.setattr(QuerySet, "delete", delete)
    with pytest.raises(Died):
        usage_prune(older_than=timedelta(days=90), now=NOW, batch_size=1)  # one row per delete
    # Edges inside each pruned hour: at minute or at hour resolution, all calls after them.
    assert calls(TEN + timedelta(minutes=5)) == 5
    assert calls(TEN + timedelta(minutes=65)) == 3

    monkeypatch.undo()
    usage_prune(older_than=timedelta(days=90), now=NOW, batch_size=1)
    assert MinuteRollup.objects.count() == 1
    assert (calls(TEN + timedelta(minutes=5)), calls(TEN + timedelta(minutes=65))) == (5, 3)
