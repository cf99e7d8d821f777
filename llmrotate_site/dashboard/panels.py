"""The dashboard's panels: each reads what it shows through the apps' selectors (the same the
monitoring API answers from) and returns the context of its partial,
`templates/dashboard/partials/<name>.html`.

A page is a list of panels. It renders them all once; afterwards each panel polls its own URL
(`/dashboard/panels/<name>/` with the page's query) and replaces only itself. The overview's
panels read rollups only, plus a bounded index walk for the recent feed, so that the page stays
fast over 30 days of tens of millions of calls.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from django.conf import settings
from django.http import HttpRequest

from common.timeframes import TimeFrameError, default_bucket
from healthchecks.selectors import (
    KINDS,
    EndpointHealth,
    KindHistory,
    ProbeHistory,
    endpoint_health_list,
    health_history,
)
from keys.selectors import (
    KeyHealth,
    ProviderHealth,
    config_sanitized,
    keys_health,
    pool_health,
)
from llmrotate_site.dashboard.query import DashboardQuery
from usage.conversation_selectors import sessions_by_client
from usage.limit_selectors import MeterUsage, limits_overview
from usage.reconciliation import reconciliation_by_model
from usage.record_selectors import usage_recent_page
from usage.selectors import (
    Stats,
    UsageFilters,
    usage_stats,
    usage_stats_by,
    usage_timeseries,
    usage_totals_by,
)

Context = dict[str, Any]
Builder = Callable[[HttpRequest, DashboardQuery], Context]
RECENT_FEED = 8
CALLS_PER_PAGE = 50
TIMELINE_EVENTS = 8  # per endpoint, the newest in the frame
SPARK_WIDTH, SPARK_HEIGHT = 160, 28  # the viewBox of templates/dashboard/partials/endpoints.html


def _first_request(request: HttpRequest, q: DashboardQuery) -> Context:
    return {"base_url": request.build_absolute_uri("/v1"), "ever_called": q.ever_called}


def _timer(key: KeyHealth) -> datetime | None:
    """The moment the key's current state ends by itself, if it does."""
    return {
        "cooldown": key.cooldown_until,
        "quarantined": key.quarantine_until,
        "exhausted": key.exhausted_until,
    }.get(key.health)


def _key_rows(keys: list[KeyHealth]) -> list[Context]:
    return [{"key": key, "until": _timer(key)} for key in keys]


# --- overview ----------------------------------------------------------------------------------


def _provider_tone(provider: ProviderHealth, endpoint: EndpointHealth | None) -> str:
    """Red when nothing can be routed there (no key available, or the breaker is open), amber
    when some keys are out, green otherwise."""
    if not provider.available or (endpoint is not None and endpoint.breaker_state == "open"):
        return "bad"
    return "ok" if provider.available == provider.total else "warn"


def providers(request: HttpRequest, q: DashboardQuery) -> Context:
    pool = pool_health()
    endpoints = {name: e.health for e in endpoint_health_list() for name in e.health.providers}
    return {
        "pool": pool,
        "providers": [
            {
                "health": provider,
                "endpoint": endpoints.get(provider.provider),
                "states": [(s, n) for s, n in provider.states.items() if n],
                "tone": _provider_tone(provider, endpoints.get(provider.provider)),
            }
            for provider in pool.providers
        ],
    }


def summary(request: HttpRequest, q: DashboardQuery) -> Context:
    stats = usage_stats(frame=q.frame, filters=q.filters, now=q.now)
    errors = sorted(stats.errors_by_type.items(), key=lambda kv: -kv[1])
    context: Context = {"stats": stats, "top_errors": errors[:3], "cost_per_1k": None}
    # A request none of whose attempts could be made (attempt 0) is traffic all the same.
    if stats.requests:
        context["cost_per_1k"] = stats.cost_usd / stats.requests * 1000
    if not (stats.calls or stats.requests):
        context.update(_first_request(request, q))
    return context


