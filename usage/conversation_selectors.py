"""Reads over the session and tool rollups (usage.models.SessionRollup, ToolRollup).

Their buckets are hours, so a frame's edges are taken to the hour that holds them: a session
active at 10:50 counts in a frame starting at 10:59. The filters that these tables carry apply
(`provider`, `model`, `client`); the others (`key`, `stream`, `status`) cannot, and are ignored
here: the API documents it beside each figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

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
    for column, value in (
        ("provider", filters.provider),
        ("requested_model", filters.model),
        ("client", filters.client),
    ):
        if value is not None:
            qs = qs.filter(**{column: value})
    return qs


def sessions_stats(*, frame: TimeFrame, filters: UsageFilters) -> SessionStats:
    per_session = (
        _in_frame(SessionRollup.objects.all(), frame, filters)
        .values("session_id")
        .annotate(turns=Max("max_turn"), tokens=Sum("total_tokens"), requests=Sum("requests"))
    )
    totals = {"sessions": 0, "turns": 0, "tokens": 0, "requests": 0}
    for row in per_session.iterator():
        totals["sessions"] += 1
        totals["turns"] += row["turns"] or 0
        totals["tokens"] += row["tokens"] or 0
        totals["requests"] += row["requests"] or 0
    return SessionStats(
        unique_sessions=totals["sessions"],
        total_turns=totals["turns"],
        requests=totals["requests"],
        total_tokens=totals["tokens"],
    )


def sessions_by_client(*, frame: TimeFrame, filters: UsageFilters) -> dict[str, int]:
    """client → distinct sessions in the frame."""
    rows = (
        _in_frame(SessionRollup.objects.all(), frame, filters)
        .values("client")
        .annotate(sessions=Count("session_id", distinct=True))
    )
    return {row["client"]: row["sessions"] for row in rows}


def tool_calls_by_name(*, frame: TimeFrame, filters: UsageFilters) -> list[tuple[str, int]]:
    """(tool name, calls naming it), most called first."""
    rows = (
        _in_frame(ToolRollup.objects.all(), frame, filters)
        .values("tool_name")
        .annotate(calls=Sum("calls"))
        .order_by("-calls", "tool_name")
    )
    return [(row["tool_name"], row["calls"]) for row in rows]
