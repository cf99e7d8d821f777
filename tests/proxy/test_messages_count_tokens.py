"""POST /v1/messages/count_tokens: passed through to an Anthropic key with failover, and not
recorded as a call (nothing is generated or billed)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from django.test import AsyncClient

from keys.state_store import get_key_state_store
from tests.proxy.anthropic_wire import MODEL, error
from tests.proxy.conftest import SECRETS, AnthropicGateway
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio

BODY = {"model": "claude", "messages": [{"role": "user", "content": "hi"}]}


def counted(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={"input_tokens": 7},
        # Token counting's own limits: must not be taken for the key's messages budget.
        headers={"anthropic-ratelimit-requests-remaining": "0"},
    )


async def post(gateway: AnthropicGateway, body: dict[str, Any] | None = None) -> Any:
    return await AsyncClient().post(
        "/v1/messages/count_tokens",
        data=json.dumps(body or BODY),
        content_type="application/json",
        headers=gateway.headers(),
    )


def state(key_id: str) -> Any:
    return get_key_state_store().get_many([key_id], now=time.time())[key_id][0]


async def test_it_counts_through_an_anthropic_key_and_records_no_call(
    anthropic_gateway: AnthropicGateway, flush_records
):
    anthropic_gateway.upstream.default = counted
    response = await post(anthropic_gateway)
    assert response.status_code == 200
    assert response.json() == {"input_tokens": 7}
    [sent] = anthropic_gateway.upstream.requests
    assert str(sent.url) == "https://anthropic.test/v1/messages/count_tokens"
    assert sent.headers["x-api-key"] == SECRETS["a1"]
    assert json.loads(sent.content) == {**BODY, "model": MODEL}
    flush_records()
    assert await CallRecord.objects.acount() == 0
    assert state("claude-1").remaining_requests is None
    assert get_key_state_store().get_many(["claude-1"], now=time.time())["claude-1"][1] == 0


async def test_a_429_tries_the_next_key_without_cooling_the_first(anthropic_gateway):
    anthropic_gateway.upstream.default = counted
    anthropic_gateway.upstream.then(
        "a1", error(429, "rate_limit_error", headers={"retry-after": "60"})
    )
    response = await post(anthropic_gateway)
    assert response.status_code == 200
    assert response["x-llmrotate-key"] == "claude-2"
    assert state("claude-1").status == "active"


async def test_a_401_quarantines_the_key_as_on_any_call(anthropic_gateway):
    anthropic_gateway.upstream.default = counted
    anthropic_gateway.upstream.then("a1", error(401, "authentication_error"))
    assert (await post(anthropic_gateway)).status_code == 200
    assert state("claude-1").status == "quarantined"


async def test_it_needs_a_model_and_messages_but_no_max_tokens(anthropic_gateway):
    response = await post(anthropic_gateway, {"model": "claude", "messages": []})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert anthropic_gateway.upstream.requests == []
