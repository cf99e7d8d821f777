"""Reads over the rollups: totals, per-provider/model/client figures, stats, time series.

Raw call records are never scanned here (usage/record_selectors.py reads those, by index); the
read plan over the rollup tables is in usage/rollup_reads.py.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any

from common.timeframes import EARLIEST as EPOCH
from common.timeframes import TimeFrame, bucket_bounds
from usage.filters import UsageFilters
from usage.histograms import METRICS, Metric, percentile_from_bins
from usage.models import (
    COST_SCALE,
    OUTCOME_COLUMNS,
    ROLLUP_DIMENSIONS,
    SUMMARY_COLUMNS,
    TOKEN_COLUMNS,
    HourRollup,
    MinuteRollup,
    Outcome,
    RollupDimension,
)
from usage.rollup_reads import (
    Segment,
    as_datetime,
    minute_rollups_from,
    past_minutes_from_hours,
    rollup_merge,
    rollup_select,
)
from usage.rollups import ADDITIVE_COLUMNS, MAX_COLUMNS, MIN_COLUMNS, RESOLUTIONS

# UsageFilters lives in usage.filters; re-exported for callers that import it from here.
__all__ = ["Bucket", "MetricStats", "Stats", "Tokens", "Totals", "UsageFilters"]

_SUCCESS_COLUMN = OUTCOME_COLUMNS[Outcome.SUCCESS.value]


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
    # Reconciliation (usage.models.CallRecord says what each is).
    counted_prompt: int = 0
    forwarded_prompt: int = 0
    reconciled_reported: int = 0
    reconciled_counted: int = 0


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
    calls: int = 0  # upstream attempts
    requests: int = 0  # client requests (each ends with exactly one final row)
    tool_calls: int = 0
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
    ttlt: MetricStats = field(default_factory=MetricStats)
    overhead: MetricStats = field(default_factory=MetricStats)
    # Completion tokens per second: streams after their first token, other calls over the
    # whole call (proxy.calls says how each is measured); `tokens_per_second` mixes both.
    tokens_per_second: MetricStats = field(default_factory=MetricStats)
    tokens_per_second_streamed: MetricStats = field(default_factory=MetricStats)
    tokens_per_second_unstreamed: MetricStats = field(default_factory=MetricStats)
    # HTTP status the client got → client requests that ended with it.
    status_code_counts: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class Bucket:
    start: datetime
    totals: Totals


# --- building results -------------------------------------------------------------------------


def _fill_totals(totals: Totals, row: dict[str, Any]) -> None:
    totals.calls = row.get("calls") or 0
    totals.requests = row.get("requests") or 0
    totals.tool_calls = row.get("tool_calls") or 0
    totals.successes = row.get(_SUCCESS_COLUMN) or 0
    totals.errors = totals.calls - totals.successes
    totals.errors_by_type = {
        outcome: row[column]
        for outcome, column in OUTCOME_COLUMNS.items()
        if outcome != Outcome.SUCCESS.value and row.get(column)
    }
    values = [int(row.get(c) or 0) for c in TOKEN_COLUMNS]
    totals.tokens = Tokens(*values)
    totals.cost_usd = Decimal(int(row.get("cost_e10") or 0)).scaleb(-COST_SCALE)


def metric_stats(metric: Metric, row: dict[str, Any]) -> MetricStats:
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


def stats_of(row: dict[str, Any]) -> Stats:
    """The Stats of one (merged) rollup row with extremes."""
    stats = Stats()
    _fill_totals(stats, row)
    by_name = {m.name: metric_stats(m, row) for m in METRICS}
    stats.ttft = by_name["ttft_ms"]
    stats.duration = by_name["latency_ms"]
    stats.ttlt = by_name["ttlt_ms"]
    stats.overhead = by_name["overhead_ms"]
    stats.tokens_per_second = by_name["tokens_per_second"]
    return stats


_TPS = next(m for m in METRICS if m.name == "tokens_per_second")


def rollup_combine(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Rows of `rollup_merge` (with extremes) added into one."""
    out: dict[str, Any] = {}
    for row in rows:
        if not out:
            out = dict(row)
            continue
        for c in ADDITIVE_COLUMNS:
            if row.get(c) is not None:
                out[c] = (out.get(c) or 0) + row[c]
        for columns, pick in ((MIN_COLUMNS, min), (MAX_COLUMNS, max)):
            for c in columns:
                values = [v for v in (out.get(c), row.get(c)) if v is not None]
                out[c] = pick(values) if values else None
    return out


def _stats_by_stream(rows: dict[tuple[Any, ...], dict[str, Any]]) -> Stats:
    """Stats from rows keyed by (stream,): the figures of all, and the token rate of each."""
    stats = stats_of(rollup_combine(rows.values()))
    # Raw SQL gives SQLite's booleans as 0/1, which are equal (and hash alike) to False/True.
    stats.tokens_per_second_streamed = metric_stats(_TPS, rows.get((True,), {}))
    stats.tokens_per_second_unstreamed = metric_stats(_TPS, rows.get((False,), {}))
    return stats


def _status_counts(
    *, group: tuple[RollupDimension, ...], frame: TimeFrame, filters: UsageFilters, now: datetime
) -> dict[tuple[Any, ...], dict[int, int]]:
    """group values → {client status: requests}. A narrow read (the summary index holds
    both columns); non-final rows carry status 0 and are left out."""
    merged = rollup_merge(
        frame, now=now, filters=filters, group=(*group, "client_status"),
        columns=("calls", "requests"), extremes=False,
    )  # fmt: skip
    out: dict[tuple[Any, ...], dict[int, int]] = {}
    for key, row in merged.items():
        status, requests = int(key[-1] or 0), int(row["requests"] or 0)
        if status and requests:
            counts = out.setdefault(key[:-1], {})
            counts[status] = counts.get(status, 0) + requests
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def totals_of(row: dict[str, Any]) -> Totals:
    """The counts, tokens and cost of one (merged) rollup row."""
    totals = Totals()
    _fill_totals(totals, row)
    return totals


