"""`/v1/` through `llmrotate_site.asgi.application` itself, the way uvicorn calls it: the
trimmed ProxyHandler (no middleware stack) and the sharded upstream pools."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from proxy.upstream import ShardedTransport
from tests.proxy.conftest import Gateway, asgi_request

pytestmark = pytest.mark.asyncio

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def bearer(token: str) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"authorization", f"Bearer {token}".encode()),)


async def test_it_serves_the_proxy_without_session_or_csrf(gateway: Gateway):
    result = await asgi_request(
        "/v1/chat/completions", body=CHAT.encode(), headers=bearer(gateway.token)
    )
    assert result.status == 200, result.body
    assert json.loads(result.body)["choices"][0]["message"]["content"] == "Hello there!"
    assert result.headers[b"x-content-type-options"] == b"nosniff"
    assert b"set-cookie" not in result.headers


async def test_it_still_checks_allowed_hosts(gateway: Gateway):
    result = await asgi_request(
        "/v1/models", method="GET", headers=bearer(gateway.token), host=b"evil.example"
    )
    assert result.status == 400


async def test_it_answers_proxy_errors_in_the_openai_shape(gateway: Gateway):
    result = await asgi_request("/v1/models", method="GET", headers=bearer("llmr_wrong"))
    assert result.status == 401
    error = json.loads(result.body)["error"]
    assert error["type"] == "authentication_error"
    assert {"message", "type", "code"} <= error.keys()


async def test_a_client_that_hangs_up_cancels_the_upstream_call(gateway: Gateway, mock_upstream):
    upstream_cancelled = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            upstream_cancelled.set()
            raise
        raise AssertionError("the upstream call should have been cancelled")

    mock_upstream(slow)
    hang_up = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, hang_up.set)
    t0 = time.monotonic()
    result = await asgi_request(
        "/v1/chat/completions", body=CHAT.encode(), headers=bearer(gateway.token), hang_up=hang_up
    )
    assert result.status is None  # nothing was sent to a client that is gone
    assert upstream_cancelled.is_set()
    assert time.monotonic() - t0 < 10


async def test_sharded_pools_are_used_in_turn():
    seen: list[int] = []

    def shard(n: int) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: seen.append(n) or httpx.Response(200))

    transport = ShardedTransport([shard(0), shard(1), shard(2)])
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(6):
            await client.get("http://upstream.test/v1/models")
    assert seen == [0, 1, 2, 0, 1, 2]
