"""The read plan over the rollup tables: which table answers which part of a frame, and the
aggregate queries that read it. usage.selectors builds its results from these rows.

A frame is answered from the coarsest rollups that fit it: whole UTC days from the day table,
the hours at either edge from the hour table, the minutes beyond from the minute table. A frame
that runs up to now (a `window`, or no `until`) has no right edge at all: a bucket is always
complete up to the last committed batch, so today's day row already holds today so far.

Rollups resolve time to the minute: `since` is rounded down and `until` up to a whole minute.
Retention deletes minute rows in whole hours (usage.services.usage_prune) and keeps hour and
day rows, so an edge older than the oldest minute row is read from hour rows instead, at hour
resolution; where nothing was pruned that changes no figure (there is nothing older to count).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from django.db import connection

from common.timeframes import HOUR, TimeFrame, ceil_time, floor_time
from usage.filters import UsageFilters
from usage.models import HourRollup, MinuteRollup, UsageRollup
from usage.rollups import MAX_COLUMNS, MIN_COLUMNS, RESOLUTIONS


def as_datetime(value: datetime | str) -> datetime:
    # Raw SQL on SQLite returns a naive datetime (or the stored text), always UTC.
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


Segment = tuple[type[UsageRollup], datetime | None, datetime | None]


def minute_rollups_from() -> datetime | None:
    """The first hour the minute rollups still cover in full; None when there are none.

    Retention deletes minute rows in whole hours, oldest first, so every hour from the one
    holding the oldest row on is complete, and hours before it are pruned or had no calls
    (their hour rows then hold the same figures, or nothing). One index lookup.
    """
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT MIN(bucket_start) FROM {MinuteRollup._meta.db_table}")  # noqa: S608
        oldest = cursor.fetchone()[0]
    return floor_time(as_datetime(oldest), HOUR) if oldest is not None else None


def rollup_segments(frame: TimeFrame, *, now: datetime) -> list[Segment]:
    """Cover the frame with rollup rows, coarsest first. None bounds are open."""
    start = floor_time(frame.since, 60) if frame.since else None
    end = None if frame.until is None or frame.until >= now else ceil_time(frame.until, 60)
    if start is not None and end is not None and start >= end:
        return []
    segments = _plan(start, end, list(RESOLUTIONS))
    if not any(model is MinuteRollup for model, _, _ in segments):
        return segments
    return past_minutes_from_hours(segments, minutes_from=minute_rollups_from())


def past_minutes_from_hours(
    segments: list[Segment], *, minutes_from: datetime | None
) -> list[Segment]:
    """Minute segments before `minutes_from` read from the hours they fall in instead.

    Minute segments are the frame's edges, each less than two hours long and bounded on both
    sides; widening one to whole hours never overlaps a neighbour, which starts or ends on
    the hour."""
    result: list[Segment] = []
    for segment in segments:
        model, start, end = segment
        if model is not MinuteRollup or start is None or end is None:
            result.append(segment)
            continue
        cut = end if minutes_from is None else min(max(minutes_from, start), end)
        if start < cut:
            result.append((HourRollup, floor_time(start, HOUR), ceil_time(cut, HOUR)))
        if cut < end:
            result.append((model, cut, end))
    return result


def _plan(
    start: datetime | None, end: datetime | None, levels: list[tuple[type[UsageRollup], int]]
) -> list[Segment]:
    model, unit = levels[-1]
    if len(levels) == 1:
        return [(model, start, end)]
    lo = ceil_time(start, unit) if start is not None else None
    hi = floor_time(end, unit) if end is not None else None
    if lo is not None and hi is not None and lo >= hi:
        return _plan(start, end, levels[:-1])
    segments: list[Segment] = []
    if start is not None and lo is not None and start < lo:
        segments += _plan(start, lo, levels[:-1])
    segments.append((model, lo, hi))
    if end is not None and hi is not None and hi < end:
        segments += _plan(hi, end, levels[:-1])
    return segments


def rollup_select(
    model: type[UsageRollup],
    *,
    start: datetime | None,
    end: datetime | None,
    filters: UsageFilters,
    group: Sequence[str],
    aggregates: Sequence[tuple[str, str]],
) -> list[dict[str, Any]]:
    """One aggregate query over one rollup table, as dicts keyed by column name.

    Raw SQL rather than the ORM: with a couple of hundred SUM() columns, building the ORM query
    took several times longer than running it. The SQL is plain enough for SQLite and Postgres.
    """
    adapt = connection.ops.adapt_datetimefield_value
    conditions, params = filters.rollup_where()
    if start is not None:
        conditions.append("bucket_start >= %s")
        params.append(adapt(start))
    if end is not None:
        conditions.append("bucket_start < %s")
        params.append(adapt(end))
    select = [*group, *(f"{fn}({column})" for fn, column in aggregates)]
    sql = f"SELECT {', '.join(select)} FROM {model._meta.db_table}"  # noqa: S608 - names only
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    if group:
        sql += " GROUP BY " + ", ".join(group)
    names = [*group, *(column for _, column in aggregates)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _rows(
    segment: Segment,
    *,
    filters: UsageFilters,
    group: Sequence[str],
    columns: Sequence[str],
    extremes: bool,
) -> list[dict[str, Any]]:
    model, start, end = segment
    aggregates = [("SUM", c) for c in columns]
    if extremes:
        aggregates += [("MIN", c) for c in MIN_COLUMNS] + [("MAX", c) for c in MAX_COLUMNS]
    rows = rollup_select(
        model, start=start, end=end, filters=filters, group=group, aggregates=aggregates
    )
    # Without GROUP BY an empty range still yields one row, of NULLs. (A row of requests
    # answered without an attempt has 0 calls, not NULL, and is kept.)
    return [row for row in rows if row["calls"] is not None]


def rollup_merge(
    frame: TimeFrame,
    *,
    now: datetime,
    filters: UsageFilters,
    group: Sequence[str],
    columns: Sequence[str],
    extremes: bool,
) -> dict[tuple[Any, ...], dict[str, Any]]:
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for segment in rollup_segments(frame, now=now):
        for row in _rows(segment, filters=filters, group=group, columns=columns, extremes=extremes):
            key = tuple(row[g] for g in group)
            target = merged.get(key)
            if target is None:
                merged[key] = {c: row[c] for c in (*group, *columns)} | {
                    c: row[c] for c in (*MIN_COLUMNS, *MAX_COLUMNS) if extremes
                }
                continue
            for c in columns:
                if row[c] is not None:
                    target[c] = (target[c] or 0) + row[c]
            if extremes:
                for c in MIN_COLUMNS:
                    if row[c] is not None and (target[c] is None or row[c] < target[c]):
                        target[c] = row[c]
                for c in MAX_COLUMNS:
                    if row[c] is not None and (target[c] is None or row[c] > target[c]):
                        target[c] = row[c]
    return merged
