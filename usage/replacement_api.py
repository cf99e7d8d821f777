"""Replacement experiment metrics: `GET /api/replacement/metrics` (our time-frame parameters)
and `GET /v1/replacement/metrics` (the path LLM Interactive Proxy's documentation promises,
with its `start_date` / `end_date`). One body for both, behind the monitoring API's auth.
Reference: docs/replacement.md; figures from usage.replacement_selectors (rollups only).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from ninja import Field, Query, Router, Schema

from common.errors import QUERY_ERRORS
from common.timeframes import TimeFrame
from keys.auth import monitor_auth
from usage.api import query_frame
from usage.lip_api import known_only, lip_frame
from usage.lip_schemas import LIP_END, LIP_START
from usage.replacement_selectors import ArmFigures, Interval, RuleMetrics, replacement_metrics
from usage.schemas import PlainText, TimeFrameQuery, Timestamp

router = Router(tags=["Monitoring"], auth=monitor_auth)
lip_router = Router(tags=["LLM Interactive Proxy compatibility"], auth=monitor_auth)

_RULE = "Only this replacement rule (its name)."
_ROUTE = "Only the rules of this route."


class ReplacementQuery(TimeFrameQuery):
    rule: PlainText | None = Field(None, description=_RULE)
    route: PlainText | None = Field(None, description=_ROUTE)


class LipReplacementQuery(Schema):
    start_date: Timestamp | None = Field(None, description=LIP_START)
    end_date: Timestamp | None = Field(None, description=LIP_END)
    rule: PlainText | None = Field(None, description=_RULE)
    route: PlainText | None = Field(None, description=_ROUTE)


class PercentilesOut(Schema):
    p50: float | None
    p95: float | None


class ArmOut(Schema):
    requests: int = Field(description="Requests in this arm (one final record each).")
    successes: int
    success_rate: float | None
    error_rate: float | None
    errors_by_outcome: dict[str, int] = Field(description="outcome → failed requests.")
    latency_ms: PercentilesOut = Field(description="Request latency (±9 %: histograms).")
    ttft_ms: PercentilesOut = Field(description="Time to first token of streamed requests.")
    completion_tokens: int
    completion_tokens_per_request: float | None
    cost_usd: float
    cost_per_request_usd: float | None
    unpriced_requests: int = Field(
        description="Requests without a known cost (an unpriced model, usage awaiting "
        "review): left out of cost_usd; while any, no cost interval is given."
    )
    tool_calls: int
    tool_calls_per_request: float | None
    answered_by: dict[str, int] = Field(
        description="provider/model → requests answered there (fallbacks show the route's own)."
    )


class DifferenceOut(Schema):
    difference: float | None = Field(description="Replaced minus not replaced.")
    low: float | None
    high: float | None
    confidence: float = 0.95


class EffectivenessOut(Schema):
    replaced: ArmOut
    not_replaced: ArmOut = Field(description="The control group: drew 'not replaced'.")
    success_rate_difference: DifferenceOut = Field(
        description="Newcombe's hybrid score interval of the difference in success rate."
    )
    cost_per_request_difference: DifferenceOut = Field(
        description="Welch's normal interval of the difference in cost per request (USD)."
    )
    sample_too_small: bool = Field(description="Fewer than 30 requests in either arm.")
    summary: str = Field(description="What the figures allow to say, in one or two sentences.")


class OptOutsOut(Schema):
    header: int = Field(description="Eligible requests that asked not to be replaced.")
    token: int = Field(description="Eligible requests whose client token is never replaced.")


class TurnOut(Schema):
    turn: int
    requests: int


class RuleMetricsOut(Schema):
    rule: str
    route: str
    target: str
    probability: float
    stickiness: str
    enabled: bool
    eligible: int = Field(description="Requests that met the rule's conditions.")
    replaced: int
    control: int
    activation_rate: float | None = Field(description="replaced / eligible.")
    opt_outs: OptOutsOut
    sessions_replaced: int = Field(description="Distinct sessions replaced (±3 %: sketches).")
    first_replacement_turns: list[TurnOut] = Field(
        description="Turns at which sessions were first replaced (docs/replacement.md)."
    )
    effectiveness: EffectivenessOut


class ReplacementMetricsOut(Schema):
    since: Any = Field(description="Start of the frame; null: all time.")
    until: Any = Field(description="End of the frame (exclusive); null: now.")
    rules: list[RuleMetricsOut]


def _arm_out(arm: ArmFigures) -> dict[str, Any]:
    return {
        "requests": arm.requests,
        "successes": arm.successes,
        "success_rate": arm.success_rate,
        "error_rate": arm.error_rate,
        "errors_by_outcome": arm.errors_by_outcome,
        "latency_ms": {"p50": arm.latency.p50, "p95": arm.latency.p95},
        "ttft_ms": {"p50": arm.ttft.p50, "p95": arm.ttft.p95},
        "completion_tokens": arm.completion_tokens,
        "completion_tokens_per_request": arm.per_request(arm.completion_tokens),
        "cost_usd": float(arm.cost_usd),
        "cost_per_request_usd": arm.per_request(arm.cost_usd),
        "unpriced_requests": arm.unpriced_requests,
        "tool_calls": arm.tool_calls,
        "tool_calls_per_request": arm.per_request(arm.tool_calls),
        "answered_by": arm.answered_by,
    }


def _difference_out(interval: Interval) -> dict[str, Any]:
    return {"difference": interval.difference, "low": interval.low, "high": interval.high}


def _rule_out(m: RuleMetrics) -> dict[str, Any]:
    return {
        "rule": m.rule,
        "route": m.route,
        "target": m.target,
        "probability": m.probability,
        "stickiness": m.stickiness,
        "enabled": m.enabled,
        "eligible": m.eligible,
        "replaced": m.replaced,
        "control": m.control,
        "activation_rate": m.activation_rate,
        "opt_outs": {"header": m.opt_outs_header, "token": m.opt_outs_token},
        "sessions_replaced": m.sessions_replaced,
        "first_replacement_turns": [
            {"turn": turn, "requests": n} for turn, n in sorted(m.first_turns.items())
        ],
        "effectiveness": {
            "replaced": _arm_out(m.replaced_arm),
            "not_replaced": _arm_out(m.control_arm),
            "success_rate_difference": _difference_out(m.success_rate_difference),
            "cost_per_request_difference": _difference_out(m.cost_per_request_difference),
            "sample_too_small": m.sample_too_small,
            "summary": m.summary,
        },
    }


def _answer(frame: TimeFrame, rule: str | None, route: str | None) -> dict[str, Any]:
    rules = replacement_metrics(frame=frame, now=timezone.now(), rule=rule, route=route)
    return {"since": frame.since, "until": frame.until, "rules": [_rule_out(m) for m in rules]}


@router.get(
    "/metrics",
    response={200: ReplacementMetricsOut, **QUERY_ERRORS},
    summary="Replacement experiments: activation, opt-outs, and replaced vs not replaced",
)
def replacement_metrics_api(request: HttpRequest, q: Query[ReplacementQuery]) -> dict[str, Any]:
    return _answer(query_frame(q, now=timezone.now()), q.rule, q.route)


@lip_router.get(
    "/metrics",
    response={200: ReplacementMetricsOut, **QUERY_ERRORS},
    summary="Replacement metrics under LLM Interactive Proxy's path (start_date / end_date)",
)
def lip_replacement_metrics(request: HttpRequest, q: Query[LipReplacementQuery]) -> dict[str, Any]:
    known_only(request, LipReplacementQuery)
    return _answer(lip_frame(q.start_date, q.end_date), q.rule, q.route)
