"""Replacement experiments, measured: per rule and time frame, who was eligible, who was
replaced, and whether it was worth it (docs/replacement.md).

Everything here reads rollups: the usage rollups, whose `experiment` and `arm` dimensions say
which rule a request was eligible for and where it went; the session rollup, whose rows of
replaced requests carry the rule (distinct sessions from their sketches); and the turn rollup.

The comparison is replaced against control: the requests that drew "not replaced". Opt-outs
chose themselves, so they would bias it; they are counted, not compared. A replaced request
whose target failed and that fell back to the route still counts as replaced: the comparison
answers "what happens if we send this share to the target", fallbacks included.

Request figures (success, outcome, latency, TTFT) come from the rows of final records, one
per request; amounts (cost, completion tokens, tool calls) from every attempt, divided by the
requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any

from django.db.models import Q, Sum

from common.timeframes import TimeFrame
from keys.models import ReplacementRule
from usage.conversation_selectors import replaced_sessions
from usage.filters import UsageFilters
from usage.models import Arm, ReplacementTurnRollup
from usage.rollup_reads import rollup_merge
from usage.rollups import ADDITIVE_COLUMNS
from usage.selectors import MetricStats, Stats, rollup_combine, stats_of, usage_timeseries

# Below this many requests in either arm, no interval is trusted to mean anything.
MIN_SAMPLE = 30
_Z95 = 1.959963984540054


@dataclass(slots=True)
class Interval:
    """A difference (replaced minus control) with its 95 % confidence interval."""

    difference: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def significant(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


@dataclass(slots=True)
class ArmFigures:
    requests: int = 0
    successes: int = 0
    errors_by_outcome: dict[str, int] = field(default_factory=dict)
    latency: MetricStats = field(default_factory=MetricStats)
    ttft: MetricStats = field(default_factory=MetricStats)
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    cost_sq: float = 0.0
    # Requests without a known cost (an unpriced model, usage awaiting review): while there are
    # any, the arm's cost per request would count them as free, so no cost interval is given.
    unpriced_requests: int = 0
    tool_calls: int = 0
    # "provider/model" → the requests answered there (a fallback shows the route's own).
    answered_by: dict[str, int] = field(default_factory=dict)

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.requests if self.requests else None

    @property
    def error_rate(self) -> float | None:
        return 1 - self.successes / self.requests if self.requests else None

    def per_request(self, amount: float | Decimal) -> float | None:
        return float(amount) / self.requests if self.requests else None

    @property
    def cost_variance(self) -> float | None:
        n = self.requests
        if n < 2:
            return None
        mean = float(self.cost_usd) / n
        return max(0.0, (self.cost_sq - n * mean * mean) / (n - 1))


@dataclass(slots=True)
class RuleMetrics:
    rule: str
    route: str
    target: str
    probability: float
    stickiness: str
    enabled: bool
    # The rule's window (None: unbounded); `deleted`: only its past requests remain.
    active_from: datetime | None = None
    active_until: datetime | None = None
    deleted: bool = False
    eligible: int = 0
    replaced: int = 0
    control: int = 0
    opt_outs_header: int = 0
    opt_outs_token: int = 0
    sessions_replaced: int = 0
    # turn → requests that began a session's replacement at that turn
    first_turns: dict[int, int] = field(default_factory=dict)
    replaced_arm: ArmFigures = field(default_factory=ArmFigures)
    control_arm: ArmFigures = field(default_factory=ArmFigures)
    success_rate_difference: Interval = field(default_factory=Interval)
    cost_per_request_difference: Interval = field(default_factory=Interval)
    sample_too_small: bool = True
    summary: str = ""

    @property
    def activation_rate(self) -> float | None:
        return self.replaced / self.eligible if self.eligible else None


def wilson(successes: int, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion."""
    p = successes / n
    z2 = _Z95 * _Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def proportion_difference(s1: int, n1: int, s2: int, n2: int) -> Interval:
    """p1 - p2 with Newcombe's hybrid score interval (his method 10): unlike the textbook
    (Wald) interval it stays inside [-1, 1] and keeps its coverage near 0 % and 100 %."""
    if not n1 or not n2:
        return Interval()
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson(s1, n1)
    l2, u2 = wilson(s2, n2)
    d = p1 - p2
    return Interval(
        difference=d,
        low=d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        high=d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


def mean_difference(a: ArmFigures, b: ArmFigures) -> Interval:
    """Cost per request of a minus b, with Welch's normal-approximation interval."""
    va, vb = a.cost_variance, b.cost_variance
    if va is None or vb is None or a.unpriced_requests or b.unpriced_requests:
        return Interval()
    d = float(a.cost_usd) / a.requests - float(b.cost_usd) / b.requests
    half = _Z95 * math.sqrt(va / a.requests + vb / b.requests)
    return Interval(difference=d, low=d - half, high=d + half)


def _arm_figures(rows: list[dict[str, Any]], keys: list[tuple[Any, ...]]) -> ArmFigures:
    """An arm's figures from its rollup rows keyed (client_status, provider, upstream_model)."""
    figures = ArmFigures()
    if not rows:
        return figures
    every: Stats = stats_of(rollup_combine(rows))
    finals = [row for row, key in zip(rows, keys, strict=True) if key[0]]
    final: Stats = stats_of(rollup_combine(finals)) if finals else Stats()
    figures.requests = final.requests
    figures.successes = final.successes
    figures.errors_by_outcome = dict(final.errors_by_type)
    figures.latency = final.duration
    figures.ttft = final.ttft
    figures.completion_tokens = every.tokens.completion
    figures.cost_usd = every.cost_usd
    figures.cost_sq = float(sum(row.get("cost_sq") or 0.0 for row in rows))
    priced = sum(int(row.get("priced_requests") or 0) for row in finals)
    figures.unpriced_requests = max(0, figures.requests - priced)
    figures.tool_calls = every.tool_calls
    for row, (_, provider, model) in zip(rows, keys, strict=True):
        requests = int(row.get("requests") or 0)
        if requests:
            where = f"{provider}/{model}" if provider else "(no upstream)"
            figures.answered_by[where] = figures.answered_by.get(where, 0) + requests
    return figures


def _turns(rule: str, frame: TimeFrame) -> dict[int, int]:
    q = Q(experiment=rule)
    if frame.since is not None:
        since = frame.since.astimezone(UTC)
        q &= Q(bucket_start__gte=since.replace(minute=0, second=0, microsecond=0))
    if frame.until is not None:
        q &= Q(bucket_start__lt=frame.until)
    rows = (
        ReplacementTurnRollup.objects.filter(q)
        .values("turn")
        .annotate(n=Sum("starts"))
        .order_by("turn")
    )
    return {row["turn"]: int(row["n"] or 0) for row in rows}


def _percent(value: float) -> str:
    return f"{value * 100:+.1f} points"


def _summary(m: RuleMetrics) -> str:
    """One plain sentence (two at most) on what the figures allow to say."""
    n1, n2 = m.replaced_arm.requests, m.control_arm.requests
    if m.sample_too_small:
        return (
            f"Too few requests to compare: {n1} replaced and {n2} not replaced in this frame; "
            f"at least {MIN_SAMPLE} of each are needed before any difference means anything."
        )
    parts = []
    s = m.success_rate_difference
    if s.difference is not None and s.low is not None and s.high is not None:
        interval = f"(95 % CI {_percent(s.low)} to {_percent(s.high)})"
        if s.significant:
            better = "more" if s.difference > 0 else "less"
            parts.append(
                f"Replaced requests succeed {better} often: {_percent(s.difference)} {interval}."
            )
        else:
            parts.append(f"No difference in success rate can be seen {interval}.")
    c = m.cost_per_request_difference
    a, b = m.replaced_arm.unpriced_requests, m.control_arm.unpriced_requests
    if a or b:
        parts.append(
            f"Cost is not compared: {a} replaced and {b} not replaced requests have no known "
            "cost (a model without a price, or usage awaiting review)."
        )
    elif c.difference is not None and c.low is not None and c.high is not None:
        interval = f"(95 % CI {c.low:+.6f} to {c.high:+.6f} USD)"
        if c.significant:
            change = "less" if c.difference < 0 else "more"
            parts.append(
                f"Each replaced request costs {abs(c.difference):.6f} USD {change} {interval}."
            )
        else:
            parts.append(f"No difference in cost per request can be seen {interval}.")
    return " ".join(parts)


def replacement_metrics(
    *, frame: TimeFrame, now: datetime, rule: str | None = None, route: str | None = None
) -> list[RuleMetrics]:
    """Every rule's figures in the frame (or one rule's, or one route's rules), including
    rules since deleted whose requests are still in the rollups."""
    rules = {
        r.name: r
        for r in ReplacementRule.objects.select_related("route", "target_route", "target_provider")
    }
    merged = rollup_merge(
        frame, now=now, filters=UsageFilters(experiment=rule, in_experiment=True),
        group=("experiment", "arm", "client_status", "provider", "upstream_model",
               "requested_model"),
        columns=(*ADDITIVE_COLUMNS,), extremes=True,
    )  # fmt: skip
    by_rule: dict[str, dict[str, tuple[list[dict[str, Any]], list[tuple[Any, ...]]]]] = {}
    routes_seen: dict[str, str] = {}
    for key, row in merged.items():
        experiment, arm, status, provider, model, requested = key
        if not experiment:
            continue
        routes_seen.setdefault(experiment, requested)
        rows, keys = by_rule.setdefault(experiment, {}).setdefault(arm, ([], []))
        rows.append(row)
        keys.append((int(status or 0), provider, model))
    names = set(by_rule) | set(rules)
    if rule is not None:
        names &= {rule}
    out = []
    for name in sorted(names):
        configured = rules.get(name)
        route_name = configured.route.name if configured else routes_seen.get(name, "")
        if route is not None and route_name != route:
            continue
        m = RuleMetrics(
            rule=name,
            route=route_name,
            target=configured.target_label if configured else "(rule deleted)",
            probability=configured.probability if configured else 0.0,
            stickiness=configured.stickiness if configured else "",
            enabled=bool(configured and configured.enabled),
            active_from=configured.active_from if configured else None,
            active_until=configured.active_until if configured else None,
            deleted=configured is None,
        )
        arms = {arm: _arm_figures(*pair) for arm, pair in by_rule.get(name, {}).items()}
        count = {arm: figures.requests for arm, figures in arms.items()}
        m.replaced = count.get(Arm.REPLACED, 0)
        m.control = count.get(Arm.CONTROL, 0)
        m.opt_outs_header = count.get(Arm.OPT_OUT_HEADER, 0)
        m.opt_outs_token = count.get(Arm.OPT_OUT_TOKEN, 0)
        m.eligible = sum(count.values())
        m.replaced_arm = arms.get(Arm.REPLACED, ArmFigures())
        m.control_arm = arms.get(Arm.CONTROL, ArmFigures())
        a, b = m.replaced_arm, m.control_arm
        m.success_rate_difference = proportion_difference(
            a.successes, a.requests, b.successes, b.requests
        )
        m.cost_per_request_difference = mean_difference(a, b)
        m.sample_too_small = min(a.requests, b.requests) < MIN_SAMPLE
        m.sessions_replaced = replaced_sessions(frame=frame, experiment=name)
        m.first_turns = _turns(name, frame)
        m.summary = _summary(m)
        out.append(m)
    return out


@dataclass(slots=True)
class ActivationPoint:
    start: datetime
    eligible: int
    replaced: int


def replacement_activation(
    *, rule: str, frame: TimeFrame, bucket: timedelta, now: datetime, zone: tzinfo | None = None
) -> list[ActivationPoint]:
    """Eligible and replaced requests of one rule per bucket (the Experiments chart), in UTC
    buckets or on the clock of `zone` (usage_timeseries)."""
    eligible = usage_timeseries(
        frame=frame, bucket=bucket, filters=UsageFilters(experiment=rule), now=now, zone=zone
    )
    replaced = usage_timeseries(
        frame=frame, bucket=bucket, filters=UsageFilters(experiment=rule, arm=Arm.REPLACED),
        now=now, zone=zone,
    )  # fmt: skip
    return [
        ActivationPoint(start=e.start, eligible=e.totals.requests, replaced=r.totals.requests)
        for e, r in zip(eligible, replaced, strict=True)
    ]
