"""Sessions and tools over a frame, from their rollups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.timeframes import TimeFrame
from tests.usage.monitoring import call, write_calls
from usage.conversation_selectors import sessions_by_client, sessions_stats, tool_calls_by_name
from usage.filters import UsageFilters
from usage.sketches import sketch_position

pytestmark = pytest.mark.django_db
T = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def test_sessions_count_once_and_each_of_their_requests_is_a_turn() -> None:
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
    assert (stats.unique_sessions, stats.total_turns, stats.requests) == (2, 3, 3)
    assert stats.tokens_per_session == pytest.approx(stats.total_tokens / 2)
    by_client = sessions_by_client(frame=TimeFrame(), filters=UsageFilters())
    assert {c: s.unique_sessions for c, s in by_client.items()} == {"client-a": 1, "other": 1}
    # A frame from 11:00 on sees s1's later hour only.
    later = sessions_stats(frame=TimeFrame(since=T + timedelta(hours=1)), filters=UsageFilters())
    assert (later.unique_sessions, later.total_turns) == (1, 1)


def test_a_frame_over_days_reads_whole_days_and_hours_at_its_edges() -> None:
    # Day 1 at 22:00 and 23:00, all of day 2 (one session per hour), day 3 at 00:00 and 05:00.
    day1 = datetime(2026, 3, 1, tzinfo=UTC)
    moments = [day1 + timedelta(hours=h) for h in (22, 23, *range(24, 48), 48, 53)]
    write_calls([call(started_at=m, session_id=f"s{i}", final=True) for i, m in enumerate(moments)])

    def count(since: datetime, until: datetime) -> int:
        frame = TimeFrame(since=since, until=until)
        return sessions_stats(frame=frame, filters=UsageFilters()).unique_sessions

    assert count(day1, day1 + timedelta(days=3)) == 28
    # 23:30 on day 1 (its hour counts) to 03:00 on day 3 (the 00:00 hour counts, 05:00 not).
    assert count(day1 + timedelta(hours=23, minutes=30), day1 + timedelta(hours=51)) == 26
    # Inside one day: hours only.
    assert count(day1 + timedelta(hours=24 + 6), day1 + timedelta(hours=24 + 9)) == 3
    # Open ends: everything before, everything after.
    assert (
        sessions_stats(
            frame=TimeFrame(until=day1 + timedelta(hours=24)), filters=UsageFilters()
        ).unique_sessions
        == 2
    )
    assert (
        sessions_stats(
            frame=TimeFrame(since=day1 + timedelta(hours=47)), filters=UsageFilters()
        ).unique_sessions
        == 3
    )


def test_thousands_of_sessions_are_counted_within_a_few_percent() -> None:
    write_calls(
        [
            call(started_at=T + timedelta(minutes=i % 600), session_id=f"user-{i}", final=True)
            for i in range(3000)
        ]
    )
    # The same session again later does not count twice.
    write_calls([call(started_at=T + timedelta(days=2), session_id="user-7", final=True)])
    stats = sessions_stats(frame=TimeFrame(), filters=UsageFilters())
    assert stats.unique_sessions == pytest.approx(3000, rel=0.05)
    assert stats.requests == 3001


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


# Session ids whose hashes fall in distinct registers, so that any set of them is counted
# exactly (with ids that share one, linear counting is off by one, within its stated error).
POOL = [f"sess-{i}" for i in range(12)]
assert len({sketch_position(s)[0] for s in POOL}) == len(POOL)
HOURS = 72


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    specs=st.lists(
        st.tuples(
            st.integers(0, HOURS * 60 - 1),  # minute of the call
            st.sampled_from(["", *POOL]),
            st.booleans(),  # final
            st.sampled_from(["client-a", "other"]),
            st.integers(0, 500),  # tokens
        ),
        max_size=30,
    ),
    since=st.none() | st.integers(0, HOURS),
    until=st.none() | st.integers(0, HOURS),
)
def test_session_figures_equal_the_raw_records_over_any_hours(
    specs: list[tuple[int, str, bool, str, int]], since: int | None, until: int | None
) -> None:
    from usage.models import CallRecord, SessionRollup

    CallRecord.objects.all().delete()
    SessionRollup.objects.all().delete()
    day = datetime(2026, 3, 1, tzinfo=UTC)
    write_calls(
        [
            call(started_at=day + timedelta(minutes=m), session_id=s, final=f, client=c,
                 prompt_tokens=n)
            for m, s, f, c, n in specs
        ]
    )  # fmt: skip
    frame = TimeFrame(
        since=None if since is None else day + timedelta(hours=since),
        until=None if until is None else day + timedelta(hours=until),
    )
    raw = [
        (s, f, c, n)
        for m, s, f, c, n in specs
        if s and (since is None or m >= since * 60) and (until is None or m < until * 60)
    ]
    stats = sessions_stats(frame=frame, filters=UsageFilters())
    assert stats.unique_sessions == len({s for s, *_ in raw})
    assert stats.requests == stats.total_turns == sum(1 for _, f, _, _ in raw if f)
    by_client = sessions_by_client(frame=frame, filters=UsageFilters())
    for client in ("client-a", "other"):
        mine = {s for s, _, c, _ in raw if c == client}
        assert (by_client[client].unique_sessions if client in by_client else 0) == len(mine)
