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
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from django.conf import settings
from django.http import HttpRequest
from django.utils.translation import gettext as _

from common.timeframes import TimeFrameError
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
from llmrotate_site.dashboard.templatetags.dashboard import MINUS, NONE, label, ms, number, pct, usd
from usage.conversation_selectors import sessions_by_client
from usage.limit_selectors import MeterUsage, limits_overview
from usage.reconciliation import reconciliation_by_model
from usage.record_selectors import usage_recent_page
from usage.replacement_selectors import (
    MIN_SAMPLE,
    ArmFigures,
    Interval,
    RuleMetrics,
    replacement_activation,
    replacement_metrics,
)
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
    bucket = q.bucket
    try:
        buckets = usage_timeseries(
            frame=q.chart_frame, bucket=bucket, filters=q.filters, now=q.now, zone=q.bucket_zone
        )
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
        "label": "HTTP" if kind == "http" else _("Ping"),
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


# --- experiments -------------------------------------------------------------------------------


def _signed(value: float | None, unit: str = "", digits: int = 1) -> str:
    """A difference with its sign always shown (+12 ms), a decrease with a true minus sign
    (U+2212), as signed_percent writes them."""
    if value is None:
        return NONE
    if round(value, digits) == 0:
        return f"0{unit}"
    sign = "+" if value > 0 else MINUS
    return f"{sign}{number(abs(value), digits)}{unit}"


def _signed_usd(value: float | None) -> str:
    """A cost difference: usd()'s precision, with its sign."""
    if value is None:
        return NONE
    if value == 0:
        return "$0"
    return ("+" if value > 0 else MINUS) + usd(abs(value))


def _points(value: float | None) -> str:
    """A difference of two rates in percentage points."""
    if value is None:
        return NONE
    return _("%(difference)s points") % {"difference": _signed(value * 100)}


def _interval(i: Interval, fmt: Callable[[float | None], str]) -> str:
    if i.low is None or i.high is None:
        return ""
    return _("%(low)s to %(high)s") % {"low": fmt(i.low), "high": fmt(i.high)}


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _effect_row(
    key: str,
    label: str,
    replaced: str,
    control: str,
    difference: str = "",
    interval: str = "",
    *,
    significant: bool = False,
) -> Context:
    return {
        "key": key,
        "label": label,
        "replaced": replaced,
        "control": control,
        "difference": difference,
        "interval": interval,
        "significant": significant,
    }


def _decimal(value: float | None, digits: int) -> str:
    return NONE if value is None else number(value, digits, grouping=True)


def _effectiveness(m: RuleMetrics) -> list[Context]:
    """The side-by-side table: replaced against not replaced (control), a row per figure, with
    the difference (replaced minus not replaced) and, where the selector gives one, its 95 %
    interval. The error rate's interval is the success rate's, negated: one is 1 minus the
    other in both arms."""
    a, b = m.replaced_arm, m.control_arm
    s, c = m.success_rate_difference, m.cost_per_request_difference
    negated = Interval(
        difference=None if s.difference is None else -s.difference,
        low=None if s.high is None else -s.high,
        high=None if s.low is None else -s.low,
    )
    rows = [
        _effect_row("requests", _("Requests"), _decimal(a.requests, 0), _decimal(b.requests, 0)),
        _effect_row(
            "success_rate", _("Success rate"), pct(a.success_rate), pct(b.success_rate),
            _points(s.difference), _interval(s, _points), significant=s.significant,
        ),
        _effect_row(
            "error_rate", _("Error rate"), pct(a.error_rate), pct(b.error_rate),
            _points(negated.difference), _interval(negated, _points),
            significant=negated.significant,
        ),
    ]  # fmt: skip
    outcomes = sorted(set(a.errors_by_outcome) | set(b.errors_by_outcome))
    for outcome in outcomes:
        na, nb = a.errors_by_outcome.get(outcome, 0), b.errors_by_outcome.get(outcome, 0)
        ra = na / a.requests if a.requests else None
        rb = nb / b.requests if b.requests else None
        rows.append(
            _effect_row(
                f"errors:{outcome}", f"· {label(outcome)}",
                f"{pct(ra)} ({_decimal(na, 0)})", f"{pct(rb)} ({_decimal(nb, 0)})",
                _points(_minus(ra, rb)),
            )
        )  # fmt: skip
    for key, name, metric in (
        ("latency_p50", _("Latency p50"), "latency.p50"),
        ("latency_p95", _("Latency p95"), "latency.p95"),
        ("ttft_p50", _("TTFT p50"), "ttft.p50"),
        ("ttft_p95", _("TTFT p95"), "ttft.p95"),
    ):
        stats, quantile = metric.split(".")
        va = getattr(getattr(a, stats), quantile)
        vb = getattr(getattr(b, stats), quantile)
        rows.append(_effect_row(key, name, ms(va), ms(vb), _signed(_minus(va, vb), " ms", 0)))
    tokens_a, tokens_b = a.per_request(a.completion_tokens), b.per_request(b.completion_tokens)
    tools_a, tools_b = a.per_request(a.tool_calls), b.per_request(b.tool_calls)
    cost_a, cost_b = a.per_request(a.cost_usd), b.per_request(b.cost_usd)
    rows += [
        _effect_row(
            "completion_tokens_per_request", _("Completion tokens per request"),
            _decimal(tokens_a, 1), _decimal(tokens_b, 1), _signed(_minus(tokens_a, tokens_b)),
        ),
        _effect_row(
            "cost_per_request", _("Cost per request"), usd(cost_a), usd(cost_b),
            _signed_usd(c.difference), _interval(c, _signed_usd), significant=c.significant,
        ),
        _effect_row(
            "tool_calls_per_request", _("Tool calls per request"),
            _decimal(tools_a, 2), _decimal(tools_b, 2), _signed(_minus(tools_a, tools_b), "", 2),
        ),
    ]  # fmt: skip
    return rows


