"""LLM Interactive Proxy's monitoring endpoints under its own paths (`/v1/usage/stats`,
`/v1/usage/recent`, `/v1/usage/export`), so that its users' scripts work unchanged.

Thin adapters over usage.lip_selectors, behind the monitoring API's auth (a staff session or a
`monitor` token). Unlike LIP, a parameter we do not know is refused (422, naming the accepted
ones) rather than ignored: a misspelt filter would otherwise silently widen the answer.
Reference: docs/monitoring-api.md, "LLM Interactive Proxy's endpoints".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, StreamingHttpResponse
from django.utils import timezone
from ninja import Query, Router, Schema

from common.errors import QUERY_ERRORS, invalid_request
from common.timeframes import TimeFrame, TimeFrameError, parse_timestamp
from keys.auth import monitor_auth
from usage import lip_selectors
from usage.export import iterate_async
from usage.lip_schemas import (
    LipExportOut,
    LipExportQuery,
    LipFilterQuery,
    LipRecentOut,
    LipRecentQuery,
    LipStatsOut,
    LipStatsQuery,
    TimingStatsOut,
)
from usage.lip_selectors import ExportPlan, LipStats

router = Router(tags=["LLM Interactive Proxy compatibility"], auth=monitor_auth)


def known_only(request: HttpRequest, query: type[Schema]) -> None:
    accepted = list(query.model_fields)
    unknown = sorted(set(request.GET) - set(accepted))
    if unknown:
        raise invalid_request(
            f"Unknown query parameter {', '.join(unknown)}; accepted: {', '.join(accepted)}.",
            code="unknown_parameter",
            param=unknown[0],
        )


def lip_frame(start_date: str | None, end_date: str | None) -> TimeFrame:
    try:
        since = parse_timestamp(start_date, param="start_date") if start_date else None
        end = parse_timestamp(end_date, param="end_date") if end_date else None
    except TimeFrameError as exc:
        raise invalid_request(exc.message, code="invalid_parameter", param=exc.param) from None
    if since is not None and end is not None and since > end:
        raise invalid_request(
            "start_date must not be after end_date.", code="invalid_parameter", param="start_date"
        )
    # end_date is inclusive, as in LIP; our frames end before `until`.
    return TimeFrame(since=since, until=end + timedelta(microseconds=1) if end else None)


def _filters(q: LipFilterQuery) -> lip_selectors.LipFilters:
    return lip_selectors.lip_filters(
        backend_type=q.backend_type, model=q.model, http_status_code=q.http_status_code,
        user_agent=q.user_agent, session_id=q.session_id, proxy_user=q.proxy_user,
    )  # fmt: skip


def _given(q: Schema) -> dict[str, Any]:
    return {name: value for name, value in q.model_dump().items() if value is not None}


def _timing_out(stats: LipStats, name: str) -> TimingStatsOut | None:
    timing = stats.timings.get(name)
    return TimingStatsOut(**asdict(timing)) if timing is not None else None


@router.get(
    "/stats",
    response={200: LipStatsOut, **QUERY_ERRORS},
    summary="Aggregated usage (LLM Interactive Proxy's GET /v1/usage/stats)",
)
def lip_usage_stats(request: HttpRequest, q: Query[LipStatsQuery]) -> dict[str, Any]:
    known_only(request, LipStatsQuery)
    frame = lip_frame(q.start_date, q.end_date)
    filters = _filters(q)
    stats = lip_selectors.lip_stats(frame=frame, filters=filters, now=timezone.now())
    return {
        "request_count": stats.request_count,
        "response_count": stats.response_count,
        "attempt_count": stats.attempt_count,
        "unique_sessions": stats.unique_sessions,
        "total_turns": stats.total_turns,
        "total_prompt_tokens": stats.total_prompt_tokens,
        "total_completion_tokens": stats.total_completion_tokens,
        "total_tokens": stats.total_tokens,
        "backend_reported_total_tokens": stats.backend_reported_total_tokens,
        "counted_prompt_tokens": stats.counted_prompt_tokens,
        "forwarded_prompt_tokens": stats.forwarded_prompt_tokens,
        "reconciled_reported_prompt_tokens": stats.reconciled_reported_prompt_tokens,
        "reconciled_counted_prompt_tokens": stats.reconciled_counted_prompt_tokens,
        "total_cost": stats.total_cost,
        "tokens_per_session": stats.tokens_per_session,
        "completion_tokens_per_second": stats.per_second(stats.total_completion_tokens),
        "total_tokens_per_second": stats.per_second(stats.total_tokens),
        "total_tool_calls": stats.total_tool_calls,
        "status_code_counts": stats.status_code_counts,
        "filters": _given(q),
        "time_window_seconds": stats.time_window_seconds,
        "window_start": stats.window_start.isoformat() if stats.window_start else None,
        "ttft_stats": _timing_out(stats, "ttft"),
        "proxy_processing_stats": _timing_out(stats, "proxy_processing"),
        "duration_stats": _timing_out(stats, "duration"),
        "ttlt_stats": _timing_out(stats, "ttlt"),
    }


@router.get(
    "/recent",
    response={200: LipRecentOut, **QUERY_ERRORS},
    summary="Requests, newest first (LLM Interactive Proxy's GET /v1/usage/recent)",
)
def lip_usage_recent(request: HttpRequest, q: Query[LipRecentQuery]) -> dict[str, Any]:
    known_only(request, LipRecentQuery)
    page = lip_selectors.lip_recent(
        filters=_filters(q),
        frame=lip_frame(q.start_date, q.end_date),
        limit=q.limit,
        offset=q.offset,
        now=timezone.now(),
    )
    return {"records": page.records, "total": page.total, "limit": q.limit, "offset": q.offset}


def _export_chunks(plan: ExportPlan, *, head: dict[str, Any]) -> Iterator[str]:
    encoder = DjangoJSONEncoder(ensure_ascii=False)
    yield encoder.encode(head)[:-1] + ', "records": ['
    separator = ""
    batch: list[str] = []
    for record in lip_selectors.lip_export_records(plan):
        text = record if isinstance(record, lip_selectors.RawJSON) else encoder.encode(record)
        batch.append(separator + text)
        separator = ", "
        # A piece per few hundred records: few enough hand-offs, little memory.
        if len(batch) >= 200:
            yield "".join(batch)
            batch = []
    batch.append("]}\n")
    yield "".join(batch)


@router.get(
    "/export",
    response={200: LipExportOut, **QUERY_ERRORS},
    summary="Every matching request, oldest first, streamed (LLM Interactive Proxy's "
    "GET /v1/usage/export)",
)
def lip_usage_export(request: HttpRequest, q: Query[LipExportQuery]) -> StreamingHttpResponse:
    known_only(request, LipExportQuery)
    frame = lip_frame(q.start_date, q.end_date)
    plan = lip_selectors.lip_export_plan(filters=_filters(q), frame=frame)
    now: datetime = timezone.now()
    head = {
        "version": 1,
        "exported_at": now.isoformat(),
        "record_count": plan.record_count,
        "filters": _given(q),
    }
    chunks = _export_chunks(plan, head=head)
    # Under ASGI a sync iterator would be read whole into memory first; see iterate_async.
    content = iterate_async(chunks) if isinstance(request, ASGIRequest) else chunks
    return StreamingHttpResponse(content, content_type="application/json")
