"""The grouping selectors put the dimension's name into SQL as a column: only a rollup
dimension gets there, whatever a caller passes."""

from __future__ import annotations

from typing import Any, cast

import pytest
from django.utils import timezone

from common.timeframes import TimeFrame
from usage.filters import UsageFilters
from usage.selectors import usage_stats_by, usage_totals_by

pytestmark = pytest.mark.django_db

NOT_A_COLUMN = cast(Any, "client FROM usage_minuterollup; --")


def test_stats_by_refuses_anything_but_a_rollup_dimension() -> None:
    with pytest.raises(AssertionError):
        usage_stats_by(
            group=NOT_A_COLUMN, frame=TimeFrame(), filters=UsageFilters(), now=timezone.now()
        )


def test_totals_by_refuses_anything_but_rollup_dimensions() -> None:
    with pytest.raises(AssertionError):
        usage_totals_by(
            group=("provider", NOT_A_COLUMN),
            frame=TimeFrame(),
            filters=UsageFilters(),
            now=timezone.now(),
        )


def test_a_rollup_read_refuses_a_filter_only_records_carry() -> None:
    # The API answers these with a 422 before; reaching a rollup with one is a bug.
    with pytest.raises(ValueError, match="session_id"):
        UsageFilters(session_id="s1").rollup_where()
