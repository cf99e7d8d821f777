"""Property: what the rollups answer equals what the raw records say, for random data, random
filters and random (minute-aligned) windows, at every resolution boundary."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.timeframes import TimeFrame
from tests.usage.monitoring import call, write_calls
from usage.filters import UsageFilters
from usage.histograms import METRICS, RELATIVE_ERROR_BOUND, exact_percentile
from usage.models import (
    CallRecord,
    DayRollup,
    HourRollup,
    MinuteRollup,
    Outcome,
    SessionRollup,
    ToolRollup,
    UsageSource,
)
from usage.selectors import usage_stats, usage_timeseries, usage_totals_by

# Three days and a bit, starting just before midnight: windows cross minute, hour and day
# boundaries in every combination.
START = datetime(2025, 2, 27, 23, 0, tzinfo=UTC)
SPAN_MINUTES = 3 * 24 * 60 + 90
NOW = START + timedelta(minutes=SPAN_MINUTES + 30)

calls = st.fixed_dictionaries(
    {
        "minute": st.integers(0, SPAN_MINUTES),
        "second": st.floats(0, 59.999),
        "provider": st.sampled_from(["openai", "anthropic"]),
        "requested_model": st.sampled_from(["fast", "smart"]),
        "key_id": st.sampled_from(["k1", "k2", "k3"]),
        "client": st.sampled_from(["a", "b", "c"]),
        "stream": st.booleans(),
        "outcome": st.sampled_from([Outcome.SUCCESS, Outcome.SUCCESS, Outcome.RATE_LIMITED,
                                    Outcome.TIMEOUT, Outcome.STREAM_ERROR]),
        "prompt_tokens": st.integers(0, 5000),
        "completion_tokens": st.integers(0, 2000),
        "usage_source": st.sampled_from(list(UsageSource)),
        "usage_flagged": st.booleans(),  # flagged usage stays out of tokens and cost
        "latency_ms": st.floats(1, 200_000),
        "ttft_ms": st.none() | st.floats(10, 20_000),
        "overhead_ms": st.floats(0, 500),
        "tokens_per_second": st.none() | st.floats(0.5, 5000),
        "ttlt_ms": st.none() | st.floats(10, 200_000),
        "cost_usd": st.none() | st.decimals(min_value=0, max_value=3, places=10),
        "upstream_model": st.sampled_from(["m-1", "m-2"]),
        "final": st.booleans(),
        "client_status": st.sampled_from([200, 400, 499, 503]),
        "attempt": st.sampled_from([0, 1, 1, 2]),
        "tool_calls": st.integers(0, 3),
        "counted_prompt_tokens": st.none() | st.integers(0, 5000),
        "forwarded_prompt_tokens": st.integers(0, 5000),
    }
)  # fmt: skip
bounds = st.none() | st.integers(0, SPAN_MINUTES + 60)
filters = st.builds(
    UsageFilters,
    provider=st.none() | st.sampled_from(["openai", "anthropic"]),
    model=st.none() | st.sampled_from(["fast", "smart"]),
    key=st.none() | st.sampled_from(["k1", "k2"]),
    client=st.none() | st.sampled_from(["a", "b"]),
    status=st.none() | st.sampled_from(["success", "error"]),
    stream=st.none() | st.booleans(),
)


def _write(specs: list[dict[str, Any]]) -> list[CallRecord]:
    for model in (CallRecord, MinuteRollup, HourRollup, DayRollup, SessionRollup, ToolRollup):
        model.objects.all().delete()
    datas = []
    for spec in specs:
        spec = dict(spec)
        at = START + timedelta(minutes=spec.pop("minute"), seconds=spec.pop("second"))
        datas.append(call(started_at=at, finished_at=at, **spec))
    write_calls(datas)
    return list(CallRecord.objects.all())


def _matches(r: CallRecord, frame: TimeFrame, f: UsageFilters) -> bool:
    return (
        (frame.since is None or r.started_at >= frame.since)
        and (frame.until is None or r.started_at < frame.until)
        and (f.provider is None or r.provider == f.provider)
        and (f.model is None or r.requested_model == f.model)
        and (f.key is None or r.key_id == f.key)
        and (f.client is None or r.client == f.client)
        and (f.stream is None or r.stream == f.stream)
        and (f.status is None or (r.outcome == Outcome.SUCCESS) == (f.status == "success"))
    )


def _frame(since: int | None, until: int | None) -> TimeFrame:
    if since is not None and until is not None and since > until:
        since, until = until, since
    return TimeFrame(
        since=None if since is None else START + timedelta(minutes=since),
        until=None if until is None else START + timedelta(minutes=until),
    )


@pytest.mark.django_db
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=st.lists(calls, max_size=40), since=bounds, until=bounds, f=filters)
def test_rollup_aggregates_equal_raw_aggregates(
    specs: list[dict[str, Any]], since: int | None, until: int | None, f: UsageFilters
) -> None:
    records = _write(specs)
    frame = _frame(since, until)
    raw = [r for r in records if _matches(r, frame, f)]

    stats = usage_stats(frame=frame, filters=f, now=NOW)
    # Calls are attempts (rows of attempt 0 are requests without one); requests, final rows.
    assert stats.calls == sum(1 for r in raw if r.attempt)
    assert stats.requests == sum(1 for r in raw if r.final)
    assert stats.tool_calls == sum(r.tool_calls for r in raw)
    assert stats.successes == sum(r.outcome == Outcome.SUCCESS for r in raw)
    assert stats.errors_by_type == dict(Counter(r.outcome for r in raw if r.outcome != "success"))
    counted = [r for r in raw if not r.usage_flagged]
    assert stats.tokens.prompt == sum(r.prompt_tokens for r in counted)
    assert stats.tokens.total == sum(r.total_tokens for r in counted)
    assert stats.tokens.estimated == sum(
        r.total_tokens
        for r in counted
        if r.usage_source in (UsageSource.ESTIMATED, UsageSource.EXTRAPOLATED)
    )
    assert stats.cost_usd == sum((Decimal(r.cost_usd) for r in counted if r.cost_usd), Decimal(0))
    with_count = [r for r in counted if r.counted_prompt_tokens is not None]
    assert stats.tokens.counted_prompt == sum(r.counted_prompt_tokens or 0 for r in with_count)
    assert stats.tokens.forwarded_prompt == sum(r.forwarded_prompt_tokens or 0 for r in with_count)
    reconciled = [r for r in with_count if r.usage_source == UsageSource.REPORTED]
    assert stats.tokens.reconciled_reported == sum(r.prompt_tokens for r in reconciled)
    assert stats.tokens.reconciled_counted == sum(r.counted_prompt_tokens or 0 for r in reconciled)
    statuses = usage_totals_by(group=("client_status",), frame=frame, filters=f, now=NOW)
    assert {k[0]: v.requests for k, v in statuses if k[0]} == dict(
        Counter(r.client_status for r in raw if r.final)
    )
    by_name = {m.name: m for m in METRICS}
    for metric, figures in (
        (by_name["latency_ms"], stats.duration), (by_name["ttft_ms"], stats.ttft),
        (by_name["ttlt_ms"], stats.ttlt),
        (by_name["overhead_ms"], stats.overhead),
        (by_name["tokens_per_second"], stats.tokens_per_second),
    ):  # fmt: skip
        values = [getattr(r, metric.name) for r in raw if getattr(r, metric.name) is not None]
        assert figures.count == len(values)
        if not values:
            continue
        assert figures.min == min(values) and figures.max == max(values)
        assert figures.avg == pytest.approx(sum(values) / len(values))
        for p, estimate in ((50, figures.p50), (95, figures.p95), (99, figures.p99)):
            exact = exact_percentile(values, p=p)
            assert exact is not None and estimate is not None
            if metric.low <= exact < metric.high:
                assert abs(estimate / exact - 1) <= RELATIVE_ERROR_BOUND + 1e-9

    by_provider = dict(usage_totals_by(group=("provider",), frame=frame, filters=f, now=NOW))
    assert {k[0]: v.calls for k, v in by_provider.items() if v.calls} == dict(
        Counter(r.provider for r in raw if r.attempt)
    )
    by_upstream = dict(usage_totals_by(group=("upstream_model",), frame=frame, filters=f, now=NOW))
    assert {k[0]: v.calls for k, v in by_upstream.items() if v.calls} == dict(
        Counter(r.upstream_model for r in raw if r.attempt)
    )
    by_model = usage_totals_by(
        group=("provider", "requested_model"), frame=frame, filters=f, now=NOW
    )
    assert {k: v.calls for k, v in by_model if v.calls} == dict(
        Counter((r.provider, r.requested_model) for r in raw if r.attempt)
    )


@pytest.mark.django_db
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    specs=st.lists(calls, max_size=40),
    since=st.integers(0, SPAN_MINUTES),
    length=st.integers(1, 3 * 24 * 60),
    bucket=st.sampled_from([60, 300, 900, 3600, 4320, 5400, 21600, 86400]),
    f=filters,
)
def test_timeseries_buckets_equal_raw_counts(
    specs: list[dict[str, Any]], since: int, length: int, bucket: int, f: UsageFilters
) -> None:
    records = _write(specs)
    frame = _frame(since, since + length)
    size = timedelta(seconds=bucket)
    if (length * 60) // bucket > 1500:
        return
    buckets = usage_timeseries(frame=frame, bucket=size, filters=f, now=NOW)
    assert buckets[0].start <= frame.since  # type: ignore[operator]
    assert buckets[-1].start < frame.until  # type: ignore[operator]
    whole = TimeFrame(since=buckets[0].start, until=buckets[-1].start + size)
    for b in buckets:
        inside = [
            r for r in records
            if _matches(r, whole, f) and b.start <= r.started_at < b.start + size
        ]  # fmt: skip
        assert b.totals.calls == sum(1 for r in inside if r.attempt)
        assert b.totals.requests == sum(1 for r in inside if r.final)
        assert b.totals.tokens.completion == sum(
            r.completion_tokens for r in inside if not r.usage_flagged
        )
