"""POST /v1/chat/completions against a MockTransport upstream: rotation, failover, recording."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from django.test import AsyncClient

from keys.state_store import get_key_state_store
from tests.proxy.conftest import SECRETS, Gateway, raises, status
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio


async def post(gateway: Gateway, body: dict[str, Any] | None = None, **extra: Any) -> Any:
    payload = body or {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(payload),
        content_type="application/json",
        headers=gateway.headers(),
        **extra,
    )


async def records(flush: Any) -> list[CallRecord]:
    flush()
    return [r async for r in CallRecord.objects.order_by("id")]


async def test_it_proxies_a_completion_with_the_upstream_key(gateway: Gateway, flush_records):
    response = await post(gateway)
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Hello there!"
    assert gateway.upstream.secrets_used()[0] in (SECRETS["k1"], SECRETS["k2"])
    assert gateway.upstream.bodies()[0]["model"] == "gpt-4o-mini"
    [record] = await records(flush_records)
    assert record.outcome == "success"
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (12, 3, 2)
    assert record.usage_source == "reported"
    assert record.client == "app"
    assert record.cost_usd is not None and record.cost_usd > 0
    assert record.request_id == response["x-llmrotate-request-id"]


async def test_it_rotates_across_keys(gateway: Gateway):
    for _ in range(4):
        assert (await post(gateway)).status_code == 200
    used = gateway.upstream.secrets_used()
    assert used.count(SECRETS["k1"]) == 2 and used.count(SECRETS["k2"]) == 2


async def test_a_429_on_the_first_key_succeeds_on_the_second(gateway, flush_records):
    gateway.upstream.first(status(429, headers={"retry-after": "20"}))
    response = await post(gateway)
    assert response.status_code == 200
    assert response["x-llmrotate-attempts"] == "2"
    first, second = gateway.upstream.secrets_used()
    assert first != second
    rows = await records(flush_records)
    assert {r.request_id for r in rows} == {response["x-llmrotate-request-id"]}
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "rate_limited"), (2, "success")]
    assert rows[0].key_id != rows[1].key_id
    state, _ = get_key_state_store().get_many([rows[0].key_id], now=time.time())[rows[0].key_id]
    assert state.status == "cooldown"
    # Retry-After is honoured (plus jitter, never less).
    assert state.cooldown_until >= time.time() + 19


async def test_a_401_quarantines_the_key(gateway: Gateway):
    gateway.upstream.then("k1", status(401, error_code="invalid_api_key"))
    gateway.upstream.then("k2", status(401, error_code="invalid_api_key"))
    response = await post(gateway)
    assert response.status_code == 503
    states = get_key_state_store().get_many(["openai-1", "openai-2"], now=time.time())
    assert {s.status for s, _ in states.values()} == {"quarantined"}
    # Quarantined keys are not tried again.
    assert (await post(gateway)).status_code == 503
    assert len(gateway.upstream.requests) == 2


async def test_when_every_key_cools_down_it_answers_503_with_retry_after(gateway: Gateway):
    for key in ("k1", "k2"):
        gateway.upstream.then(key, status(429, headers={"retry-after": "40"}))
    await post(gateway)
    response = await post(gateway)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_key_available"
    assert 35 <= int(response["Retry-After"]) <= 45
    assert len(gateway.upstream.requests) == 2


async def test_a_client_error_goes_straight_back_without_failover(gateway: Gateway):
    gateway.upstream.then("k1", status(400, error_code="context_length_exceeded"))
    gateway.upstream.then("k2", status(400, error_code="context_length_exceeded"))
    response = await post(gateway)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert len(gateway.upstream.requests) == 1


async def test_it_falls_back_to_the_next_deployment(gateway: Gateway, flush_records):
    for key in ("k1", "k2"):
        gateway.upstream.then(key, status(500))
    body = {"model": "with-fallback", "messages": [{"role": "user", "content": "hi"}]}
    response = await post(gateway, body)
    assert response.status_code == 200
    assert gateway.upstream.secrets_used()[-1] == SECRETS["f1"]
    assert gateway.upstream.bodies()[-1]["model"] == "llama-3"
    assert [r.outcome for r in (await records(flush_records))] == [
        "upstream_error",
        "upstream_error",
        "success",
    ]


async def test_upstream_5xx_everywhere_gives_502(gateway: Gateway):
    for key in ("k1", "k2"):
        gateway.upstream.then(key, status(503))
    response = await post(gateway)
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"


async def test_upstream_timeouts_give_504(gateway: Gateway, flush_records):
    for key in ("k1", "k2"):
        gateway.upstream.then(key, raises(httpx.ReadTimeout("slow")))
    response = await post(gateway)
    assert response.status_code == 504
    assert {r.outcome for r in (await records(flush_records))} == {"timeout"}


async def test_a_reset_connection_fails_over(gateway: Gateway):
    gateway.upstream.first(raises(httpx.RemoteProtocolError("reset")))
    assert (await post(gateway)).status_code == 200
    assert len(gateway.upstream.requests) == 2


async def test_garbage_from_upstream_is_a_502_not_a_crash(gateway: Gateway, flush_records):
    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>oops", headers={"content-type": "text/html"})

    gateway.upstream.then("k1", garbage)
    gateway.upstream.then("k2", garbage)
    response = await post(gateway)
    assert response.status_code == 502
    assert {r.outcome for r in (await records(flush_records))} == {"bad_response"}


async def test_quota_errors_mark_the_key_exhausted(gateway: Gateway):
    gateway.upstream.then("k1", status(429, error_code="insufficient_quota"))
    gateway.upstream.then("k2", status(402))
    await post(gateway)
    states = get_key_state_store().get_many(["openai-1", "openai-2"], now=time.time())
    assert {s.status for s, _ in states.values()} == {"exhausted"}


async def test_missing_usage_is_estimated_and_marked(gateway: Gateway, flush_records):
    def no_usage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={"choices": [{"message": {"role": "assistant", "content": "one two three four"}}]},
        )

    gateway.upstream.then("k1", no_usage)
    gateway.upstream.then("k2", no_usage)
    assert (await post(gateway)).status_code == 200
    [record] = await records(flush_records)
    assert record.usage_source == "estimated"
    assert record.completion_tokens >= 4 and record.prompt_tokens >= 1
