"""Reads behind LLM Interactive Proxy's monitoring endpoints (`/v1/usage/stats`, `/recent`,
`/export`; usage.lip_api): its figures from our rollups and call records.

Stats come from the rollups (usage.rollup_reads), grouped by the status the client got, so that
request counts, status codes and per-request timings (the final attempt's latency runs from
when the proxy received the request) come from the same rows as tokens and cost. Sessions and
turns come from the session rollup. Only `user_agent` and `session_id`, which no rollup carries,
are answered from the call records, over their (value, started_at) indexes.

Records (recent, export) are the requests' final rows: one per client request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from django.db import connection
from django.db.models import Count, Max, Min, Q, QuerySet, Sum, TextField
from django.db.models.expressions import RawSQL

from common.timeframes import TimeFrame
from keys.models import Provider
from usage.conversation_selectors import sessions_stats
from usage.export_postgres import pg_isoformat
from usage.filters import UsageFilters
from usage.histograms import METRICS, Metric, exact_percentile
from usage.models import (
    CLIENT_CLOSED_STATUS,
    CallRecord,
    HourRollup,
    MinuteRollup,
    UsageSource,
)
from usage.record_selectors import records_after, records_in_frame
from usage.rollup_reads import as_datetime, minute_rollups_from, rollup_merge, rollup_select
from usage.rollups import ADDITIVE_COLUMNS
from usage.selectors import metric_stats, rollup_combine, totals_of

# LIP's timing figures, by our metric (a histogram in the rollups, a column of the records):
# ttft_stats, duration_stats (the whole request), proxy_processing_stats (our overhead) and,
# beyond LIP, ttlt_stats.
TIMINGS = {"ttft": "ttft_ms", "duration": "latency_ms", "proxy_processing": "overhead_ms",
           "ttlt": "ttlt_ms"}  # fmt: skip
_METRIC = {m.name: m for m in METRICS}
# The attempts a stats read filtered on what only records carry covers at most: the newest, so
# that its cost is bounded whatever the data (LIP's own stats cover the records it keeps in
# memory, 100,000 by default). Its time window then starts at the oldest of them.
RAW_LIMIT = 20_000
EXPORT_CHUNK = 2000


@dataclass(frozen=True, slots=True)
class LipFilters(UsageFilters):
    """UsageFilters plus LIP's two wider matches: `backend_type` (a set of provider names:
    those of that kind, or the one so named) and `model` (the route or the upstream model)."""

    providers: tuple[str, ...] | None = None
    any_model: str | None = None

    def rollup_where(self) -> tuple[list[str], list[Any]]:
        # Not super(): a slots dataclass is a new class, which zero-argument super() misses.
        conditions, params = UsageFilters.rollup_where(self)
        if self.providers is not None:
            marks = ", ".join("%s" for _ in self.providers)
            conditions.append(f"provider IN ({marks})")
            params += list(self.providers)
        if self.any_model is not None:
            conditions.append("(requested_model = %s OR upstream_model = %s)")
            params += [self.any_model, self.any_model]
        return conditions, params

    def conversation_q(self) -> Q:
        q = UsageFilters.conversation_q(self)
        if self.providers is not None:
            q &= Q(provider__in=self.providers)
        if self.any_model is not None:  # the session rollup knows the route only
            q &= Q(requested_model=self.any_model)
        return q

    def record_q(self) -> Q:
        q = Q(**self.record_equalities())
        if self.providers is not None:
            q &= Q(provider__in=self.providers)
        if self.any_model is not None:
            q &= Q(requested_model=self.any_model) | Q(upstream_model=self.any_model)
        return q


def lip_filters(
    *,
    backend_type: str | None = None,
    model: str | None = None,
    http_status_code: int | None = None,
    user_agent: str | None = None,
    session_id: str | None = None,
    proxy_user: str | None = None,
) -> LipFilters:
    providers = None
    if backend_type is not None:
        names = Provider.objects.filter(Q(kind=backend_type) | Q(name=backend_type))
        # The name itself too: records outlive the providers they name.
        providers = tuple(sorted({*names.values_list("name", flat=True), backend_type}))
    return LipFilters(
        providers=providers,
        any_model=model,
        client_status=http_status_code,
        user_agent=user_agent,
        session_id=session_id,
        client=proxy_user,
    )


# --- stats --------------------------------------------------------------------------------


@dataclass(slots=True)
class Timing:
    count: int
    min_ms: float
    max_ms: float
    avg_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(slots=True)
class LipStats:
    request_count: int = 0
    response_count: int = 0
    attempt_count: int = 0
    unique_sessions: int = 0
    total_turns: int = 0
    total_prompt_tokens: int = 0
    total_completion_tokens: int = 0
    total_tokens: int = 0
    backend_reported_total_tokens: int = 0
    counted_prompt_tokens: int = 0
    forwarded_prompt_tokens: int = 0
    reconciled_reported_prompt_tokens: int = 0
    reconciled_counted_prompt_tokens: int = 0
    total_cost: float = 0.0
    total_tool_calls: int = 0
    session_tokens: int = 0
    status_code_counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, Timing | None] = field(default_factory=dict)
    time_window_seconds: float = 0.0
    # Where a stats read over call records began when it covered only the newest RAW_LIMIT.
    window_start: datetime | None = None

    @property
    def tokens_per_session(self) -> float:
        return self.session_tokens / self.unique_sessions if self.unique_sessions else 0.0

    def per_second(self, tokens: int) -> float:
        return tokens / self.time_window_seconds if self.time_window_seconds > 0 else 0.0


def _timing(metric: Metric, row: dict[str, Any]) -> Timing | None:
    m = metric_stats(metric, row)
    if not m.count or m.min is None or m.max is None:
        return None
    high = float(m.max)
    return Timing(
        count=m.count, min_ms=float(m.min), max_ms=high, avg_ms=float(m.avg or 0.0),
        p50_ms=float(m.p50 if m.p50 is not None else high),
        p95_ms=float(m.p95 if m.p95 is not None else high),
        p99_ms=float(m.p99 if m.p99 is not None else high),
    )  # fmt: skip


def _first_activity(filters: LipFilters, *, until: datetime | None) -> datetime | None:
    """The start of the first minute with matching calls (an hour where minutes are pruned)."""

    def first(model: type[HourRollup] | type[MinuteRollup], start: datetime | None) -> Any:
        rows = rollup_select(
            model, start=start, end=until, filters=filters, group=(),
            aggregates=[("MIN", "bucket_start")],
        )  # fmt: skip
        value = rows[0]["bucket_start"] if rows else None
        return as_datetime(value) if value is not None else None

    hour = first(HourRollup, None)
    if hour is None:
        return None
    minutes_from = minute_rollups_from()
    if minutes_from is not None and minutes_from <= hour:
        return first(MinuteRollup, hour) or hour
    return hour


def _window(frame: TimeFrame, filters: LipFilters, *, now: datetime) -> float:
    end = min(frame.until, now) if frame.until is not None else now
    start = frame.since if frame.since is not None else _first_activity(filters, until=end)
    if start is None:
        return 0.0
    return max((end - start) / timedelta(seconds=1), 0.0)


def lip_stats(*, frame: TimeFrame, filters: LipFilters, now: datetime) -> LipStats:
    if filters.record_only():
        return _lip_stats_from_records(frame=frame, filters=filters, now=now)
    merged = rollup_merge(
        frame, now=now, filters=filters, group=("client_status",), columns=ADDITIVE_COLUMNS,
        extremes=True,
    )  # fmt: skip
    rows = {int(key[0] or 0): row for key, row in merged.items()}
    total = rollup_combine(rows.values())
    # Final rows (client_status > 0) are the requests: their timings are the requests'.
    final = rollup_combine(row for status, row in rows.items() if status)
    totals = totals_of(total)
    tokens = totals.tokens
    stats = LipStats(
        request_count=totals.requests,
        attempt_count=totals.calls,
        total_prompt_tokens=tokens.prompt,
        total_completion_tokens=tokens.completion,
        total_tokens=tokens.total,
        backend_reported_total_tokens=tokens.reported,
        counted_prompt_tokens=tokens.counted_prompt,
        forwarded_prompt_tokens=tokens.forwarded_prompt,
        reconciled_reported_prompt_tokens=tokens.reconciled_reported,
        reconciled_counted_prompt_tokens=tokens.reconciled_counted,
        total_cost=float(totals.cost_usd),
        total_tool_calls=totals.tool_calls,
    )
    for status, row in sorted(rows.items()):
        requests = int(row.get("requests") or 0)
        if status and requests:
            stats.status_code_counts[str(status)] = requests
            if status != CLIENT_CLOSED_STATUS:
                stats.response_count += requests
    stats.timings = {name: _timing(_METRIC[metric], final) for name, metric in TIMINGS.items()}
    if stats.request_count:
        # The session rollup carries provider and route only: `http_status_code` and an
        # upstream model name do not narrow these.
        sessions = sessions_stats(frame=frame, filters=filters)
        stats.unique_sessions, stats.total_turns = sessions.unique_sessions, sessions.total_turns
        stats.session_tokens = sessions.total_tokens
    stats.time_window_seconds = _window(frame, filters, now=now)
    stats.window_start = frame.since
    return stats


def _lip_stats_from_records(*, frame: TimeFrame, filters: LipFilters, now: datetime) -> LipStats:
    """The same figures for a `user_agent` or `session_id` filter, from the call records (no
    rollup carries either), exact over the frame, or over its newest RAW_LIMIT attempts when
    more match: the frame then starts at the oldest of them (`time_window_seconds` and
    `window_start` say so)."""
    matching = CallRecord.objects.filter(filters.record_q() & records_in_frame(frame))
    # One walk down the (value, started_at) index to the RAW_LIMIT-th newest.
    cutoff = list(matching.order_by("-started_at").values_list("started_at", flat=True)[
        RAW_LIMIT - 1 : RAW_LIMIT
    ])  # fmt: skip
    if cutoff:
        frame = TimeFrame(since=cutoff[0], until=frame.until)
    qs = CallRecord.objects.filter(filters.record_q() & records_in_frame(frame))
    both = Q(usage_source=UsageSource.REPORTED, counted_prompt_tokens__isnull=False)
    sums = qs.aggregate(
        attempts=Count("id"),
        requests=Count("id", filter=Q(final=True)),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        total=Sum("total_tokens"),
        reported=Sum("total_tokens", filter=Q(usage_source=UsageSource.REPORTED)),
        counted=Sum("counted_prompt_tokens"),
        forwarded=Sum("forwarded_prompt_tokens"),
        cost=Sum("cost_usd"),
        tools=Sum("tool_calls"),
        first=Min("started_at"),
        reconciled_reported=Sum("prompt_tokens", filter=both),
        reconciled_counted=Sum("counted_prompt_tokens", filter=both),
        sessions=Count("session_id", distinct=True, filter=~Q(session_id="")),
        session_turns=Count("id", filter=Q(final=True) & ~Q(session_id="")),
        session_tokens=Sum("total_tokens", filter=~Q(session_id="")),
    )
    stats = LipStats(
        request_count=sums["requests"],
        attempt_count=sums["attempts"],
        total_prompt_tokens=int(sums["prompt"] or 0),
        total_completion_tokens=int(sums["completion"] or 0),
        total_tokens=int(sums["total"] or 0),
        backend_reported_total_tokens=int(sums["reported"] or 0),
        counted_prompt_tokens=int(sums["counted"] or 0),
        forwarded_prompt_tokens=int(sums["forwarded"] or 0),
        reconciled_reported_prompt_tokens=int(sums["reconciled_reported"] or 0),
        reconciled_counted_prompt_tokens=int(sums["reconciled_counted"] or 0),
        total_cost=float(sums["cost"] or 0),
        total_tool_calls=int(sums["tools"] or 0),
    )
    final = qs.filter(final=True)
    statuses = final.values("client_status").annotate(n=Count("id")).order_by("client_status")
    for status_row in statuses:
        status, n = status_row["client_status"], status_row["n"]
        if status:
            stats.status_code_counts[str(status)] = n
            if status != CLIENT_CLOSED_STATUS:
                stats.response_count += n
    columns = list(TIMINGS.values())
    newest = final.values_list(*columns)
    values: dict[str, list[float]] = {name: [] for name in TIMINGS}
    for row in newest.iterator(chunk_size=EXPORT_CHUNK):
        for name, value in zip(TIMINGS, row, strict=True):
            if value is not None:
                values[name].append(float(value))
    stats.timings = {name: _exact_timing(v) for name, v in values.items()}
    # Counted as the session rollup counts them: each request of a session is one of its turns.
    stats.unique_sessions = sums["sessions"] or 0
    stats.total_turns = sums["session_turns"] or 0
    stats.session_tokens = int(sums["session_tokens"] or 0)
    stats.window_start = frame.since
    end = min(frame.until, now) if frame.until is not None else now
    start = frame.since or sums["first"]
    if start is not None:
        stats.time_window_seconds = max((end - start) / timedelta(seconds=1), 0.0)
    return stats


def _exact_timing(values: list[float]) -> Timing | None:
    if not values:
        return None

    def pct(p: float) -> float:
        return float(exact_percentile(values, p=p) or 0.0)

    return Timing(
        count=len(values),
        min_ms=min(values),
        max_ms=max(values),
        avg_ms=sum(values) / len(values),
        p50_ms=pct(50),
        p95_ms=pct(95),
        p99_ms=pct(99),
    )


# --- records --------------------------------------------------------------------------------

_RECORD_COLUMNS = (
    "id", "request_id", "attempt", "started_at", "session_id", "turn", "provider",
    "requested_model", "upstream_model", "stream", "outcome", "client_status", "prompt_tokens",
    "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "usage_source",
    "counted_prompt_tokens", "forwarded_prompt_tokens", "tool_calls", "tool_names", "ttft_ms",
    "ttlt_ms", "tokens_per_second", "overhead_ms", "latency_ms", "cost_usd", "user_agent",
    "origin", "app_title", "client", "key_id",
)  # fmt: skip


def provider_kinds() -> dict[str, str]:
    """provider name → kind (openai, anthropic, openai_compatible): LIP's backend_type."""
    return dict(Provider.objects.values_list("name", "kind"))