def timeseries(request: HttpRequest, q: DashboardQuery) -> Context:
    bucket = default_bucket(q.frame, now=q.now)
    try:
        buckets = usage_timeseries(frame=q.frame, bucket=bucket, filters=q.filters, now=q.now)
    except TimeFrameError as exc:
        return {"error": exc.message}
    chart: Context = {
        "bucket_seconds": int(bucket.total_seconds()),
        "labels": [b.start.isoformat() for b in buckets],
        "successes": [b.totals.successes for b in buckets],
        "errors": [b.totals.errors for b in buckets],
        "tokens": [b.totals.tokens.total for b in buckets],
        "cost": [float(b.totals.cost_usd) for b in buckets],
    }
    # Empty, the charts would be bare 0-1 axes: the page shows what will appear there instead,
    # worded by whether any call was ever made (app.js switches it as the data comes in).
    chart["empty"] = not any(chart["successes"]) and not any(chart["errors"])
    chart["ever_called"] = not chart["empty"] or q.ever_called
    return {"chart": chart}


def models(request: HttpRequest, q: DashboardQuery) -> Context:
    rows = usage_totals_by(
        group=("provider", "requested_model", "operation"),
        frame=q.frame,
        filters=q.filters,
        now=q.now,
    )
    rows.sort(key=lambda kv: -kv[1].calls)
    return {
        "rows": [
            {"provider": p, "model": m, "operation": op, "totals": t} for (p, m, op), t in rows
        ],
        "max_calls": max((t.calls for _, t in rows), default=0),
        "ever_called": bool(rows) or q.ever_called,
    }


def recent(request: HttpRequest, q: DashboardQuery) -> Context:
    page = usage_recent_page(frame=q.frame, filters=q.filters, limit=RECENT_FEED)
    return {"records": page.records, "ever_called": bool(page.records) or q.ever_called}


def reconciliation(request: HttpRequest, q: DashboardQuery) -> Context:
    rows = reconciliation_by_model(frame=q.frame, filters=q.filters, now=q.now)
    return {
        "rows": [{"provider": p, "model": m, "figures": r} for p, m, r in rows],
        "ever_called": bool(rows) or q.ever_called,
    }


def key_table(request: HttpRequest, q: DashboardQuery) -> Context:
    return {"rows": _key_rows(keys_health())}


# --- pages -------------------------------------------------------------------------------------


def key_details(request: HttpRequest, q: DashboardQuery) -> Context:
    keys = keys_health()
    stats = dict(usage_stats_by(group="key_id", frame=q.frame, filters=UsageFilters(), now=q.now))
    rows = _key_rows(keys)
    for row in rows:
        row["stats"] = stats.get(row["key"].key_id, Stats())
        toggle = "enable" if row["key"].health == "disabled" else "disable"
        row["actions"] = (toggle, "reset")
    return {"rows": rows, "can_change": request.user.has_perm("keys.change_apikey")}


def _spark_x(x: float, *, width: int = SPARK_WIDTH) -> str:
    """Where 0..1 along the frame is in the sparkline's box, 2px in from either side."""
    return f"{2 + x * (width - 4):.1f}"


def sparkline(
    points: list[tuple[float, float]], *, width: int = SPARK_WIDTH, height: int = SPARK_HEIGHT
) -> str:
    """SVG polyline points for `points` ((0..1 along the frame, value), oldest first), scaled
    to the box with a 2px inset."""
    if len(points) < 2:
        return ""
    values = [v for _, v in points]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return " ".join(
        f"{_spark_x(x, width=width)},{height - 2 - (v - low) / span * (height - 4):.1f}"
        for x, v in points
    )


def _probe_line(kind: str, history: KindHistory) -> Context:
    return {
        "kind": kind,
        "label": "HTTP" if kind == "http" else "Ping",
        "history": history,
        "points": sparkline(history.points),  # empty for a lone sample: the caption says so
        "failures": [_spark_x(x) for x in history.failures],  # on the same scale as the line
    }


def endpoints(request: HttpRequest, q: DashboardQuery) -> Context:
    """Now: the probes' and the breaker's state. Over the frame: the latency of each probe
    kind, where probes failed, and the newest results."""
    history = health_history(frame=q.frame, now=q.now, timeline=TIMELINE_EVENTS)
    rows = []
    for entry in endpoint_health_list():
        # By the endpoint's id: two endpoints may show the same masked URL.
        h = history.get(entry.endpoint_id, ProbeHistory()) if entry.endpoint_id else ProbeHistory()
        rows.append(
            {
                "endpoint": entry.health,
                "history": h,
                "lines": [_probe_line(kind, h.kinds[kind]) for kind in KINDS],
            }
        )
    return {
        "rows": rows,
        "retention_days": settings.LLMROTATE_HEALTH_EVENT_RETENTION_DAYS,
    }


