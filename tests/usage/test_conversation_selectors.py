"""Sessions and tools over a frame, from their hourly rollups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from common.timeframes import TimeFrame
from tests.usage.monitoring import call, write_calls
from usage.conversation_selectors import sessions_by_client, sessions_stats, tool_calls_by_name
from usage.filters import UsageFilters

pytestmark = pytest.mark.django_db
T = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def test_sessions_count_once_with_their_highest_turn_and_their_tokens() -> None:
    write_calls(
        [
            call(started_at=T, session_id="s1", turn=1, final=True, prompt_tokens=10),
            call(started_at=T + timedelta(hours=2), session_id="s1", turn=3, final=True,
                 prompt_tokens=10),
            call(started_at=T, session_id="s2", turn=1, final=True, client="other",
                 prompt_tokens=5),
            call(started_at=T, session_id="", final=True, prompt_tokens=99),
        ]
    )  # fmt: skip
    stats = sessions_stats(frame=TimeFrame(), filters=UsageFilters())
    assert (stats.unique_sessions, stats.total_turns, stats.requests) == (2, 4, 3)
    assert stats.tokens_per_session == pytest.approx(stats.total_tokens / 2)
    by_client = sessions_by_client(frame=TimeFrame(), filters=UsageFilters())
    assert {c: s.unique_sessions for c, s in by_client.items()} == {"client-a": 1, "other": 1}
    # A frame from 11:00 on sees s1's later hour only.
    later = sessions_stats(frame=TimeFrame(since=T + timedelta(hours=1)), filters=UsageFilters())
    assert (later.unique_sessions, later.total_turns) == (1, 3)


def test_tools_are_counted_per_name_most_called_first() -> None:
    write_calls(
        [
            call(started_at=T, tool_calls=2, tool_names=["search", "fetch"]),
            call(started_at=T, tool_calls=1, tool_names=["search"]),
        ]
    )
    assert tool_calls_by_name(frame=TimeFrame(), filters=UsageFilters()) == [
        ("search", 2),
        ("fetch", 1),
    ]
