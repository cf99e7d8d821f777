"""Reads over the session and tool rollups (usage.models.SessionRollup, ToolRollup).

Their finest buckets are hours, so a frame's edges are taken to the hour that holds them: a
session active at 10:50 counts in a frame starting at 10:59. Sessions are counted from
sketches (usage.sketches), whose rows merge whatever their number of sessions. The filters
that these tables carry apply (`provider`, `model`, `client`); the others cannot, and are
ignored here (`UsageFilters.conversation_unsupported` names them): the API gives null for
these figures when one of them is set, rather than figures that ignore it.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import reduce
from typing import TypeVar

from django.db.models import Q, QuerySet, Sum

from common.timeframes import TimeFrame
from usage.filters import UsageFilters
from usage.models import SessionRollup, ToolRollup
from usage.sketches import sketch_count, sketch_merge

R = TypeVar("R", SessionRollup, ToolRollup)


@dataclass(frozen=True, slots=True)
class SessionStats:
    # Distinct session ids, estimated from the sketches (usage.sketches: ±3 %, small exact).
    unique_sessions: int = 0
    # Requests that carried a session id.
    requests: int = 0
    total_tokens: int = 0

    @property
    def total_turns(self) -> int:
        """Each request that carried a session id is one of its turns."""
        return self.requests

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


def _sessions_q(frame: TimeFrame) -> Q:
    """The session rollup rows that cover the frame: days for the whole days within it,
    hours for its edges (each edge taken to the hour that holds it)."""
    # Days are UTC days: a frame given with another offset is moved to UTC first.
    since = _hour(frame.since.astimezone(UTC)) if frame.since is not None else None
    until = frame.until.astimezone(UTC) if frame.until is not None else None
    hours = Q(bucket_seconds=3600)
    first_day = None
    if since is not None:
        first_day = since if since.hour == 0 else since.replace(hour=0) + timedelta(days=1)
    last_day = _hour(until).replace(hour=0) if until is not None else None
    if first_day is not None and last_day is not None and first_day >= last_day:
        return hours & Q(bucket_start__gte=since, bucket_start__lt=until)
    days = Q(bucket_seconds=86400)
    edges: list[Q] = []
    if first_day is not None:
        days &= Q(bucket_start__gte=first_day)
        edges.append(Q(bucket_start__gte=since, bucket_start__lt=first_day))
    if last_day is not None:
        days &= Q(bucket_start__lt=last_day)
        edges.append(Q(bucket_start__gte=last_day, bucket_start__lt=until))
    return reduce(operator.or_, [days, *(hours & edge for edge in edges)])


def _session_rows(frame: TimeFrame, filters: UsageFilters) -> QuerySet[SessionRollup]:
    return SessionRollup.objects.filter(_sessions_q(frame)).filter(filters.conversation_q())


def _fold(rows: Iterable[tuple[int, int, bytes | memoryview]]) -> SessionStats:
    """Rows of (requests, total_tokens, sketch) added into one figure."""
    requests = tokens = 0
    sketches = []
    for row_requests, row_tokens, sketch in rows:
        requests += row_requests
        tokens += row_tokens
        sketches.append(bytes(sketch))
    unique = sketch_count(sketch_merge(sketches))
    return SessionStats(unique_sessions=unique, requests=requests, total_tokens=tokens)


def sessions_stats(*, frame: TimeFrame, filters: UsageFilters) -> SessionStats:
    rows = _session_rows(frame, filters).values_list("requests", "total_tokens", "sketch")
    return _fold(rows.iterator(chunk_size=2000))


def replaced_sessions(*, frame: TimeFrame, experiment: str) -> int:
    """Distinct sessions a replacement rule replaced in the frame (their rows carry it)."""
    rows = SessionRollup.objects.filter(_sessions_q(frame), experiment=experiment)
    return _fold(rows.values_list("requests", "total_tokens", "sketch").iterator()).unique_sessions


def sessions_by_client(*, frame: TimeFrame, filters: UsageFilters) -> dict[str, SessionStats]:
    """client → its sessions, turns, requests and tokens in the frame."""
    rows = _session_rows(frame, filters).values_list("client", "requests", "total_tokens", "sketch")
    by_client: dict[str, list[tuple[int, int, bytes | memoryview]]] = defaultdict(list)
    for client, requests, tokens, sketch in rows.iterator(chunk_size=2000):
        by_client[client].append((requests, tokens, sketch))
    return {client: _fold(figures) for client, figures in by_client.items()}


def tool_calls_by_name(*, frame: TimeFrame, filters: UsageFilters) -> list[tuple[str, int]]:
    """(tool name, calls naming it), most called first."""
    rows = (
        _in_frame(ToolRollup.objects.all(), frame, filters)
        .values("tool_name")
        .annotate(calls=Sum("calls"))
        .order_by("-calls", "tool_name")
    )
    return [(row["tool_name"], row["calls"]) for row in rows]
