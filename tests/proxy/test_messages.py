"""POST /v1/messages (Anthropic Messages) against a MockTransport upstream: what is sent
upstream, what comes back, what is recorded, and which deployments may answer."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from django.test import AsyncClient

from tests.proxy.anthropic_wire import MODEL, message
from tests.proxy.conftest import SECRETS, AnthropicGateway, ok
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio

PROMPT = [{"role": "user", "content": "hi"}]


async def post(
    gateway: AnthropicGateway,
    body: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> Any:
    payload = body or {"model": "claude", "max_tokens": 64, "messages": PROMPT}
    return await AsyncClient().post(
        "/v1/messages",
        data=json.dumps(payload),
        content_type="application/json",
        headers=gateway.headers() if headers is None else headers,
    )


async def records(flush: Any) -> list[CallRecord]:
    flush()
    return [r async for r in CallRecord.objects.order_by("id")]


async def test_it_passes_a_message_through_unchanged(anthropic_gateway, flush_records):
    response = await post(anthropic_gateway)
    assert response.status_code == 200
    assert response.json() == message()
    assert response["x-llmrotate-key"] in ("claude-1", "claude-2")
    [sent] = anthropic_gateway.upstream.requests
    assert str(sent.url) == "https://anthropic.test/v1/messages"
    assert json.loads(sent.content) == {"model": MODEL, "max_tokens": 64, "messages": PROMPT}


async def test_it_calls_upstream_with_the_key_in_x_api_key_and_never_the_client_token(
    anthropic_gateway,
):
    headers = {**anthropic_gateway.headers(), "anthropic-beta": "prompt-caching-2024-07-31"}
    headers["anthropic-version"] = "2024-01-01"
    assert (await post(anthropic_gateway, headers=headers)).status_code == 200
    [sent] = anthropic_gateway.upstream.requests
    assert sent.headers["x-api-key"] in (SECRETS["a1"], SECRETS["a2"])
    assert sent.headers["anthropic-version"] == "2024-01-01"
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert "authorization" not in sent.headers
    assert anthropic_gateway.token not in str(sent.headers.raw)


async def test_it_sends_the_default_version_when_the_client_sent_none(anthropic_gateway):
    headers = {"Authorization": f"Bearer {anthropic_gateway.token}"}  # auth_token= in the SDK
    assert (await post(anthropic_gateway, headers=headers)).status_code == 200
    [sent] = anthropic_gateway.upstream.requests
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "anthropic-beta" not in sent.headers


async def test_it_forwards_fields_it_does_not_know(anthropic_gateway):
    body = {
        "model": "claude",
        "max_tokens": 64,
        "messages": PROMPT,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "u-1"},
    }
    assert (await post(anthropic_gateway, body)).status_code == 200
    assert anthropic_gateway.upstream.bodies()[0] == {**body, "model": MODEL}


async def test_it_records_usage_with_cache_reads_and_writes_and_prices_both(
    anthropic_gateway, flush_records
):
    response = await post(anthropic_gateway)
    [record] = await records(flush_records)
    assert record.request_id == response["x-llmrotate-request-id"]
    assert (record.outcome, record.stream, record.usage_source) == ("success", False, "reported")
    # prompt = 100 input + 1000 cache reads + 200 cache writes, as OpenAI counts it.
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (
        1300,
        1000,
        50,
    )
    assert record.total_tokens == 1350
    assert (record.provider, record.upstream_model, record.requested_model) == (
        "anthropic",
        MODEL,
        "claude",
    )
    # claude-3-5-haiku per 1M tokens: input $0.80, cache read $0.08, cache write $1.00 (more
    # than plain input), output $4.
    assert record.cost_usd == Decimal("0.00056")


async def test_an_openai_deployment_answers_through_chat_completions(anthropic_gateway):
    anthropic_gateway.upstream.first(ok)  # the OpenAI deployment answers in its own API
    body = {"model": "gpt-first", "max_tokens": 64, "messages": PROMPT}
    response = await post(anthropic_gateway, body)
    assert response.status_code == 200
    assert [str(r.url) for r in anthropic_gateway.upstream.requests] == [
        "https://upstream.test/v1/chat/completions"
    ]
    answer = response.json()
    assert answer["type"] == "message" and answer["content"][0]["type"] == "text"
    sent = anthropic_gateway.upstream.bodies()[0]
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 64
    assert sent["messages"][0]["role"] == "user"


async def test_counting_tokens_on_a_route_without_an_anthropic_deployment_is_a_clear_400(
    anthropic_gateway,
):
    response = await AsyncClient().post(
        "/v1/messages/count_tokens",
        data=json.dumps({"model": "gpt-only", "messages": PROMPT}),
        content_type="application/json",
        headers=anthropic_gateway.headers(),
    )
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "dialect_not_supported",
        "model",
    )
    assert "only Anthropic deployments count tokens" in error["message"]
    assert anthropic_gateway.upstream.requests == []


async def test_an_unknown_model_is_a_404_in_anthropics_envelope(anthropic_gateway):
    response = await post(
        anthropic_gateway, {"model": "nope", "max_tokens": 64, "messages": PROMPT}
    )
    assert response.status_code == 404
    body = response.json()
    assert body["type"] == "error" and body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 64, "messages": PROMPT}, "model"),
        ({"model": "", "max_tokens": 64, "messages": PROMPT}, "model"),
        ({"model": "claude", "max_tokens": 64, "messages": []}, "messages"),
        ({"model": "claude", "max_tokens": 64, "messages": [{"content": "x"}]}, "messages.0"),
        ({"model": "claude", "messages": PROMPT}, "max_tokens"),
        ({"model": "claude", "max_tokens": 0, "messages": PROMPT}, "max_tokens"),
        ({"model": "claude", "max_tokens": True, "messages": PROMPT}, "max_tokens"),
        ({"model": "claude", "max_tokens": 64, "messages": PROMPT, "stream": "yes"}, "stream"),
    ],
)
async def test_a_malformed_body_is_a_400_naming_the_field(anthropic_gateway, body, param):
    response = await post(anthropic_gateway, body)
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["param"] == param
    assert anthropic_gateway.upstream.requests == []


async def test_invalid_json_is_a_400_in_anthropics_envelope(anthropic_gateway):
    response = await AsyncClient().post(
        "/v1/messages",
        data=b"{not json",
        content_type="application/json",
        headers=anthropic_gateway.headers(),
    )
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["code"] == "invalid_json"


async def test_a_body_that_is_not_an_object_is_a_400_as_anthropic_answers(anthropic_gateway):
    response = await AsyncClient().post(
        "/v1/messages",
        data=b"[1, 2]",
        content_type="application/json",
        headers=anthropic_gateway.headers(),
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_type"