def calls(request: HttpRequest, q: DashboardQuery) -> Context:
    cursor = request.GET.get("cursor") or None
    context: Context = {"cursor": cursor, "config": config_sanitized()}
    try:
        page = usage_recent_page(
            frame=q.frame, filters=q.filters, limit=CALLS_PER_PAGE, cursor=cursor
        )
    except TimeFrameError as exc:
        return {**context, "error": exc.message, "records": []}
    context.update(records=page.records, next_cursor=page.next_cursor)
    if not page.records and not cursor:
        context.update(_first_request(request, q))
    return context


def clients(request: HttpRequest, q: DashboardQuery) -> Context:
    usage = dict(usage_stats_by(group="client", frame=q.frame, filters=q.filters, now=q.now))
    # config_sanitized() is typed dict[str, object]; its "clients" is a list of dicts.
    entries = cast(list[dict[str, Any]], config_sanitized()["clients"])
    configured = {c["name"]: c for c in entries}
    # Busiest first; configured clients without calls in the frame last, so none is missing.
    names = list(usage) + sorted(set(configured) - set(usage))
    sessions = sessions_by_client(frame=q.frame, filters=q.filters)
    rows = [
        {
            "name": n,
            "stats": usage.get(n),
            "token": configured.get(n),
            "sessions": sessions.get(n),
        }
        for n in names
    ]
    return {
        "rows": rows,
        "total_cost": sum((s.cost_usd for s in usage.values()), start=Decimal(0)),
        "total_requests": sum(s.requests for s in usage.values()),
        "total_calls": sum(s.calls for s in usage.values()),
        "total_sessions": sum(s.unique_sessions for s in sessions.values()),
    }


def _usage_tone(share: float | None) -> str:
    """Amber from 80 % of a limit, red when it is full; grey when nothing could be read."""
    if share is None:
        return "muted"
    return "bad" if share >= 100 else "warn" if share >= 80 else "ok"


def _meter_line(meter: MeterUsage) -> Context:
    return {"meter": meter, "usd": meter.kind == "usd", "tone": _usage_tone(meter.share)}


def _budget_line(spent: float, budget: float | None) -> Context:
    if budget is None:
        return {"spent": spent, "budget": None, "share": None, "tone": "muted"}
    share = min(100.0, spent / budget * 100) if budget > 0 else 100.0
    return {"spent": spent, "budget": budget, "share": share, "tone": _usage_tone(share)}


def limits(request: HttpRequest, q: DashboardQuery) -> Context:
    """Now, not over the frame: every limit in its current window, the keys' own limits and
    each client's spend this day and month against its budget."""
    overview = limits_overview(now=q.now)
    rows = []
    for limit in overview.limits:
        lines = [_meter_line(m) for m in limit.meters]
        concurrency = limit.concurrency
        if concurrency is not None:
            share = (
                None
                if concurrency.in_flight is None
                else min(100.0, concurrency.in_flight / concurrency.limit * 100)
            )
            lines.append({"concurrency": concurrency, "tone": _usage_tone(share), "share": share})
        rows.append({"limit": limit, "lines": lines})
    return {
        "overview": overview,
        "rows": rows,
        "keys": [
            {"key": key, "lines": [_meter_line(m) for m in key.meters]} for key in overview.keys
        ],
        "clients": [
            {
                "spend": c,
                "day": _budget_line(c.spend_day, c.budget_day),
                "month": _budget_line(c.spend_month, c.budget_month),
            }
            for c in overview.clients
        ],
        "configured": bool(overview.limits or overview.keys),
    }


# name -> builder; the partial is templates/dashboard/partials/<name>.html.
PANELS: dict[str, Builder] = {
    "providers": providers,
    "summary": summary,
    "timeseries": timeseries,
    "models": models,
    "recent": recent,
    "reconciliation": reconciliation,
    "key_table": key_table,
    "key_details": key_details,
    "endpoints": endpoints,
    "calls": calls,
    "clients": clients,
    "limits": limits,
}
