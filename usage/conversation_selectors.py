"""Reads over the session and tool rollups (usage.models.SessionRollup, ToolRollup).

Their buckets are hours, so a frame's edges are taken to the hour that holds them: a session
active at 10:50 counts in a frame starting at 10:59. The filters that these tables carry apply
(`provider`, `model`, `client`); the others cannot, and are ignored here
(`UsageFilters.conversation_unsupported` names them): the API gives null for these figures
when one of them is set, rather than figures that ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from django.db import connections
from django.db.models import Count, Max, QuerySet, Sum

from common.timeframes import TimeFrame
from usage.filters import UsageFilters
from usage.models import SessionRollup, ToolRollup

R = TypeVar("R", SessionRollup, ToolRollup)


@dataclass(frozen=True, slots=True)
class SessionStats:
    unique_sessions: int = 0
    # A session's turns are the highest turn it reached; these are summed over sessions.
    total_turns: int = 0
    requests: int = 0
    total_tokens: int = 0

    @property
    def tokens_per_session(self) -> float | None:
        return self.total_tokens / self.unique_sessions if self.unique_sessions else None


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _in_frame(qs: QuerySet[R], frame: TimeFrame, filters: UsageFilters) -> QuerySet[R]:
    if frame.since is not None:
        qs = qs.filter(bucket_start__gte=_hour(frame.since))
    if frame.until is not None:
        qs = qs.filter(bucket_start__lt=frame.until)
    return qs.filter(filters.conversation_q())


def sessions_stats(*, frame: TimeFrame, filters: UsageFilters) -> SessionStats:
    per_session = (
        _in_frame(SessionRollup.objects.all(), frame, filters)
        .values("session_id")
        .annotate(turns=Max("max_turn"), tokens=Sum("total_tokens"), requests=Sum("requests"))
    )
    # One row back: the database sums over its per-session groups (a subquery), rather than
    # sending every session of a month here to be added up.
    totals = per_session.aggregate(
        sessions=Count("session_id"),
        total_turns=Sum("turns"),
        total_tokens=Sum("tokens"),
        total_requests=Sum("requests"),
    )
    return SessionStats(
        unique_sessions=totals["sessions"] or 0,
        total_turns=totals["total_turns"] or 0,
        requests=totals["total_requests"] or 0,
        total_tokens=totals["total_tokens"] or 0,
    )


def sessions_by_client(*, frame: TimeFrame, filters: UsageFilters) -> dict[str, SessionStats]:
    """client → its sessions, turns, requests and tokens in the frame, counted as
    `sessions_stats` counts them."""
    per_session = (
        _in_frame(SessionRollup.objects.all(), frame, filters)
        .values("client", "session_id")
        .annotate(turns=Max("max_turn"), tokens=Sum("total_tokens"), requests=Sum("requests"))
    )
    # Summed per client in the database over the per-session groups, so that a month of
    # sessions never travels here one row each (the dashboard's clients panel polls).
    # The inner statement is the ORM's, its values all parameters: no input enters the text.
    inner, params = per_session.query.sql_with_params()
    sql = (
        "SELECT client, COUNT(*), SUM(turns), SUM(requests), SUM(tokens) "  # noqa: S608
        f"FROM ({inner}) AS per_session GROUP BY client"
    )
    with connections[per_session.db].cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return {
        client: SessionStats(
            unique_sessions=int(sessions),
            total_turns=int(turns or 0),
            requests=int(requests or 0),
            total_tokens=int(tokens or 0),
        )
        for client, sessions, turns, requests, tokens in rows
    }


def tool_calls_by_name(*, frame: TimeFrame, filters: UsageFilters) -> list[tuple[str, int]]:
    """(tool name, calls naming it), most called first."""
    rows = (
        _in_frame(ToolRollup.objects.all(), frame, filters)
        .values("tool_name")
        .annotate(calls=Sum("calls"))
        .order_by("-calls", "tool_name")
    )
    return [(row["tool_name"], row["calls"]) for row in rows]
