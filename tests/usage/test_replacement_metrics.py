"""Replacement metrics from the rollups (usage.replacement_selectors) and their two endpoints,
against records written through the production write path."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client

from common.timeframes import TimeFrame
from keys.models import ReplacementRule
from tests.factories import ProviderFactory, RouteFactory
from tests.usage.conftest import T0
from tests.usage.monitoring import api, call, monitor_token, write_calls  # noqa: F401
from usage.models import Arm, Outcome
from usage.replacement_selectors import (
    ArmFigures,
    mean_difference,
    proportion_difference,
    replacement_metrics,
    wilson,
)

pytestmark = pytest.mark.django_db
FRAME = TimeFrame(since=T0 - timedelta(hours=1), until=T0 + timedelta(hours=2))


def test_wilson_interval_matches_the_published_example() -> None:
    # Newcombe (1998), table I: 81/263 → 0.2553 to 0.3662.
    low, high = wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_difference_interval_matches_newcombe_method_10() -> None:
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80 → 0.0524 to 0.3339.
    interval = proportion_difference(56, 70, 48, 80)
    assert interval.difference == pytest.approx(0.2)
    assert (round(interval.low or 0, 4), round(interval.high or 0, 4)) == (0.0524, 0.3339)
    assert interval.significant


def test_cost_difference_interval_from_sums_and_squares() -> None:
    # replaced: 40 requests at 0.001 and 0.003 alternately; control: 40 at 0.004 each
    a = ArmFigures(requests=40, cost_usd=Decimal("0.08"), cost_sq=20 * 0.001**2 + 20 * 0.003**2)
    b = ArmFigures(requests=40, cost_usd=Decimal("0.16"), cost_sq=40 * 0.004**2)
    interval = mean_difference(a, b)
    assert interval.difference == pytest.approx(-0.002)
    sd = (((0.001 - 0.002) ** 2 * 20 + (0.003 - 0.002) ** 2 * 20) / 39) ** 0.5
    half = 1.959963984540054 * sd / 40**0.5
    assert interval.low == pytest.approx(-0.002 - half)
    assert interval.high == pytest.approx(-0.002 + half)


def _rule(name: str = "cheap") -> ReplacementRule:
    provider = ProviderFactory(name="p")
    route = RouteFactory(name="big", deployments=[(provider, "big")])
    return ReplacementRule.objects.create(
        name=name, route=route, target_provider=provider, target_model="small", probability=0.5
    )


def _request(arm: str, *, ok: bool = True, cost: str = "0.002", **extra: Any) -> Any:
    fields: dict[str, Any] = dict(
        requested_model="big",
        provider="p",
        upstream_model="small" if arm == Arm.REPLACED else "big",
        experiment="cheap",
        arm=arm,
        replacement_attempt=arm == Arm.REPLACED,
        outcome=Outcome.SUCCESS if ok else Outcome.UPSTREAM_ERROR,
        status_code=200 if ok else 500,
        final=True,
        client_status=200 if ok else 502,
        cost_usd=Decimal(cost),
        completion_tokens=10,
        total_tokens=30,
        prompt_tokens=20,
    )
    return call(**(fields | extra))


def _traffic(now: datetime) -> None:
    calls = [_request(Arm.REPLACED, cost="0.001", latency_ms=100.0) for _ in range(8)]
    calls += [_request(Arm.REPLACED, ok=False, cost="0") for _ in range(2)]
    calls += [_request(Arm.CONTROL, cost="0.004", latency_ms=300.0) for _ in range(12)]
    calls += [_request(Arm.OPT_OUT_HEADER) for _ in range(3)]
    calls += [_request(Arm.OPT_OUT_TOKEN)]
    # A replaced request whose target failed, answered by the route's own deployment.
    failed = _request(
        Arm.REPLACED, ok=False, cost="0", request_id="fb", final=False, client_status=None
    )
    fallback = _request(Arm.REPLACED, request_id="fb", attempt=2, cost="0.004")
    fallback.upstream_model, fallback.replacement_attempt = "big", False
    calls += [failed, fallback]
    calls += [call(requested_model="big", provider="p", final=True, client_status=200)]
    write_calls(calls)


def test_counts_and_arms_from_rollups() -> None:
    _rule()
    _traffic(T0)
    [m] = replacement_metrics(frame=FRAME, now=T0 + timedelta(hours=1))
    assert (m.rule, m.route, m.target) == ("cheap", "big", "p/small")
    assert (m.eligible, m.replaced, m.control) == (27, 11, 12)
    assert (m.opt_outs_header, m.opt_outs_token) == (3, 1)
    assert m.activation_rate == pytest.approx(11 / 27)
    replaced = m.replaced_arm
    assert (replaced.requests, replaced.successes) == (11, 9)
    assert replaced.errors_by_outcome == {"upstream_error": 2}
    assert replaced.answered_by == {"p/small": 10, "p/big": 1}  # the fallback shows the route
    assert replaced.cost_usd == Decimal("0.012")  # every attempt's cost, the fallback's included
    assert replaced.completion_tokens == 12 * 10  # every attempt: 11 final rows + 1 failed
    control = m.control_arm
    assert (control.requests, control.successes, control.cost_usd) == (12, 12, Decimal("0.048"))
    assert control.latency.p50 == pytest.approx(300.0, rel=0.09)
    assert m.sample_too_small
    assert "Too few requests to compare: 11 replaced and 12 not replaced" in m.summary


def test_a_big_enough_sample_gets_an_interval_and_a_verdict() -> None:
    _rule()
    calls = [_request(Arm.REPLACED, cost="0.001") for _ in range(40)]
    calls += [_request(Arm.CONTROL, cost="0.004") for _ in range(35)]
    calls += [_request(Arm.CONTROL, ok=False, cost="0") for _ in range(5)]
    write_calls(calls)
    [m] = replacement_metrics(frame=FRAME, now=T0 + timedelta(hours=1))
    assert not m.sample_too_small
    assert m.success_rate_difference.difference == pytest.approx(1 - 35 / 40)
    assert m.cost_per_request_difference.significant
    assert "costs 0.002500 USD less" in m.summary


def test_requests_without_a_known_cost_leave_the_cost_out_of_the_comparison() -> None:
    _rule()
    calls = [_request(Arm.REPLACED, cost="0.001") for _ in range(35)]
    calls += [_request(Arm.REPLACED, cost_usd=None) for _ in range(5)]  # an unpriced model
    calls += [_request(Arm.CONTROL, cost="0.004") for _ in range(40)]
    write_calls(calls)
    [m] = replacement_metrics(frame=FRAME, now=T0 + timedelta(hours=1))
    assert (m.replaced_arm.unpriced_requests, m.control_arm.unpriced_requests) == (5, 0)
    assert m.cost_per_request_difference.difference is None
    assert "Cost is not compared: 5 replaced and 0 not replaced requests" in m.summary
    assert "costs" not in m.summary


def test_sessions_and_first_turns() -> None:
    _rule()
    calls = [
        _request(Arm.REPLACED, session_id="s1", turn=2, replacement_start=True),
        _request(Arm.REPLACED, session_id="s1", turn=3),
        _request(Arm.REPLACED, session_id="s2", turn=2, replacement_start=True),
        _request(Arm.REPLACED, session_id="s3", turn=5, replacement_start=True),
        _request(Arm.CONTROL, session_id="s4", turn=1),
    ]
    write_calls(calls)
    [m] = replacement_metrics(frame=FRAME, now=T0 + timedelta(hours=1))
    assert m.sessions_replaced == 3
    assert m.first_turns == {2: 2, 5: 1}


def test_a_deleted_rule_still_reports_its_traffic_and_filters_apply() -> None:
    rule = _rule()
    _traffic(T0)
    rule.delete()
    [m] = replacement_metrics(frame=FRAME, now=T0 + timedelta(hours=1))
    assert (m.rule, m.target, m.eligible) == ("cheap", "(rule deleted)", 27)
    assert replacement_metrics(frame=FRAME, now=T0, rule="other") == []
    assert replacement_metrics(frame=FRAME, now=T0, route="elsewhere") == []


@pytest.mark.parametrize(
    "url",
    [
        "/api/replacement/metrics?since={since}&until={until}",
        "/v1/replacement/metrics?start_date={since}&end_date={until}",
    ],
)
def test_both_endpoints_answer_the_same_body(api: Client, url: str) -> None:  # noqa: F811
    _rule()
    _traffic(T0)
    since, until = FRAME.since, FRAME.until
    assert since is not None and until is not None
    response = api.get(
        url.format(since=since.isoformat().replace("+00:00", "Z"),
                   until=until.isoformat().replace("+00:00", "Z"))
    )  # fmt: skip
    assert response.status_code == 200, response.content
    [rule] = response.json()["rules"]
    assert rule["rule"] == "cheap" and rule["eligible"] == 27 and rule["replaced"] == 11
    assert rule["opt_outs"] == {"header": 3, "token": 1}
    effect = rule["effectiveness"]
    assert effect["replaced"]["requests"] == 11
    assert effect["replaced"]["cost_per_request_usd"] == pytest.approx(0.012 / 11)
    assert effect["not_replaced"]["success_rate"] == 1.0
    assert effect["sample_too_small"] is True
    assert effect["success_rate_difference"]["confidence"] == 0.95


def test_endpoints_need_monitor_auth_and_refuse_unknown_parameters(api: Client) -> None:  # noqa: F811
    assert Client().get("/api/replacement/metrics").status_code == 401
    assert Client().get("/v1/replacement/metrics").status_code == 401
    response = api.get("/v1/replacement/metrics?window=24h")
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "window"
