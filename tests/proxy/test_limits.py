"""Client, route and upstream key limits on the request path: 429s in the caller's dialect with
the headers the SDKs read, reservations settled from the records, slots given back at the end,
keys without headroom skipped, and every refusal recorded."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from keys.limits import Decision, Estimate, LimitSpec, get_limiter, spec_meters
from keys.models import ApiKey, ClientToken, Limit, Route
from keys.routing import invalidate_routing_cache
from tests.proxy.conftest import AnthropicGateway, Gateway, eventually, slow
from usage.models import CallRecord, ModelPrice
from usage.pricing import price_overrides_invalidate

pytestmark = pytest.mark.asyncio

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@sync_to_async
def limit(*, route: str | None = None, client: str | None = "app", **values: Any) -> LimitSpec:
    row = Limit.objects.create(
        client=ClientToken.objects.get(name=client) if client else None,
        route=Route.objects.get(name=route) if route else None,
        **values,
    )
    invalidate_routing_cache()
    return LimitSpec(
        id=row.pk,
        client=client or "",
        route=route or "",
        **{k: v for k, v in values.items()},
    )


async def chat(gateway: Gateway, body: dict[str, Any] | None = None, **headers: str):
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(body or CHAT),
        content_type="application/json",
        headers={**gateway.headers(), **headers},
    )


async def admitted_again(gateway: Gateway, timeout: float = 5.0):
    """The first answer that is not a 429, once the slot (released by a background task after
    the request that held it) is back; or the last 429 at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await chat(gateway)
        if answer.status_code != 429 or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.01)


async def records(flush) -> list[CallRecord]:
    await sync_to_async(flush)()
    return [r async for r in CallRecord.objects.order_by("id")]


def used(spec: LimitSpec) -> tuple[int, ...]:
    meters = spec_meters(spec, Estimate(), now=time.time(), zone="UTC")
    return get_limiter().read([m.key for m in meters], [], now=time.time()).used