def _answered_by(arm: ArmFigures) -> list[tuple[str, int]]:
    return sorted(arm.answered_by.items(), key=lambda kv: (-kv[1], kv[0]))


def _activation_chart(m: RuleMetrics, q: DashboardQuery, bucket: timedelta) -> Context:
    points = replacement_activation(
        rule=m.rule, frame=q.chart_frame, bucket=bucket, now=q.now, zone=q.bucket_zone
    )
    eligible = [p.eligible for p in points]
    return {
        "bucket_seconds": int(bucket.total_seconds()),
        "labels": [p.start.isoformat() for p in points],
        "eligible": eligible,
        "replaced": [p.replaced for p in points],
        "empty": not any(eligible),
    }


def _rule_state(m: RuleMetrics, now: datetime) -> tuple[str, str]:
    """(tone, words): whether the rule applies now. Enabled is not enough: its time window
    may not have begun, or be over."""
    if m.deleted:
        return "muted", _("deleted")
    if not m.enabled:
        return "muted", _("disabled")
    if m.active_from is not None and now < m.active_from:
        return "info", _("scheduled")
    if m.active_until is not None and now >= m.active_until:
        return "muted", _("ended")
    return "ok", _("active")


def experiments(request: HttpRequest, q: DashboardQuery) -> Context:
    """Every replacement rule in the frame (and rules since deleted whose requests are in it):
    its activation, per bucket as the overview's charts, the turns at which sessions were
    first replaced, and replaced against not replaced, side by side."""
    bucket = q.bucket
    try:
        metrics = replacement_metrics(frame=q.frame, now=q.now)
        rules = []
        for m in metrics:
            turns = sorted(m.first_turns.items())
            rules.append(
                {
                    "m": m,
                    "state": _rule_state(m, q.now),
                    "chart": _activation_chart(m, q, bucket),
                    "chart_id": f"activation-data-{m.rule}",
                    "turns": turns,
                    "turns_max": max((n for _, n in turns), default=0),
                    "turns_total": sum(n for _, n in turns),
                    "effectiveness": _effectiveness(m),
                    "answered_by": {
                        "replaced": _answered_by(m.replaced_arm),
                        "control": _answered_by(m.control_arm),
                    },
                }
            )
    except TimeFrameError as exc:
        return {"error": exc.message, "rules": [], "configured": True, "min_sample": MIN_SAMPLE}
    # Every configured rule is listed, in the frame or not (and a deleted one while its
    # requests are in the frame): no rules means none was ever set up, or none is left.
    return {"rules": rules, "configured": bool(rules), "min_sample": MIN_SAMPLE}


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
    "experiments": experiments,
}
