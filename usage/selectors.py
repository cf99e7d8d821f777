"""Reads over the rollups: totals, per-provider/model/client figures, stats, time series.

Raw call records are never scanned here (usage/record_selectors.py reads those, by index).
A frame is answered from the coarsest rollups that fit it: whole UTC days from the day table,
the hours at either edge from the hour table, the minutes beyond from the minute table. A frame
that runs up to now (a `window`, or no `until`) has no right edge at all: a bucket is always
complete up to the last committed batch, so today's day row already holds today so far.

Rollups resolve time to the minute: `since` is rounded down and `until` up to a whole minute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from django.db import connection

from usage.histograms import METRICS, Metric, percentile_from_bins
from usage.models import (
    COST_SCALE,
    OUTCOME_COLUMNS,
    SUMMARY_COLUMNS,
    TOKEN_COLUMNS,
    Outcome,
    UsageRollup,
)
from usage.rollups import ADDITIVE_COLUMNS, MAX_COLUMNS, MIN_COLUMNS, RESOLUTIONS
from usage.timeframes import MAX_BUCKETS, TimeFrame, TimeFrameError, ceil_time, floor_time

Status = Literal["success", "error"]
_SUCCESS_COLUMN = OUTCOME_COLUMNS[Outcome.SUCCESS.value]


@dataclass(frozen=True, slots=True)
class UsageFilters:
    """The filters every usage endpoint accepts; None means "any"."""

    provider: str | None = None
    model: str | None = None
    key: str | None = None
    client: str | None = None
    status: Status | None = None
    stream: bool | None = None

    def equalities(self) -> dict[str, Any]:
        """column → value for the filters that are plain equalities, on columns that call
        records and rollups share (`status` is not: see its two readings below)."""
        pairs = (
            ("provider", self.provider),
            ("requested_model", self.model),
            ("key_id", self.key),
            ("client", self.client),
            ("stream", self.stream),
        )
        return {column: value for column, value in pairs if value is not None}

    def rollup_where(self) -> tuple[list[str], list[Any]]:
        """SQL conditions (and their parameters) on the rollup dimensions."""
        equal = self.equalities()
        if self.status is not None:
            equal["ok"] = self.status == "success"
        return [f"{column} = %s" for column in equal], list(equal.values())


def _as_datetime(value: datetime | str) -> datetime:
    # Raw SQL on SQLite returns a naive datetime (or the stored text), always UTC.
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- results (plain data: the API and the dashboard render these) -------------------------


@dataclass(slots=True)
class Tokens:
    prompt: int = 0
    completion: int = 0
    total: int = 0
    cached: int = 0
    reasoning: int = 0
    reported: int = 0
    estimated: int = 0


@dataclass(slots=True)
class MetricStats:
    count: int = 0
    min: float | None = None
    avg: float | None = None
    max: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


@dataclass(slots=True)
class Totals:
    calls: int = 0
    successes: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    tokens: Tokens = field(default_factory=Tokens)
    cost_usd: Decimal = Decimal(0)

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.calls if self.calls else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None


@dataclass(slots=True)
class Stats(Totals):
    ttft: MetricStats = field(default_factory=MetricStats)
    duration: MetricStats = field(default_factory=MetricStats)
    overhead: MetricStats = field(default_factory=MetricStats)
    tokens_per_second: MetricStats = field(default_factory=MetricStats)


@dataclass(slots=True)
class Bucket:
    start: datetime
    totals: Totals


# --- planning: which table answers which part of the frame --------------------------------

Segment = tuple[type[UsageRollup], datetime | None, datetime | None]


def rollup_segments(frame: TimeFrame, *, now: datetime) -> list[Segment]:
    """Cover the frame with rollup rows, coarsest first. None bounds are open."""
    start = floor_time(frame.since, 60) if frame.since else None
    end = None if frame.until is None or frame.until >= now else ceil_time(frame.until, 60)
    if start is not None and end is not None and start >= end:
        return []
    return _plan(start, end, list(RESOLUTIONS))


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


def _select(
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
    rows = _select(model, start=start, end=end, filters=filters, group=group, aggregates=aggregates)
    # Without GROUP BY an empty range still yields one row, of NULLs.
    return [row for row in rows if row["calls"]]


def _merge(
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


# --- building results -------------------------------------------------------------------------


def _fill_totals(totals: Totals, row: dict[str, Any]) -> None:
    totals.calls = row.get("calls") or 0
    totals.successes = row.get(_SUCCESS_COLUMN) or 0
    totals.errors = totals.calls - totals.successes
    totals.errors_by_type = {
        outcome: row[column]
        for outcome, column in OUTCOME_COLUMNS.items()
        if outcome != Outcome.SUCCESS.value and row.get(column)
    }
    t = totals.tokens
    t.prompt, t.completion, t.total, t.cached, t.reasoning, t.reported, t.estimated = (
        int(row.get(c) or 0) for c in TOKEN_COLUMNS
    )
    totals.cost_usd = Decimal(int(row.get("cost_e10") or 0)).scaleb(-COST_SCALE)


def _metric_stats(metric: Metric, row: dict[str, Any]) -> MetricStats:
    count = int(row.get(f"{metric.prefix}_count") or 0)
    if not count:
        return MetricStats()
    low, high = row[f"{metric.prefix}_min"], row[f"{metric.prefix}_max"]
    bins = [int(row.get(c) or 0) for c in metric.bin_columns()]

    def pct(p: float) -> float | None:
        return percentile_from_bins(metric, bins, p=p, minimum=low, maximum=high)

    return MetricStats(
        count=count,
        min=low,
        max=high,
        avg=(row.get(f"{metric.prefix}_sum") or 0.0) / count,
        p50=pct(50),
        p95=pct(95),
        p99=pct(99),
    )


def _stats(row: dict[str, Any]) -> Stats:
    stats = Stats()
    _fill_totals(stats, row)
    by_name = {m.name: _metric_stats(m, row) for m in METRICS}
    stats.ttft = by_name["ttft_ms"]
    stats.duration = by_name["latency_ms"]
    stats.overhead = by_name["overhead_ms"]
    stats.tokens_per_second = by_name["tokens_per_second"]
    return stats


def _totals(row: dict[str, Any]) -> Totals:
    totals = Totals()
    _fill_totals(totals, row)
    return totals


# --- selectors ----------------------------------------------------------------------------


def usage_stats(*, frame: TimeFrame, filters: UsageFilters, now: datetime) -> Stats:
    """Everything about the matching calls: counts, rates, tokens, cost, percentiles."""
    merged = _merge(
        frame, now=now, filters=filters, group=(), columns=ADDITIVE_COLUMNS, extremes=True
    )
    return _stats(merged.get((), {}))


def usage_stats_by_client(
    *, frame: TimeFrame, filters: UsageFilters, now: datetime
) -> list[tuple[str, Stats]]:
    """`usage_stats` per client, busiest first."""
    merged = _merge(
        frame, now=now, filters=filters, group=("client",), columns=ADDITIVE_COLUMNS,
        extremes=True,
    )  # fmt: skip
    result = [(key[0], _stats(row)) for key, row in merged.items()]
    return sorted(result, key=lambda item: (-item[1].calls, item[0]))


def usage_totals_by(
    *, group: Sequence[str], frame: TimeFrame, filters: UsageFilters, now: datetime
) -> list[tuple[tuple[Any, ...], Totals]]:
    """Counts, tokens and cost per value of the `group` columns (e.g. provider), sorted."""
    merged = _merge(
        frame, now=now, filters=filters, group=group, columns=SUMMARY_COLUMNS, extremes=False
    )
    return sorted(((key, _totals(row)) for key, row in merged.items()), key=lambda kv: kv[0])


def usage_timeseries(
    *, frame: TimeFrame, bucket: timedelta, filters: UsageFilters, now: datetime
) -> list[Bucket]:
    """Totals per bucket, oldest first, empty buckets included. Buckets are whole and aligned
    to UTC (the first one starts at or before `since`), so each is read from a single rollup
    resolution: the coarsest whose rows fit inside a bucket."""
    size = int(bucket.total_seconds())
    until = frame.until or now
    since = frame.since or until - timedelta(hours=24)
    first = floor_time(since, size)
    end = ceil_time(until, size) if until > first else first + bucket
    count = int((end - first).total_seconds()) // size
    if count > MAX_BUCKETS:
        raise TimeFrameError(
            "bucket",
            f"bucket: {count} buckets is too many for this frame (at most {MAX_BUCKETS}); "
            "choose a larger bucket or a shorter frame.",
        )
    model = next(m for m, unit in reversed(RESOLUTIONS) if size % unit == 0)
    rows = _select(
        model, start=first, end=end, filters=filters, group=("bucket_start",),
        aggregates=[("SUM", c) for c in SUMMARY_COLUMNS],
    )  # fmt: skip
    folded: dict[int, dict[str, Any]] = {}
    for row in rows:
        index = int((_as_datetime(row["bucket_start"]) - first).total_seconds()) // size
        target = folded.setdefault(index, dict.fromkeys(SUMMARY_COLUMNS, 0))
        for c in SUMMARY_COLUMNS:
            target[c] += row[c] or 0
    return [
        Bucket(start=first + i * bucket, totals=_totals(folded.get(i, {}))) for i in range(count)
    ]
