"""`/v1/` through `llmrotate_site.asgi.application` itself, the way uvicorn calls it: the
trimmed ProxyHandler (no middleware stack) and the sharded upstream pools."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from common.upstream import (
    ShardedTransport,
    _network_transport,
    upstream_client,
    upstream_request,
)
from tests.proxy.conftest import Gateway, asgi_request

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


def pool_limits(transport: httpx.AsyncHTTPTransport) -> tuple[int | None, int | None]:
    pool = transport._pool  # httpcore's pool: where the limits end up
    return pool._max_connections, pool._max_keepalive_connections


def test_each_pool_may_use_the_whole_limit_but_keeps_only_its_share_idle(settings):
    settings.LLMROTATE_UPSTREAM_TRANSPORT = "httpx"
    settings.LLMROTATE_UPSTREAM_MAX_CONNECTIONS = 200
    settings.LLMROTATE_UPSTREAM_POOL_SHARDS = 8
    transport = _network_transport()
    assert isinstance(transport, ShardedTransport) and len(transport.shards) == 8
    for shard in transport.shards:
        assert isinstance(shard, httpx.AsyncHTTPTransport)
        assert pool_limits(shard) == (200, 25)


def test_one_shard_is_the_plain_pool(settings):
    settings.LLMROTATE_UPSTREAM_TRANSPORT = "httpx"
    settings.LLMROTATE_UPSTREAM_MAX_CONNECTIONS = 50
    settings.LLMROTATE_UPSTREAM_POOL_SHARDS = 1
    transport = _network_transport()
    assert isinstance(transport, httpx.AsyncHTTPTransport)
    assert pool_limits(transport) == (50, 50)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json", "Authorization": "Bearer sk-1"},
        # A stream's: two of the client's defaults replaced, a forwarded header added.
        {
            "Content-Type": "application/json",
            "x-api-key": "sk-2",
            "Accept-Encoding": "identity",
            "Accept": "text/event-stream",
            "anthropic-beta": "tools-2024",
        },
        {"accept": "application/json", "USER-AGENT": "caller/1.0"},  # any case
    ],
)
async def test_the_proxys_upstream_request_is_the_one_the_client_would_build(headers):
    timeout = httpx.Timeout(connect=1.5, read=30, write=30, pool=1.5)
    url = "http://upstream.test/v1/chat/completions"
    built = upstream_client("http://upstream.test/v1").build_request(
        "POST", url, content=b'{"model":"m"}', headers=headers, timeout=timeout
    )
    ours = upstream_request(
        "http://upstream.test/v1", url, content=b'{"model":"m"}', headers=headers, timeout=timeout
    )
    assert ours.headers.raw == built.headers.raw  # names, their case, values and order
    assert (ours.method, ours.url, ours.content) == (built.method, built.url, built.content)
    assert ours.extensions == built.extensions


async def test_an_oversized_body_is_refused_before_it_is_read_in_the_callers_envelope(
    gateway: Gateway, settings
):
    settings.LLMROTATE_MAX_REQUEST_BYTES = 100
    big = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 200}]})
    openai = await asgi_request("/v1/chat/completions", body=big.encode())
    assert openai.status == 413
    assert json.loads(openai.body) == {
        "error": {
            "message": "Request body is larger than 100 bytes.",
            "type": "invalid_request_error",
            "code": "request_too_large",
            "param": None,
        }
    }
    anthropic = await asgi_request("/v1/messages", body=big.encode())
    assert anthropic.status == 413
    assert json.loads(anthropic.body)["type"] == "error"
