"""/api/usage, /api/usage/models, /api/usage/stats, /api/usage/clients, /api/usage/timeseries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.test import Client

from tests.factories import ClientTokenFactory
from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls
from usage.models import Outcome, UsageSource

# Fixtures shared by the monitoring API tests.
api = monitoring.api
monitor_token = monitoring.monitor_token
now = monitoring.now

pytestmark = pytest.mark.django_db


@pytest.fixture
def traffic(now: datetime) -> None:
    """Two providers, two clients, a failover, a stream; one call a month ago."""
    write_calls(
        [
            call(started_at=now - timedelta(minutes=5), provider="openai", client="web",
                 prompt_tokens=100, completion_tokens=50, usage_source=UsageSource.REPORTED,
                 cost_usd=Decimal("0.25"), latency_ms=400),
            call(started_at=now - timedelta(minutes=4), provider="openai", client="web",
                 outcome=Outcome.RATE_LIMITED, status_code=429, latency_ms=50),
            call(started_at=now - timedelta(minutes=4), provider="anthropic", client="batch",
                 requested_model="claude", stream=True, ttft_ms=300, ttlt_ms=900,
                 tokens_per_second=80, prompt_tokens=10, completion_tokens=20,
                 usage_source=UsageSource.ESTIMATED, cost_usd=Decimal("0.5"), latency_ms=900),
            call(started_at=now - timedelta(days=31), provider="openai", client="web",
                 cost_usd=Decimal("1"), prompt_tokens=1),
        ]
    )  # fmt: skip


@pytest.mark.usefixtures("traffic")
def test_usage_gives_calls_successes_errors_tokens_and_cost_per_provider(api: Client) -> None:
    body = api.get("/api/usage?window=24h").json()
    providers = {p["provider"]: p for p in body["providers"]}
    assert providers["openai"] == {
        "provider": "openai", "calls": 2, "requests": 0, "successes": 1, "errors": 1,
        "prompt_tokens": 100,
        "completion_tokens": 50, "total_tokens": 150, "estimated_cost_usd": 0.25,
    }  # fmt: skip
    assert providers["anthropic"]["estimated_cost_usd"] == 0.5
    assert body["total"]["calls"] == 3
    assert body["until"] is None and body["since"] is not None


@pytest.mark.usefixtures("traffic")
def test_usage_without_a_frame_is_all_time(api: Client) -> None:
    body = api.get("/api/usage").json()
    assert body["total"]["calls"] == 4
    assert body["since"] is None


@pytest.mark.usefixtures("traffic")
def test_models_have_the_llm_rotate_shape(api: Client) -> None:
    body = api.get("/api/usage/models?window=1h").json()
    # llm-rotate's fields, and ours beside them (client requests next to attempts).
    assert body["models"][0].keys() == {
        "provider", "model", "calls", "successes", "errors", "total_tokens", "estimated_cost_usd",
        "requests",
    }  # fmt: skip
    assert [(m["provider"], m["model"], m["calls"]) for m in body["models"]] == [
        ("anthropic", "claude", 1),
        ("openai", "gpt-4o-mini", 2),
    ]


@pytest.mark.usefixtures("traffic")
def test_stats_have_rates_error_types_tokens_and_percentiles(api: Client) -> None:
    body = api.get("/api/usage/stats?window=7d").json()
    assert (body["calls"], body["successes"], body["errors"]) == (3, 2, 1)
    assert body["success_rate"] == pytest.approx(2 / 3)
    assert body["errors_by_type"] == {"rate_limited": 1}
    assert body["tokens"]["reported"] == 150
    assert body["tokens"]["estimated"] == 30
    assert body["cost_usd"] == 0.75
    duration = body["duration_stats"]
    assert (duration["count"], duration["min"], duration["max"]) == (3, 50, 900)
    assert duration["avg"] == pytest.approx(450)
    assert duration["p50"] == pytest.approx(400, rel=0.1)
    assert body["ttft_stats"]["p99"] == 300
    assert body["tokens_per_second_stats"]["count"] == 1


@pytest.mark.usefixtures("traffic")
@pytest.mark.parametrize(
    ("query", "calls"),
    [("provider=anthropic", 1), ("model=claude", 1), ("key=openai-1", 3), ("client=web", 2),
     ("status=error", 1), ("status=success", 2), ("stream=true", 1), ("stream=false", 2),
     ("provider=openai&status=success", 1), ("provider=nobody", 0)],
)  # fmt: skip
def test_stats_filters(api: Client, query: str, calls: int) -> None:
    assert api.get(f"/api/usage/stats?window=24h&{query}").json()["calls"] == calls


@pytest.mark.usefixtures("traffic")
def test_clients_get_the_same_figures_and_a_masked_token(api: Client) -> None:
    token = ClientTokenFactory(name="web")
    body = api.get("/api/usage/clients?window=24h").json()
    clients = {c["client"]: c for c in body["clients"]}
    assert clients["web"]["calls"] == 2
    assert clients["web"]["token"] == token.masked
    assert clients["batch"]["token"] is None
    assert clients["batch"]["ttft_stats"]["count"] == 1


def test_an_empty_window_is_all_zeros(api: Client) -> None:
    body = api.get("/api/usage/stats?since=2020-01-01&until=2020-01-01").json()
    assert body["calls"] == 0
    assert body["success_rate"] is None
    assert body["duration_stats"]["p95"] is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("window=2w", "'1h', '24h', '7d' or '30d'"),
        ("since=yesterday", "ISO 8601"),
        ("since=2025-02-01&until=2025-01-01", "since must not be after until"),
        ("window=1h&since=2025-01-01", "not both"),
        ("status=failed", "success"),
    ],
)
def test_bad_frames_get_422_saying_what_is_accepted(api: Client, query: str, message: str) -> None:
    response = api.get(f"/api/usage/stats?{query}")
    assert response.status_code == 422
    assert message in response.json()["error"]["message"]


@pytest.mark.usefixtures("traffic")
def test_timeseries_defaults_to_24h_in_15_minute_buckets(api: Client, now: datetime) -> None:
    body = api.get("/api/usage/timeseries").json()
    assert body["bucket_seconds"] == 900
    assert len(body["buckets"]) in (96, 97)
    assert sum(b["calls"] for b in body["buckets"]) == 3
    assert sum(b["errors"] for b in body["buckets"]) == 1
    starts = [datetime.fromisoformat(b["start"]) for b in body["buckets"]]
    assert all(s.minute % 15 == 0 and s.second == 0 for s in starts)
    assert starts == sorted(starts)


@pytest.mark.parametrize(
    ("window", "seconds"), [("1h", 60), ("24h", 900), ("7d", 3600), ("30d", 21600)]
)
def test_the_timeseries_bucket_follows_the_window(api: Client, window: str, seconds: int) -> None:
    assert api.get(f"/api/usage/timeseries?window={window}").json()["bucket_seconds"] == seconds


def test_a_frame_years_long_without_a_bucket_is_answered_in_weeks(api: Client) -> None:
    write_calls([call(started_at=datetime(2010, 6, 1, 12, tzinfo=UTC))])
    response = api.get("/api/usage/timeseries?since=2000-01-01&until=2025-01-01")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["bucket_seconds"] == 7 * 86400
    assert len(body["buckets"]) <= 2000
    assert sum(b["calls"] for b in body["buckets"]) == 1


def test_timeseries_buckets_are_utc_aligned_across_a_dst_change(api: Client) -> None:
    # Europe changed its clocks at 01:00 UTC that night; UTC buckets do not notice.
    write_calls([call(started_at=datetime(2025, 3, 30, 0, 59, tzinfo=UTC)),
                 call(started_at=datetime(2025, 3, 30, 1, 0, tzinfo=UTC))])  # fmt: skip
    body = api.get(
        "/api/usage/timeseries?since=2025-03-30T00:00:00Z&until=2025-03-30T03:00:00Z&bucket=1h"
    ).json()
    assert [(b["start"], b["calls"]) for b in body["buckets"]] == [
        ("2025-03-30T00:00:00Z", 1), ("2025-03-30T01:00:00Z", 1), ("2025-03-30T02:00:00Z", 0)
    ]  # fmt: skip


def test_a_bad_or_too_small_bucket_gets_422(api: Client) -> None:
    response = api.get("/api/usage/timeseries?bucket=7m")
    assert response.status_code == 422
    assert "1m, 5m, 15m" in response.json()["error"]["message"]
    response = api.get("/api/usage/timeseries?window=30d&bucket=1m")
    assert response.status_code == 422
    assert "too many" in response.json()["error"]["message"]
