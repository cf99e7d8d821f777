"""Anthropic's error answers and what they do to the key: the same rotation and failover as
the OpenAI path, read from Anthropic's statuses, bodies and rate-limit headers."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import AsyncClient

from keys.state_store import get_key_state_store
from tests.proxy.anthropic_wire import error
from tests.proxy.conftest import AnthropicGateway
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio

BODY = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
CREDIT = (
    "Your credit balance is too low to access the Anthropic API. "
    "Please go to Plans & Billing to upgrade or purchase credits."
)


async def post(gateway: AnthropicGateway) -> Any:
    return await AsyncClient().post(
        "/v1/messages",
        data=json.dumps(BODY),
        content_type="application/json",
        headers=gateway.headers(),
    )


async def attempts(flush: Any) -> list[tuple[str, str, int | None]]:
    flush()
    return [
        (r.key_id, r.outcome, r.status_code)
        async for r in CallRecord.objects.order_by("started_at", "attempt")
    ]


def state(key_id: str) -> Any:
    return get_key_state_store().get_many([key_id], now=time.time())[key_id][0]


async def test_a_429_cools_the_key_for_its_retry_after_and_the_next_key_answers(
    anthropic_gateway, flush_records
):
    anthropic_gateway.upstream.then(
        "a1", error(429, "rate_limit_error", headers={"retry-after": "40"})
    )
    response = await post(anthropic_gateway)
    assert response.status_code == 200
    assert response["x-llmrotate-key"] == "claude-2"
    assert await attempts(flush_records) == [
        ("claude-1", "rate_limited", 429),
        ("claude-2", "success", 200),
    ]
    assert state("claude-1").status == "cooldown"
    assert state("claude-1").cooldown_until >= time.time() + 39


async def test_a_429_without_retry_after_waits_for_anthropics_reset_timestamp(anthropic_gateway):
    reset = (datetime.now(UTC) + timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset,
    }
    anthropic_gateway.upstream.then("a1", error(429, "rate_limit_error", headers=headers))
    assert (await post(anthropic_gateway)).status_code == 200
    # Far past the provider's 30 s default: the reset time was read.
    assert state("claude-1").cooldown_until >= time.time() + 110


async def test_a_529_overloaded_moves_on_to_the_next_key(anthropic_gateway, flush_records):
    anthropic_gateway.upstream.then("a1", error(529, "overloaded_error"))
    response = await post(anthropic_gateway)
    assert response.status_code == 200
    assert await attempts(flush_records) == [
        ("claude-1", "upstream_error", 529),
        ("claude-2", "success", 200),
    ]
    flush_records()
    first = await CallRecord.objects.order_by("started_at", "attempt").afirst()
    assert first is not None and first.error_type == "overloaded_error"


async def test_a_401_quarantines_the_key(anthropic_gateway, flush_records):
    anthropic_gateway.upstream.then("a1", error(401, "authentication_error", "invalid x-api-key"))
    assert (await post(anthropic_gateway)).status_code == 200
    assert state("claude-1").status == "quarantined"
    assert [a[1] for a in await attempts(flush_records)] == ["auth_failed", "success"]


async def test_a_credit_balance_400_marks_the_key_exhausted_and_tries_the_next(
    anthropic_gateway, flush_records
):
    anthropic_gateway.upstream.then("a1", error(400, "invalid_request_error", CREDIT))
    response = await post(anthropic_gateway)
    assert response.status_code == 200
    assert state("claude-1").status == "exhausted"
    assert await attempts(flush_records) == [
        ("claude-1", "quota_exhausted", 400),
        ("claude-2", "success", 200),
    ]


async def test_a_plain_400_goes_back_to_the_client_unchanged(anthropic_gateway, flush_records):
    anthropic_gateway.upstream.then(
        "a1", error(400, "invalid_request_error", "messages.0.content: Field required")
    )
    response = await post(anthropic_gateway)
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "messages.0.content: Field required"},
    }
    assert len(anthropic_gateway.upstream.requests) == 1, "another key would fail alike"
    assert state("claude-1").status == "active"
    assert await attempts(flush_records) == [("claude-1", "client_error", 400)]


async def test_when_every_key_is_rate_limited_the_client_gets_a_503_it_can_retry(
    anthropic_gateway,
):
    for key in ("a1", "a2"):
        anthropic_gateway.upstream.then(
            key, error(429, "rate_limit_error", headers={"retry-after": "30"})
        )
    response = await post(anthropic_gateway)
    assert response.status_code == 503
    assert int(response["Retry-After"]) >= 25
    body = response.json()
    assert body["type"] == "error" and body["error"]["code"] == "no_key_available"
