"""A body sent without a Content-Length (chunked) is counted as it arrives: past
LLMROTATE_MAX_REQUEST_BYTES it is refused with 413 on every path, never read whole and never a
500; and a proxy call without a valid token is refused before its body is read at all."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.test import override_settings

from tests.proxy.conftest import Gateway, asgi_scope

pytestmark = pytest.mark.asyncio
LIMIT = 64 * 1024
CHUNK = 16 * 1024


@dataclass
class Upload:
    """One chunked request through the real ASGI app: what it answered, and how much of the
    body the app asked for."""

    status: int | None = None
    body: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks_read: int = 0


async def upload(
    path: str, *, size: int, headers: tuple[tuple[bytes, bytes], ...] = (), method: str = "POST"
) -> Upload:
    from llmrotate_site.asgi import application

    result = Upload()
    total = -(-size // CHUNK)
    # No content-length: the client streams the body (Transfer-Encoding: chunked).
    scope = asgi_scope(path, method=method, headers=((b"transfer-encoding", b"chunked"), *headers))

    async def receive() -> dict[str, Any]:
        if result.chunks_read < total:
            result.chunks_read += 1
            body = b"x" * CHUNK
            return {"type": "http.request", "body": body, "more_body": result.chunks_read < total}
        await asyncio.sleep(3600)  # the client is still there, waiting for the answer
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = dict(message["headers"])
        elif message["type"] == "http.response.body":
            result.body += message.get("body", b"")

    with override_settings(LLMROTATE_MAX_REQUEST_BYTES=LIMIT):
        await asyncio.wait_for(application(scope, receive, send), timeout=10)
    return result


def bearer(token: str) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"authorization", f"Bearer {token}".encode()),)


async def test_an_over_limit_chunked_body_with_a_valid_token_is_413(gateway: Gateway):
    result = await upload("/v1/chat/completions", size=50 * LIMIT, headers=bearer(gateway.token))
    assert result.status == 413, result.body
    assert b"request_too_large" in result.body
    assert result.headers[b"connection"] == b"close"
    # Read up to the limit, not the 50 times as much the client meant to send.
    assert result.chunks_read <= LIMIT // CHUNK + 1
    assert gateway.upstream.requests == []


async def test_an_under_limit_chunked_body_is_served(gateway: Gateway):
    # Not JSON (x…), but read whole and judged on what it is: a 400, not a 413.
    result = await upload("/v1/chat/completions", size=LIMIT - 1, headers=bearer(gateway.token))
    assert result.status == 400, result.body


@pytest.mark.parametrize("headers", [(), bearer("llmr_abcdefgh_" + "x" * 43)])
async def test_a_proxy_call_without_a_valid_token_is_refused_before_its_body_is_read(
    gateway: Gateway, headers
):
    result = await upload("/v1/chat/completions", size=50 * LIMIT, headers=headers)
    assert result.status == 401, result.body
    assert result.chunks_read == 0


@pytest.mark.parametrize("path", ["/admin/login/", "/dashboard/", "/api/usage"])
async def test_every_other_path_answers_an_over_limit_chunked_body_with_413(gateway: Gateway, path):
    result = await upload(path, size=50 * LIMIT)
    assert result.status == 413, (path, result.status, result.body[:200])
    assert result.chunks_read <= LIMIT // CHUNK + 1
