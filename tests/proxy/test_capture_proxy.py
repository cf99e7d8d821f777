"""Wire capture on the request path, against a scripted MockTransport upstream: what an
attempt keeps of an answer that breaks, and that a capture that fails never fails the call."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keys.models import CaptureRule
from keys.routing import invalidate_routing_cache
from tests.proxy.conftest import Gateway, asgi_request
from usage.capture.format import Exchange, find_request

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def captured(settings: Any, tmp_path: Path) -> Path:
    settings.LLMROTATE_CAPTURE_DIR = tmp_path
    CaptureRule.objects.create()
    invalidate_routing_cache()
    return tmp_path


def bearer(token: str) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"authorization", f"Bearer {token}".encode()),)


async def legs(folder: Path, request_id: str, count: int) -> list[Exchange]:
    deadline = time.monotonic() + 10
    while True:
        found = await asyncio.to_thread(find_request, request_id, directory=folder, when=None)
        if len(found) >= count:
            return found
        seen = [(e.leg, e.attempt) for e in found]
        assert time.monotonic() < deadline, f"{count} captured legs of {request_id}: {seen}"
        await asyncio.sleep(0.05)


async def _half_a_body() -> AsyncIterator[bytes]:
    yield b'{"id": "chatcmpl-1", "object": "chat.comp'
    raise httpx.ReadError("connection reset mid-body")


async def test_a_json_answer_reset_midway_keeps_the_bytes_that_came(
    gateway: Gateway, captured: Path
):
    gateway.upstream.first(lambda r: httpx.Response(200, content=_half_a_body()))
    result = await asgi_request(
        "/v1/chat/completions", body=CHAT.encode(), headers=bearer(gateway.token)
    )
    assert result.status == 200  # the other key answered
    request_id = result.headers[b"x-llmrotate-request-id"].decode()
    client, first, second = await legs(captured, request_id, 3)
    assert first.response.body == b'{"id": "chatcmpl-1", "object": "chat.comp'
    assert (first.end, first.response.raw["error"]) == ("upstream_reset", "ReadError")
    assert second.end == "complete" and client.response.status == 200


async def test_a_capture_that_cannot_be_queued_does_not_fail_the_call(
    gateway: Gateway, captured: Path, monkeypatch: pytest.MonkeyPatch
):
    import threading

    def no_threads(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_threads)
    result = await asgi_request(
        "/v1/chat/completions", body=CHAT.encode(), headers=bearer(gateway.token)
    )
    assert result.status == 200, result.body
    assert json.loads(result.body)["choices"][0]["message"]["content"] == "Hello there!"


def test_a_leg_keeps_at_most_its_cap_of_bytes_and_pieces(settings: Any):
    from proxy.capture import Leg

    settings.LLMROTATE_CAPTURE_MAX_CHUNKS = 3
    settings.LLMROTATE_CAPTURE_MAX_BODY_BYTES = 10
    by_pieces = Leg({}, time.perf_counter())
    for _ in range(5):  # an upstream sending a byte at a time
        by_pieces.chunk(b"x")
    by_bytes = Leg({}, time.perf_counter())
    by_bytes.chunk(b"0123456789abcdef")
    assert by_pieces.response["chunk_data"] == [b"x", b"x", b"x"]
    assert by_bytes.response["chunk_data"] == [b"0123456789"]
    for leg, size in ((by_pieces, 5), (by_bytes, 16)):
        assert leg.response["truncated"] and leg.response["size"] == size
