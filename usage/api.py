"""The usage and monitoring API (`/api/usage…`, `/api/events`, `/api/requests/…`, `/api/limits`).

Thin adapters: parse the query, call one selector, shape the answer. All GET, all read-only,
all behind `monitor_auth` (a staff session or a client token with the `monitor` scope).
Reference with examples: docs/monitoring-api.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import Http404, HttpRequest, StreamingHttpResponse
from django.utils import timezone
from ninja import Query, Router

from common.errors import AUTH_ERRORS, QUERY_ERRORS, ErrorOut, invalid_request
from common.timeframes import (
    TimeFrame,
    TimeFrameError,
    default_bucket,
    parse_bucket,
    timeframe_parse,
)
from keys.auth import monitor_auth
from keys.models import ClientToken
from usage import conversation_selectors, record_selectors, selectors
from usage.conversation_selectors import SessionStats
from usage.export import CONTENT_TYPES, export_filename, iterate_async, usage_export
from usage.filters import RECORD_ONLY_FILTERS, UsageFilters
from usage.limit_selectors import LimitsOverview, MeterUsage, limits_overview
from usage.reconciliation import (
    ModelColumn,
    Reconciliation,
    reconciliation_by_model,
    reconciliation_of,
    reconciliation_sum,
)
from usage.schemas import (
    ClientsOut,
    EventsOut,
    EventsQuery,
    ExportQuery,
    FilterQuery,
    LimitsOut,
    ModelsOut,
    ModelsQuery,
    OperationsOut,
    PlainText,
    RecentOut,
    RecentQuery,
    ReconciliationByModelOut,
    ReconciliationQuery,
    RequestOut,
    TimeFrameQuery,
    TimeseriesOut,
    TimeseriesQuery,
    UsageOut,
    UsageStatsOut,
)
from usage.selectors import Stats, Totals

router = Router(tags=["Monitoring"], auth=monitor_auth)


def query_frame(
    q: TimeFrameQuery, *, now: datetime, default_window: str | None = None
) -> TimeFrame:
    try:
        return timeframe_parse(
            window=q.window, since=q.since, until=q.until, now=now, default_window=default_window
        )
    except TimeFrameError as exc:
        raise invalid_request(exc.message, code="invalid_parameter", param=exc.param) from None


def _filters(q: FilterQuery) -> UsageFilters:
    # Record-only filters exist on the raw-record queries alone (RecordFilterQuery).
    record_only: dict[str, Any] = {name: getattr(q, name, None) for name in RECORD_ONLY_FILTERS}
    return UsageFilters(
        provider=q.provider, model=q.model, key=q.key, client=q.client, status=q.status,
        stream=q.stream, upstream_model=q.upstream_model, client_status=q.http_status,
        operation=q.operation, **record_only,
    )  # fmt: skip


def _rollup_filters(request: HttpRequest, q: FilterQuery) -> UsageFilters:
    """The filters of an analytics endpoint, refusing those only raw records can apply:
    silently ignoring one would answer for every session (caller) instead of the one asked."""
    for name in RECORD_ONLY_FILTERS:
        if name in request.GET:
            raise invalid_request(
                f"{name}: not available here, the analytics endpoints read rollups, which do "
                f"not carry it. It filters /api/usage/recent, /api/events and "
                f"/api/usage/export.",
                code="invalid_parameter",
                param=name,
            )
    return _filters(q)


def _frame_out(frame: TimeFrame) -> dict[str, Any]:
    return {"since": frame.since, "until": frame.until}


def _reconciliation_out(figures: Reconciliation) -> dict[str, Any]:
    return {
        "counted_prompt_tokens": figures.counted_prompt_tokens,
        "forwarded_prompt_tokens": figures.forwarded_prompt_tokens,
        "backend_reported_total_tokens": figures.backend_reported_total_tokens,
        "compared_reported_prompt_tokens": figures.compared_reported_prompt_tokens,
        "compared_counted_prompt_tokens": figures.compared_counted_prompt_tokens,
        "difference_tokens": figures.difference_tokens,
        "difference_percent": figures.difference_percent,
    }


def _stats_out(stats: Stats) -> dict[str, Any]:
    return {
        "calls": stats.calls,
        "requests": stats.requests,
        "successes": stats.successes,
        "errors": stats.errors,
        "success_rate": stats.success_rate,
        "error_rate": stats.error_rate,
        "errors_by_type": stats.errors_by_type,
        "status_code_counts": {str(code): n for code, n in stats.status_code_counts.items()},
        "tokens": stats.tokens,
        "reconciliation": _reconciliation_out(reconciliation_of(stats.tokens)),
        "cost_usd": float(stats.cost_usd),
        "tool_calls": stats.tool_calls,
        "ttft_stats": stats.ttft,
        "ttlt_stats": stats.ttlt,
        "duration_stats": stats.duration,
        "overhead_stats": stats.overhead,
        "tokens_per_second_stats": stats.tokens_per_second,
        "streamed_tokens_per_second_stats": stats.tokens_per_second_streamed,
        "unstreamed_tokens_per_second_stats": stats.tokens_per_second_unstreamed,
    }


def _provider_out(provider: str, totals: Totals) -> dict[str, Any]:
    return {
        "provider": provider,
        "calls": totals.calls,
        "requests": totals.requests,
        "successes": totals.successes,
        "errors": totals.errors,
        "prompt_tokens": totals.tokens.prompt,
        "completion_tokens": totals.tokens.completion,
        "total_tokens": totals.tokens.total,
        "estimated_cost_usd": float(totals.cost_usd),
    }


@router.get(
    "/usage",
    response={200: UsageOut, **QUERY_ERRORS},
    summary="Calls, tokens and cost per provider",
)
def usage_by_provider(request: HttpRequest, q: Query[FilterQuery]) -> dict[str, Any]:
    now = timezone.now()
    frame = query_frame(q, now=now)
    rows = selectors.usage_totals_by(
        group=("provider",), frame=frame, filters=_rollup_filters(request, q), now=now
    )
    total = Totals()
    for _, totals in rows:
        total.calls += totals.calls
        total.requests += totals.requests
        total.successes += totals.successes
        total.errors += totals.errors
        total.tokens.prompt += totals.tokens.prompt
        total.tokens.completion += totals.tokens.completion
        total.tokens.total += totals.tokens.total
        total.cost_usd += totals.cost_usd
    return {
        **_frame_out(frame),
        "providers": [_provider_out(key[0], totals) for key, totals in rows],
        "total": _provider_out("*", total),
    }


@router.get(
    "/usage/models",
    response={200: ModelsOut, **QUERY_ERRORS},
    summary="The same figures per provider and model (requested or upstream)",
)
def usage_by_model(request: HttpRequest, q: Query[ModelsQuery]) -> dict[str, Any]:
    now = timezone.now()
    frame = query_frame(q, now=now)
    column: ModelColumn = "upstream_model" if q.by == "upstream_model" else "requested_model"
    rows = selectors.usage_totals_by(
        group=("provider", column), frame=frame, filters=_rollup_filters(request, q), now=now
    )
    models = [
        {
            "provider": provider,
            "model": model,
            "calls": totals.calls,
            "requests": totals.requests,
            "successes": totals.successes,
            "errors": totals.errors,
            "total_tokens": totals.tokens.total,
            "estimated_cost_usd": float(totals.cost_usd),
        }
        for (provider, model), totals in rows
    ]
    return {**_frame_out(frame), "by": q.by, "models": models}


@router.get(
    "/usage/reconciliation",
    response={200: ReconciliationByModelOut, **QUERY_ERRORS},
    summary="Prompt tokens counted here vs reported upstream, per provider and model",
)
def usage_reconciliation(request: HttpRequest, q: Query[ReconciliationQuery]) -> dict[str, Any]:
    now = timezone.now()
    frame = query_frame(q, now=now)
    column: ModelColumn = "requested_model" if q.by == "model" else "upstream_model"
    filters = _rollup_filters(request, q)
    rows = reconciliation_by_model(frame=frame, filters=filters, now=now, by=column)
    total = reconciliation_sum(figures for _, _, figures in rows)
    return {
        **_frame_out(frame),
        "by": q.by,
        "models": [
            {"provider": provider, "model": model, **_reconciliation_out(figures)}
            for provider, model, figures in rows
        ],
        "total": _reconciliation_out(total),
    }


@router.get(
    "/usage/timeseries",
    response={200: TimeseriesOut, **QUERY_ERRORS},
    summary="Calls, errors, tokens and cost per bucket",
)
def usage_timeseries(request: HttpRequest, q: Query[TimeseriesQuery]) -> dict[str, Any]:
    now = timezone.now()
    frame = query_frame(q, now=now, default_window="24h")
    try:
        bucket = parse_bucket(q.bucket) if q.bucket else default_bucket(frame, now=now)
        buckets = selectors.usage_timeseries(
            frame=frame, bucket=bucket, filters=_rollup_filters(request, q), now=now
        )
    except TimeFrameError as exc:
        raise invalid_request(exc.message, code="invalid_parameter", param=exc.param) from None
    return {
        **_frame_out(frame),
        "bucket_seconds": int(bucket / timedelta(seconds=1)),
        "buckets": [
            {
                "start": b.start,
                "calls": b.totals.calls,
                "requests": b.totals.requests,
                "errors": b.totals.errors,
                "prompt_tokens": b.totals.tokens.prompt,
                "completion_tokens": b.totals.tokens.completion,
                "total_tokens": b.totals.tokens.total,
                "cost_usd": float(b.totals.cost_usd),
            }
            for b in buckets
        ],
    }


@router.get(
    "/usage/stats",
    response={200: UsageStatsOut, **QUERY_ERRORS},
    summary="Counts, rates, tokens, cost, latency",
)
def usage_stats(request: HttpRequest, q: Query[FilterQuery]) -> dict[str, Any]:
    now = timezone.now()
    frame = query_frame(q, now=now)
    filters = _rollup_filters(request, q)
    stats = selectors.usage_stats(frame=frame, filters=filters, now=now)
    sessions: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    if not filters.conversation_unsupported():
        figures = conversation_selectors.sessions_stats(frame=frame, filters=filters)
        sessions = {
            "unique_sessions": figures.unique_sessions,
            "total_turns": figures.total_turns,
            "requests": figures.requests,
            "total_tokens": figures.total_tokens,
            "tokens_per_session": figures.tokens_per_session,
        }
        tools = [
            {"name": name, "calls": calls}
            for name, calls in conversation_selectors.tool_calls_by_name(
                frame=frame, filters=filters
            )
        ]
    return {**_frame_out(frame), **_stats_out(stats), "sessions": sessions, "tools": tools}


def _sessions_of(sessions: dict[str, SessionStats], client: str) -> int:
    found = sessions.get(client)
    return found.unique_sessions if found else 0


@router.get(
    "/usage/clients",
    response={200: ClientsOut, **QUERY_ERRORS},
    summary="The same figures per client token",
)
def usage_clients(request: HttpRequest, q: Query[FilterQuery]) -> dict[str, Any]:
    now = timezone.now()
    frame = query_frame(q, now=now)
    filters = _rollup_filters(request, q)
    rows = selectors.usage_stats_by(group="client", frame=frame, filters=filters, now=now)
    tokens = {t.name: t.masked for t in ClientToken.objects.filter(name__in=[n for n, _ in rows])}
    sessions: dict[str, SessionStats] | None = None
    if not filters.conversation_unsupported():
        sessions = conversation_selectors.sessions_by_client(frame=frame, filters=filters)
    clients = [
        {
            "client": name,
            "token": tokens.get(name),
            "unique_sessions": None if sessions is None else _sessions_of(sessions, name),
            **_stats_out(stats),
        }
        for name, stats in rows
    ]
    return {**_frame_out(frame), "clients": clients}


@router.get(
    "/usage/operations",
    response={200: OperationsOut, **QUERY_ERRORS},
    summary="The same figures per call kind (chat, responses, text_completion, embeddings)",
)
def usage_operations(request: HttpRequest, q: Query[FilterQuery]) -> dict[str, Any]:
    now = timezone.now()
    frame = query_frame(q, now=now)
    filters = _rollup_filters(request, q)
    rows = selectors.usage_stats_by(group="operation", frame=frame, filters=filters, now=now)
    operations = [{"operation": name, **_stats_out(stats)} for name, stats in rows]
    return {**_frame_out(frame), "operations": operations}


@router.get(
    "/usage/recent",
    response={200: RecentOut, **QUERY_ERRORS},
    summary="Call records, newest first, paginated",
)
def usage_recent(request: HttpRequest, q: Query[RecentQuery]) -> dict[str, Any]:
    frame = query_frame(q, now=timezone.now())
    try:
        page = record_selectors.usage_recent_page(
            frame=frame, filters=_filters(q), limit=q.limit, cursor=q.cursor
        )
    except TimeFrameError as exc:
        raise invalid_request(exc.message, code="invalid_parameter", param=exc.param) from None
    return {"records": page.records, "next_cursor": page.next_cursor}


@router.get(
    "/events", response={200: EventsOut, **QUERY_ERRORS}, summary="Recent call records, newest last"
)
def events(request: HttpRequest, q: Query[EventsQuery]) -> dict[str, Any]:
    frame = query_frame(q, now=timezone.now())
    return {
        "events": record_selectors.usage_events(frame=frame, filters=_filters(q), limit=q.limit)
    }


@router.get(
    "/requests/{request_id}",
    response={200: RequestOut, 404: ErrorOut, **QUERY_ERRORS},
    summary="Every attempt of one request",
)
def request_detail(request: HttpRequest, request_id: PlainText) -> dict[str, Any]:
    attempts = record_selectors.request_attempts(request_id=request_id)
    if not attempts:
        raise Http404
    path = [
        f"{a['provider'] or '-'}/{a['key_id'] or '-'} ({a['upstream_model'] or '-'}): "
        f"{a['outcome']}"
        for a in attempts
    ]
    return {
        "request_id": request_id,
        "attempts": attempts,
        "path": path,
        "final_outcome": attempts[-1]["outcome"],
    }


@router.get(
    "/usage/export",
    summary="Download call records (CSV, JSON Lines or JSON), streamed",
    response={200: None, **QUERY_ERRORS},
    openapi_extra={
        "responses": {
            200: {
                "description": "The records, oldest first, streamed as they are read.",
                "content": {ctype.split(";")[0]: {} for ctype in CONTENT_TYPES.values()},
            }
        }
    },
)
def usage_export_download(request: HttpRequest, q: Query[ExportQuery]) -> StreamingHttpResponse:
    now = timezone.now()
    frame = query_frame(q, now=now)
    chunks: Iterator[str] = usage_export(frame=frame, filters=_filters(q), fmt=q.format)
    # Under ASGI a sync iterator would be read whole into memory first; see iterate_async.
    content = iterate_async(chunks) if isinstance(request, ASGIRequest) else chunks
    response = StreamingHttpResponse(content, content_type=CONTENT_TYPES[q.format])
    response["Content-Disposition"] = (
        f'attachment; filename="{export_filename(fmt=q.format, now=now)}"'
    )
    return response


def _meters_out(meters: tuple[MeterUsage, ...]) -> list[dict[str, Any]]:
    return [
        {
            "kind": m.kind,
            "period": m.period,
            "limit": m.limit,
            "used": m.used,
            "remaining": m.remaining,
            "resets_at": m.resets_at,
        }
        for m in meters
    ]


def _limits_out(overview: LimitsOverview) -> dict[str, Any]:
    return {
        "time_zone": overview.time_zone,
        "limits": [
            {
                "id": limit.id,
                "client": limit.client,
                "route": limit.route,
                "meters": _meters_out(limit.meters),
                "concurrency": None
                if limit.concurrency is None
                else {"limit": limit.concurrency.limit, "in_flight": limit.concurrency.in_flight},
            }
            for limit in overview.limits
        ],
        "keys": [
            {"key_id": k.key_id, "provider": k.provider, "meters": _meters_out(k.meters)}
            for k in overview.keys
        ],
        "clients": [
            {
                "client": c.client,
                "spend_usd": {"day": c.spend_day, "month": c.spend_month},
                "budget_usd": {"day": c.budget_day, "month": c.budget_month},
            }
            for c in overview.clients
        ],
        "store_error": overview.store_error,
    }


@router.get(
    "/limits",
    response={200: LimitsOut, **AUTH_ERRORS},
    summary="Every limit and budget with what is used of it now",
)
def limits(request: HttpRequest) -> dict[str, Any]:
    return _limits_out(limits_overview(now=timezone.now()))