def lip_record(row: dict[str, Any], *, kinds: dict[str, str]) -> dict[str, Any]:
    """One request (its final row) in the shape of LIP's UsageRecord.to_dict, plus ours."""
    reported = None
    if row["usage_source"] == UsageSource.REPORTED:
        reported = {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "total_tokens": row["total_tokens"],
            "prompt_tokens_details": {"cached_tokens": row["cached_tokens"]},
            "completion_tokens_details": {"reasoning_tokens": row["reasoning_tokens"]},
        }
    cost = row["cost_usd"]
    return {
        "id": row["request_id"],
        "timestamp": row["started_at"].isoformat(),
        "session_id": row["session_id"] or None,
        "turn_number": row["turn"],
        "backend_type": kinds.get(row["provider"], row["provider"]) or None,
        # LIP's "gemini.1": our key id (a label, never the secret), else the provider.
        "backend_instance_id": row["key_id"] or row["provider"] or None,
        "model": row["upstream_model"] or row["requested_model"],
        # Which API the client used is not recorded.
        "frontend_type": None,
        # One record per request, as answered to the client.
        "leg": "PTC",
        "verbatim_prompt_tokens": row["counted_prompt_tokens"] or 0,
        "verbatim_completion_tokens": row["completion_tokens"],
        "mutated_prompt_tokens": row["forwarded_prompt_tokens"] or 0,
        "mutated_completion_tokens": row["completion_tokens"],
        "total_tokens": row["total_tokens"],
        "backend_reported_usage": reported,
        "http_status_code": row["client_status"],
        "tool_call_count": row["tool_calls"],
        # All native: the gateway parses no tool calls out of text (LIP's "VTC").
        "native_tool_call_count": row["tool_calls"],
        "vtc_tool_call_count": 0,
        "tool_names": list(row["tool_names"] or []),
        "ttft_ms": row["ttft_ms"],
        # Rate after the first token, as LIP's; only streams have one.
        "stream_tps": row["tokens_per_second"] if row["stream"] else None,
        "backend_wait_ms": max(0.0, row["latency_ms"] - row["overhead_ms"]),
        "proxy_processing_ms": row["overhead_ms"],
        "total_duration_ms": row["latency_ms"],
        "user_agent": row["user_agent"] or None,
        "app_title": row["app_title"] or None,
        "proxy_user": row["client"] or None,
        # Beyond LIP's record.
        "provider": row["provider"] or None,
        "requested_model": row["requested_model"],
        "upstream_model": row["upstream_model"] or None,
        "attempts": row["attempt"],
        "outcome": row["outcome"],
        "stream": row["stream"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "usage_source": row["usage_source"],
        "ttlt_ms": row["ttlt_ms"],
        "tokens_per_second": row["tokens_per_second"],
        "origin": row["origin"] or None,
        "cost_usd": float(cost) if cost is not None else None,
    }


def _requests(filters: LipFilters, frame: TimeFrame) -> QuerySet[CallRecord]:
    return CallRecord.objects.filter(Q(final=True) & filters.record_q() & records_in_frame(frame))


class RawJSON(str):
    """A record already encoded as JSON (by Postgres): written out as it is."""


@dataclass(frozen=True, slots=True)
class RecentPage:
    records: list[dict[str, Any]]
    total: int


def lip_recent(
    *, filters: LipFilters, frame: TimeFrame, limit: int, offset: int, now: datetime
) -> RecentPage:
    """Requests newest first. `total` comes from the rollups' request counts unless a filter
    only records carry is set (then a COUNT over its index)."""
    qs = _requests(filters, frame)
    page = qs.order_by("-started_at", "-id").values(*_RECORD_COLUMNS)[offset : offset + limit]
    kinds = provider_kinds()
    records = [lip_record(row, kinds=kinds) for row in page]
    if filters.record_only():
        total = qs.count()
    else:
        merged = rollup_merge(
            frame, now=now, filters=filters, group=(), columns=("calls", "requests"),
            extremes=False,
        )  # fmt: skip
        total = int(merged.get((), {}).get("requests") or 0)
    return RecentPage(records=records, total=total)


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What an export will stream: its count is taken first, and the rows streamed are the
    same ones (up to the highest id seen at that moment), so record_count is exact."""

    filters: LipFilters
    frame: TimeFrame
    last_id: int
    record_count: int


def lip_export_plan(*, filters: LipFilters, frame: TimeFrame) -> ExportPlan:
    last_id = CallRecord.objects.aggregate(last=Max("id"))["last"] or 0
    count = _requests(filters, frame).filter(id__lte=last_id).count()
    return ExportPlan(filters=filters, frame=frame, last_id=last_id, record_count=count)


# lip_record's document, built by Postgres: an export then hands its rows on as they come,
# with no Python object per field (about 8x the rows per second). Keys in lip_record's order;
# tests compare the two (tests/usage/test_lip_api.py).
_PG_DOCUMENT = (
    """json_build_object(
    'id', request_id,
    -- As Python's isoformat(): six digits of microseconds, none when there are none.
    'timestamp', """
    + pg_isoformat("started_at")
    + """,
    'session_id', NULLIF(session_id, ''),
    'turn_number', turn,
    'backend_type', COALESCE(%s::jsonb ->> provider, NULLIF(provider, '')),
    'backend_instance_id', COALESCE(NULLIF(key_id, ''), NULLIF(provider, '')),
    'model', COALESCE(NULLIF(upstream_model, ''), requested_model),
    'frontend_type', NULL, 'leg', 'PTC',
    'verbatim_prompt_tokens', COALESCE(counted_prompt_tokens, 0),
    'verbatim_completion_tokens', completion_tokens,
    'mutated_prompt_tokens', COALESCE(forwarded_prompt_tokens, 0),
    'mutated_completion_tokens', completion_tokens, 'total_tokens', total_tokens,
    'backend_reported_usage', CASE WHEN usage_source = 'reported' THEN json_build_object(
        'prompt_tokens', prompt_tokens, 'completion_tokens', completion_tokens,
        'total_tokens', total_tokens,
        'prompt_tokens_details', json_build_object('cached_tokens', cached_tokens),
        'completion_tokens_details', json_build_object('reasoning_tokens', reasoning_tokens)
    ) END,
    'http_status_code', client_status, 'tool_call_count', tool_calls,
    'native_tool_call_count', tool_calls, 'vtc_tool_call_count', 0,
    'tool_names', tool_names, 'ttft_ms', ttft_ms,
    'stream_tps', CASE WHEN stream THEN tokens_per_second END,
    'backend_wait_ms', GREATEST(0.0, latency_ms - overhead_ms),
    'proxy_processing_ms', overhead_ms, 'total_duration_ms', latency_ms,
    'user_agent', NULLIF(user_agent, ''), 'app_title', NULLIF(app_title, ''),
    'proxy_user', NULLIF(client, ''), 'provider', NULLIF(provider, ''),
    'requested_model', requested_model, 'upstream_model', NULLIF(upstream_model, ''),
    'attempts', attempt, 'outcome', outcome, 'stream', stream,
    'prompt_tokens', prompt_tokens, 'completion_tokens', completion_tokens,
    'usage_source', usage_source, 'ttlt_ms', ttlt_ms, 'tokens_per_second', tokens_per_second,
    'origin', NULLIF(origin, ''), 'cost_usd', cost_usd::float8
)::text"""
)


def lip_export_records(plan: ExportPlan, *, chunk_size: int = EXPORT_CHUNK) -> Iterator[Any]:
    """The plan's requests oldest first, one chunk (one indexed query) at a time: each chunk
    continues after the last row of the one before (keyset), so no transaction or server-side
    cursor stays open while the client reads."""
    base = _requests(plan.filters, plan.frame).filter(id__lte=plan.last_id)
    base = base.order_by("started_at", "id")
    kinds = provider_kinds()
    documents = connection.vendor == "postgresql"
    last: tuple[datetime, int] | None = None
    while True:
        qs = base if last is None else base.filter(records_after(*last, newer=True))
        chunk: list[dict[str, Any]]
        if documents:
            # A constant text; the provider kinds (for backend_type) go in as a parameter.
            doc = RawSQL(_PG_DOCUMENT, (json.dumps(kinds),), output_field=TextField())  # noqa: S611
            rows = qs.annotate(doc=doc).values("started_at", "id", "doc")[:chunk_size]
            chunk = cast(list[dict[str, Any]], list(rows))
            for row in chunk:
                yield RawJSON(row["doc"])
        else:
            chunk = list(qs.values(*_RECORD_COLUMNS)[:chunk_size])
            for row in chunk:
                yield lip_record(row, kinds=kinds)
        if len(chunk) < chunk_size:
            return
        last = (chunk[-1]["started_at"], chunk[-1]["id"])
