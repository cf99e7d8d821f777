"""What the upstream says about its rate limits, read from proxied answers into the key state."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from django.test import AsyncClient

from keys.health import KeyPolicy
from keys.state_store import get_key_state_store
from tests.proxy.conftest import DONE, Gateway, chunk_event, ok, status
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio

HEADROOM = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "42",
    "x-ratelimit-limit-tokens": "200000",
    "x-ratelimit-remaining-tokens": "150000",
    "x-ratelimit-reset-requests": "1s",
}


async def post(gateway: Gateway, *, stream: bool = False) -> Any:
    response = await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            }
        ),
        content_type="application/json",
        headers=gateway.headers(),
    )
    if stream:
        b"".join([chunk async for chunk in response.streaming_content])
    return response


def with_headroom(request: httpx.Request) -> httpx.Response:
    if json.loads(request.content).get("stream"):
        body = chunk_event({"content": "Hi"}) + chunk_event({}, "stop") + DONE
        headers = {"content-type": "text/event-stream", **HEADROOM}
        return httpx.Response(200, headers=headers, content=body)
    return httpx.Response(200, headers=HEADROOM, json=json.loads(ok(request).content))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_headroom_an_answer_reports_lands_in_the_key_state(gateway: Gateway, stream):
    gateway.upstream.first(with_headroom)
    before = time.time()
    response = await post(gateway, stream=stream)
    assert response.status_code == 200
    key_id = response["x-llmrotate-key"]
    state, _ = get_key_state_store().get_many([key_id], now=time.time())[key_id]
    assert (state.remaining_requests, state.limit_requests) == (42, 500)
    assert (state.remaining_tokens, state.limit_tokens) == (150_000, 200_000)
    assert state.headroom_at is not None and before <= state.headroom_at <= time.time()


async def test_a_429_with_a_rate_limit_reset_cools_the_key_until_the_reset(
    gateway: Gateway, flush_records
):
    reset = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}
    gateway.upstream.first(status(429, error_code="rate_limit_exceeded", headers=reset))
    before = time.time()
    response = await post(gateway)
    after = time.time()
    assert response.status_code == 200  # the other key answered
    flush_records()
    first = await CallRecord.objects.order_by("attempt").afirst()
    assert first is not None and first.outcome == "rate_limited"
    state, _ = get_key_state_store().get_many([first.key_id], now=after)[first.key_id]
    assert state.status == "cooldown"
    assert state.remaining_requests == 0
    most = 360 * (1 + KeyPolicy().jitter_ratio)
    assert before + 360 <= state.cooldown_until <= after + most