async def test_a_request_limit_answers_429_with_the_headers_openai_sdks_read(
    gateway: Gateway, flush_records
) -> None:
    await limit(requests_per_minute=2)
    first, second, third = [await chat(gateway) for _ in range(3)]
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    assert first["x-ratelimit-limit-requests"] == "2"
    assert (first["x-ratelimit-remaining-requests"], second["x-ratelimit-remaining-requests"]) == (
        "1",
        "0",
    )
    assert first["x-ratelimit-reset-requests"].endswith("s")
    error = third.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "client 'app'" in error["message"]
    assert 1 <= int(third["Retry-After"]) <= 60
    assert 0 < int(third["retry-after-ms"]) <= 60_000
    assert third["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in third  # a rate limit is worth the SDK's retry
    assert len(gateway.upstream.requests) == 2
    [refusal] = [r for r in await records(flush_records) if r.attempt == 0]
    assert (refusal.key_id, refusal.provider) == ("", "")
    assert (refusal.outcome, refusal.client_status) == ("rate_limited_by_gateway", 429)
    assert (refusal.final, refusal.client, refusal.error_type) == (
        True,
        "app",
        "rate_limit_exceeded",
    )


async def test_an_anthropic_client_gets_the_429_in_anthropic_s_envelope(
    anthropic_gateway: AnthropicGateway,
) -> None:
    await limit(requests_per_minute=1)
    body = {
        "model": "claude",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    client = AsyncClient()
    headers = anthropic_gateway.headers()
    ok = await client.post(
        "/v1/messages", data=json.dumps(body), content_type="application/json", headers=headers
    )
    refused = await client.post(
        "/v1/messages", data=json.dumps(body), content_type="application/json", headers=headers
    )
    assert ok.status_code == 200, ok.content
    assert refused.status_code == 429
    assert refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


async def test_a_route_limit_counts_every_client_of_the_route(gateway: Gateway) -> None:
    await limit(client=None, route="gpt-4o-mini", requests_per_minute=1)
    assert (await chat(gateway)).status_code == 200
    refused = await chat(gateway)
    assert refused.status_code == 429
    assert "route 'gpt-4o-mini'" in refused.json()["error"]["message"]
    # Another route of the same client is not limited.
    other = {**CHAT, "model": "with-fallback"}
    assert (await chat(gateway, other)).status_code == 200


async def test_tokens_are_settled_from_the_reported_usage(gateway: Gateway, flush_records) -> None:
    spec = await limit(tokens_per_minute=10_000)
    response = await chat(gateway)
    assert response.status_code == 200
    # Reserved: the body's bytes / 4 plus max_tokens (50).
    reserved = int(response["x-ratelimit-limit-tokens"]) - int(
        response["x-ratelimit-remaining-tokens"]
    )
    assert reserved > 50
    [record] = await records(flush_records)
    await eventually(lambda: used(spec) == (record.prompt_tokens + record.completion_tokens,))
    assert used(spec) == (15,)  # the fake upstream's usage: 12 + 3


async def test_a_request_larger_than_a_limit_is_refused_without_retry(gateway: Gateway) -> None:
    await limit(tokens_per_minute=100)
    refused = await chat(gateway, {**CHAT, "max_tokens": 1000})
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "request_exceeds_limit")
    assert "max_tokens" in error["message"]
    assert refused["x-should-retry"] == "false"
    assert gateway.upstream.requests == []


async def test_a_spent_budget_is_a_distinct_error(gateway: Gateway, flush_records) -> None:
    await sync_to_async(ModelPrice.objects.create)(
        model="gpt-4o-mini", input_per_mtok=Decimal(1000), output_per_mtok=Decimal(1000)
    )
    price_overrides_invalidate()
    # Each call reserves (~25 prompt tokens + 50) at $0.001 a token, about $0.075, and costs
    # $0.015 (15 tokens): the budget of $0.10 admits the first, the settlement frees room for a
    # second, and then what is left ($0.07) is less than a reservation.
    await limit(usd_per_day=Decimal("0.10"))
    assert (await chat(gateway)).status_code == 200
    await sync_to_async(flush_records)()
    await eventually(lambda: _usd_spent() == 15_000)
    assert (await chat(gateway)).status_code == 200
    await sync_to_async(flush_records)()
    await eventually(lambda: _usd_spent() == 30_000)
    refused = await chat(gateway)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert refused["x-should-retry"] == "false"
    assert "$0.1000" in error["message"]
    outcomes = sorted(r.outcome for r in await records(flush_records))
    assert outcomes == ["budget_exceeded", "success", "success"]
    total = sum(r.cost_usd for r in await records(flush_records) if r.cost_usd)
    assert total <= Decimal("0.10")


def _usd_spent() -> int:
    limiter = get_limiter()
    keys = [k for k in getattr(limiter, "_counters", {}) if ":usd:day:" in k]
    if keys:
        return limiter.read(keys, [], now=time.time()).used[0]
    from keys.limits_redis import RedisLimiter

    assert isinstance(limiter, RedisLimiter)
    found = list(limiter._clients.sync.scan_iter(match=f"{limiter.prefix}*:usd:day:*"))
    return int(limiter._clients.sync.get(found[0]) or 0) if found else 0


async def test_a_concurrency_slot_is_held_until_the_answer_and_then_given_back(
    gateway: Gateway,
) -> None:
    await limit(max_concurrent=1)
    gateway.upstream.first(slow(0.5))
    first = asyncio.create_task(chat(gateway))
    await eventually(lambda: len(gateway.upstream.requests) == 1)
    refused = await chat(gateway)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert refused["Retry-After"] == "1"
    assert (await first).status_code == 200
    # The slot is released as the request ends (a background task): the next call gets it.
    assert (await admitted_again(gateway)).status_code == 200


async def test_a_stream_holds_its_slot_until_it_ends(gateway: Gateway) -> None:
    await limit(max_concurrent=1)
    streamed = await chat(gateway, {**CHAT, "stream": True})
    assert streamed.status_code == 200
    assert (await chat(gateway)).status_code == 429  # the stream is not read yet
    content = b"".join([chunk async for chunk in streamed.streaming_content])
    assert b"[DONE]" in content
    assert (await admitted_again(gateway)).status_code == 200


@sync_to_async
def key_limits(key_id: str, **values: int) -> None:
    ApiKey.objects.filter(key_id=key_id).update(**values)
    invalidate_routing_cache()


async def test_a_key_without_headroom_is_skipped_before_the_provider_says_429(
    gateway: Gateway, flush_records
) -> None:
    await key_limits("openai-1", requests_per_minute=1)
    await key_limits("openai-2", requests_per_minute=1)
    answers = [await chat(gateway) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 503]
    assert sorted(gateway.upstream.keys_used()) == ["openai-1", "openai-2"]
    unavailable = answers[2]
    assert unavailable.json()["error"]["code"] == "no_key_available"
    assert 1 <= int(unavailable["Retry-After"]) <= 60
    [refusal] = [r for r in await records(flush_records) if r.attempt == 0]
    assert (refusal.outcome, refusal.client_status) == ("unavailable", 503)


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_limiter_that_cannot_answer_fails_open_or_closed_as_set(
    gateway: Gateway, settings, monkeypatch: pytest.MonkeyPatch, fail_open: bool
) -> None:
    settings.LLMROTATE_LIMITS_FAIL_OPEN = fail_open
    await limit(requests_per_minute=1)
    limiter = get_limiter()

    async def unreachable(*args: Any, **kwargs: Any) -> Decision:
        return Decision(False, error=True)

    monkeypatch.setattr(limiter, "reserve", unreachable)
    answers = [await chat(gateway) for _ in range(2)]
    if fail_open:
        assert [a.status_code for a in answers] == [200, 200]
        assert "x-ratelimit-limit-requests" not in answers[0]
    else:
        assert [a.status_code for a in answers] == [503, 503]
        assert answers[0].json()["error"]["code"] == "limits_unavailable"
        assert gateway.upstream.requests == []


@pytest.mark.parametrize(
    ("token", "model", "status", "code"),
    [
        ("bad", "gpt-4o-mini", 401, "invalid_api_key"),
        (None, "secret-route", 403, "route_not_allowed"),
        (None, "no-such-model", 404, "model_not_found"),
    ],
)
async def test_every_refusal_leaves_one_record_without_key_or_upstream(
    gateway: Gateway, flush_records, token: str | None, model: str, status: int, code: str
) -> None:
    headers = gateway.headers("llmr_bad_token" if token else None)
    response = await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps({**CHAT, "model": model}),
        content_type="application/json",
        headers=headers,
    )
    assert response.status_code == status
    [record] = await records(flush_records)
    assert (record.attempt, record.key_id, record.provider, record.final) == (0, "", "", True)
    assert (record.outcome, record.client_status, record.error_type) == ("refused", status, code)
    assert record.client == ("" if token else "app")
    assert gateway.upstream.requests == []


async def test_a_key_sent_as_the_model_name_is_masked_in_the_refusal_record(
    gateway: Gateway, flush_records, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown model is recorded by name now that refusals are recorded: a key pasted into
    the wrong field must not reach the database, the usage log line or the dashboard."""
    import logging

    caplog.set_level(logging.INFO)
    pasted = "sk-proj-" + "Zq3" * 16
    response = await chat(gateway, {**CHAT, "model": pasted})
    assert response.status_code == 404
    [record] = await records(flush_records)
    assert record.outcome == "refused"
    assert pasted not in record.requested_model
    assert record.requested_model.startswith("sk-")  # masked, not dropped
    assert pasted not in caplog.text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (0.0001, "1ms"), (1.5, "1.5s"), (42, "42s"), (59.95, "1m0s"),
     (360, "6m0s"), (7384, "2h3m4s")],
)  # fmt: skip
async def test_waits_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    from proxy.limits import duration

    assert duration(seconds) == text
