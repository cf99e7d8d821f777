"""LLM Interactive Proxy's monitoring guide, run against a live gateway: every `curl … | jq …`
example of its docs, with the jq filter copied as written, must print values, never null.

Traffic goes through the gateway first (the official openai and anthropic SDKs, to the fake
upstream: plain answers, streams, tool calls, two sessions), so that every figure has data.
The docs (github.com/matdev83/llm-interactive-proxy):
  docs/user_guide/features/monitoring-overview.md
  docs/user_guide/features/usage-tracking.md
  docs/user_guide/features/health-checks.md
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jq
import pytest

from tests.e2e.conftest import ROUTE, LiveGateway, wait_for
from tests.e2e.test_anthropic_sdk import CLAUDE, anthropic_config

pytestmark = pytest.mark.timeout(90)

OVERVIEW = "docs/user_guide/features/monitoring-overview.md"
TRACKING = "docs/user_guide/features/usage-tracking.md"
HEALTH = "docs/user_guide/features/health-checks.md"

# (doc, the path and query of its curl line, its jq filter exactly as the doc writes it).
# Figures must be whole: no null anywhere in what these print, except in records and in
# endpoint entries (RECORD_LIKE), whose own fields may be null as in LIP (ttft_ms of an
# unstreamed call, the latency of an endpoint not probed yet).
JQ_EXAMPLES = [
    (OVERVIEW, "/v1/usage/stats?backend_type=openai", """{
  proxy_tokens: .total_tokens,
  backend_tokens: .backend_reported_total_tokens,
  difference: (.total_tokens - .backend_reported_total_tokens)
}"""),
    (OVERVIEW, "/v1/usage/stats", ".ttft_stats"),
    (OVERVIEW, "/v1/usage/stats?backend_type=anthropic", """{
  total_cost: .total_cost,
  requests: .request_count,
  cost_per_request: (.total_cost / .request_count)
}"""),
    (OVERVIEW, "/v1/usage/stats", ".ttft_stats, .duration_stats"),
    (TRACKING, "/v1/usage/recent?limit=100", ".records[] | select(.tool_call_count > 0)"),
    (TRACKING, "/v1/usage/stats", ".status_code_counts"),
    (HEALTH, "/internal/health", ".endpoint_health"),
    (HEALTH, "/internal/health", ".endpoint_health.summary.unhealthy_endpoints"),
    # The form the issue (#9) quotes.
    (HEALTH, "/internal/health", ".endpoint_health.summary"),
]  # fmt: skip

# The docs' curl lines without jq: each must answer 200 with JSON.
CURL_EXAMPLES = [
    (OVERVIEW, "/v1/usage/stats?backend_type=openai&model=gpt-4"),
    (OVERVIEW, "/v1/usage/recent?limit=50"),
    (OVERVIEW, "/v1/usage/export?start_date=2025-12-01T00:00:00Z&end_date=2025-12-31T23:59:59Z"),
    (OVERVIEW, "/v1/usage/stats?backend_type=anthropic&model=claude-3-5-sonnet"
               "&start_date=2025-12-01T00:00:00Z"),
    (TRACKING, "/v1/usage/stats?backend_type=openai&model=gpt-4&start_date=2025-12-02T00:00:00Z"),
    (TRACKING, "/v1/usage/recent?session_id=session-123&limit=50"),
    (TRACKING, "/v1/usage/stats?session_id=session-123"),
    (TRACKING, "/v1/usage/stats?backend_type=anthropic"),
    (TRACKING, "/v1/usage/stats?start_date=2026-01-01T00:00:00Z"),
    # "Model Replacement Analysis": the path the docs promise and LIP's code does not serve.
    (OVERVIEW, "/v1/replacement/metrics"),
]  # fmt: skip

RECORD_LIKE = {".records[] | select(.tool_call_count > 0)", ".endpoint_health"}
REQUESTS = 6  # sent by `seeded`, below


def _nulls(value: Any, where: str = ".") -> list[str]:
    """Every null inside `value`, by path (a summary's fields, a stats object's)."""
    if value is None:
        return [where]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _nulls(v, f"{where}{k}.")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _nulls(v, f"{where}[{i}].")]
    return []


@pytest.fixture
def seeded(live_gateway: LiveGateway) -> Iterator[httpx.Client]:
    """Traffic through the gateway, then an HTTP client with a monitor token."""
    from keys.config_io import config_import

    config = anthropic_config(live_gateway.upstream.base_url)
    # Imported rather than made by a factory: an import drops the gateway's cached tokens.
    config["clients"] = [{"name": "lip-monitor", "routes": ["*"], "scopes": ["monitor"]}]
    monitor = config_import(data=config).generated_tokens["lip-monitor"]
    client = live_gateway.openai()
    # Tool calls, one on each key (round robin), in a session named by the header.
    live_gateway.script(key_a=[{"fault": "tool_call"}], key_b=[{"fault": "tool_call"}])
    session = {"X-Session-Id": "session-123"}
    for _ in range(2):
        client.chat.completions.create(
            model=ROUTE, messages=[{"role": "user", "content": "Weather?"}], extra_headers=session
        )
    # Streams (for time to first token), and a plain answer in another session.
    for _ in range(2):
        list(
            client.chat.completions.create(
                model=ROUTE, messages=[{"role": "user", "content": "Say hi"}], stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
    client.chat.completions.create(
        model=ROUTE, messages=[{"role": "user", "content": "Say hi"}], user="someone"
    )
    with anthropic.Anthropic(
        base_url=live_gateway.base_url, api_key=live_gateway.token, max_retries=0, timeout=20
    ) as claude:
        claude.messages.create(
            model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "Say hi"}]
        )
    http = httpx.Client(
        base_url=live_gateway.base_url, headers={"Authorization": f"Bearer {monitor}"}, timeout=20
    )

    def recorded() -> bool:
        from usage.recorder import get_recorder

        get_recorder().flush(timeout=5)
        return bool(http.get("/v1/usage/stats").json()["request_count"] == REQUESTS)

    try:
        wait_for(recorded, timeout=20, message=f"{REQUESTS} requests were not recorded")
        yield http
    finally:
        http.close()


def test_every_jq_example_of_the_lip_docs_prints_values_not_null(seeded: httpx.Client) -> None:
    for doc, path, program in JQ_EXAMPLES:
        response = seeded.get(path)
        assert response.status_code == 200, (doc, path, response.text)
        outputs = jq.compile(program).input_text(response.text).all()
        assert outputs, f"{doc}: `jq '{program}'` on {path} printed nothing"
        for output in outputs:
            nulls = ["."] if output is None else [] if program in RECORD_LIKE else _nulls(output)
            assert not nulls, f"{doc}: `jq '{program}'` on {path} printed null at {nulls}"


def test_the_figures_behind_the_examples_are_the_traffic_sent(seeded: httpx.Client) -> None:
    stats = seeded.get("/v1/usage/stats").json()
    assert stats["status_code_counts"] == {"200": REQUESTS}
    assert stats["total_tool_calls"] >= 2 and stats["ttft_stats"]["count"] == 2
    assert stats["backend_reported_total_tokens"] == stats["total_tokens"] > 0
    anthropic_stats = seeded.get("/v1/usage/stats?backend_type=anthropic").json()
    assert anthropic_stats["request_count"] == 1
    session = seeded.get("/v1/usage/recent?session_id=session-123&limit=50").json()
    assert session["total"] == 2
    assert all(r["tool_call_count"] >= 1 for r in session["records"])


def test_every_plain_curl_example_answers_json(seeded: httpx.Client) -> None:
    for doc, path in CURL_EXAMPLES:
        response = seeded.get(path)
        assert response.status_code == 200, (doc, path, response.text)
        assert isinstance(response.json(), dict), (doc, path)