# --- selectors ----------------------------------------------------------------------------


def usage_stats(*, frame: TimeFrame, filters: UsageFilters, now: datetime) -> Stats:
    """Everything about the matching calls: counts, rates, tokens, cost, percentiles, and
    the status codes clients got."""
    merged = rollup_merge(
        frame, now=now, filters=filters, group=("stream",), columns=ADDITIVE_COLUMNS,
        extremes=True,
    )  # fmt: skip
    stats = _stats_by_stream(merged)
    stats.status_code_counts = _status_counts(group=(), frame=frame, filters=filters, now=now).get(
        (), {}
    )
    return stats


def usage_stats_by(
    *, group: RollupDimension, frame: TimeFrame, filters: UsageFilters, now: datetime
) -> list[tuple[str, Stats]]:
    """`usage_stats` per value of one dimension (`client`, `key_id`, …), busiest first, in one
    pass over the rollups rather than one `usage_stats` per value."""
    # The name goes into the SQL as a column: only a rollup dimension may.
    assert group in ROLLUP_DIMENSIONS, group
    if group == "stream":
        merged = rollup_merge(
            frame, now=now, filters=filters, group=(group,), columns=ADDITIVE_COLUMNS,
            extremes=True,
        )  # fmt: skip
        result = [(key[0], _stats_by_stream({key: row})) for key, row in merged.items()]
    else:
        merged = rollup_merge(
            frame, now=now, filters=filters, group=(group, "stream"), columns=ADDITIVE_COLUMNS,
            extremes=True,
        )  # fmt: skip
        split: dict[Any, dict[tuple[Any, ...], dict[str, Any]]] = {}
        for (value, stream), row in merged.items():
            split.setdefault(value, {})[(stream,)] = row
        result = [(value, _stats_by_stream(rows)) for value, rows in split.items()]
    statuses = _status_counts(group=(group,), frame=frame, filters=filters, now=now)
    for value, stats in result:
        stats.status_code_counts = statuses.get((value,), {})
    return sorted(result, key=lambda item: (-item[1].calls, item[0]))


def usage_totals_by(
    *, group: Sequence[RollupDimension], frame: TimeFrame, filters: UsageFilters, now: datetime
) -> list[tuple[tuple[Any, ...], Totals]]:
    """Counts, tokens and cost per value of the `group` columns (e.g. provider), sorted."""
    assert set(group) <= set(ROLLUP_DIMENSIONS), group
    merged = rollup_merge(
        frame, now=now, filters=filters, group=group, columns=SUMMARY_COLUMNS, extremes=False
    )
    return sorted(((key, totals_of(row)) for key, row in merged.items()), key=lambda kv: kv[0])


def usage_timeseries(
    *,
    frame: TimeFrame,
    bucket: timedelta,
    filters: UsageFilters,
    now: datetime,
    zone: tzinfo | None = None,
) -> list[Bucket]:
    """Totals per bucket, oldest first, empty buckets included. Buckets are whole and aligned
    to UTC, or to the clock of `zone` (bucket_bounds); the first one starts at or before
    `since`. Each is read from a single rollup resolution: the coarsest whose rows fit inside
    every bucket. In a zone half an hour (or 45 minutes) off UTC, no hour row fits in a local
    hour; buckets of whole hours are still read from hour rows, each counted in the bucket its
    start falls in (30 or 45 minutes late, docs/dashboard.md), because minute rows for a month
    would be sixty times as many to read. UTC buckets (the API's) are always exact."""
    bounds = bucket_bounds(frame, bucket, now=now, zone=zone)
    count = len(bounds) - 1
    first, end = bounds[0], bounds[-1]
    model = next(
        (
            m
            for m, unit in reversed(RESOLUTIONS)
            if all(int((b - EPOCH).total_seconds()) % unit == 0 for b in bounds)
        ),
        MinuteRollup,  # a zone offset by seconds (historical ones): rows by their start
    )
    whole_hours = bucket % timedelta(hours=1) == timedelta(0)
    if zone is not None and model is MinuteRollup and whole_hours:
        model = HourRollup
    reads: list[Segment] = [(model, first, end)]
    if model is MinuteRollup:
        # Sub-hour buckets before the minute rollups' horizon come from hour rows: each hour's
        # figures go to the bucket its start falls in (the first bucket for the hour it
        # begins in).
        reads = past_minutes_from_hours(reads, minutes_from=minute_rollups_from())
    folded: dict[int, dict[str, Any]] = {}
    for table, start, stop in reads:
        rows = rollup_select(
            table, start=start, end=stop, filters=filters, group=("bucket_start",),
            aggregates=[("SUM", c) for c in SUMMARY_COLUMNS],
        )  # fmt: skip
        for row in rows:
            index = bisect_right(bounds, as_datetime(row["bucket_start"])) - 1
            target = folded.setdefault(
                min(max(index, 0), count - 1), dict.fromkeys(SUMMARY_COLUMNS, 0)
            )
            for c in SUMMARY_COLUMNS:
                target[c] += row[c] or 0
    return [Bucket(start=bounds[i], totals=totals_of(folded.get(i, {}))) for i in range(count)]
