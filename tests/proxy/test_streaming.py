"""Streaming pass-through: usage chunk handling, TTFT, and a stream that fails (midway, or
before its first byte, when another key can still answer)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from django.test import AsyncClient

from tests.proxy.conftest import Gateway, stream_cut, streaming
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio


async def stream(gateway: Gateway, **body: Any) -> tuple[Any, list[Any]]:
    payload = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        **body,
    }
    response = await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(payload),
        content_type="application/json",
        headers=gateway.headers(),
    )
    raw = b"".join([chunk async for chunk in response.streaming_content])
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return response, events


async def test_it_streams_events_through(gateway: Gateway):
    response, events = await stream(gateway)
    assert response.status_code == 200
    assert response["content-type"].startswith("text/event-stream")
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == "Hello!"
    assert events[-1] == "[DONE]"


async def test_it_asks_upstream_for_usage_and_strips_it_when_the_client_did_not(gateway):
    _, events = await stream(gateway)
    assert gateway.upstream.bodies()[0]["stream_options"] == {"include_usage": True}
    assert all(e == "[DONE]" or e["choices"] for e in events), "usage chunk leaked"


async def test_it_keeps_the_usage_chunk_when_the_client_asked(gateway: Gateway):
    _, events = await stream(gateway, stream_options={"include_usage": True})
    usage_chunks = [e for e in events if e != "[DONE]" and not e["choices"]]
    assert len(usage_chunks) == 1 and usage_chunks[0]["usage"]["completion_tokens"] == 3


async def test_it_records_true_ttft_and_streamed_usage(gateway: Gateway, flush_records):
    await stream(gateway)
    flush_records()
    [record] = [r async for r in CallRecord.objects.all()]
    assert record.stream and record.outcome == "success"
    assert record.usage_source == "reported"
    assert (record.prompt_tokens, record.completion_tokens) == (9, 3)
    assert record.ttft_ms is not None and record.ttlt_ms is not None
    assert 0 < record.ttft_ms <= record.ttlt_ms <= record.latency_ms


async def test_a_stream_cut_midway_ends_with_an_error_event_and_no_retry(gateway, flush_records):
    gateway.upstream.first(stream_cut(after=3))
    response, events = await stream(gateway)
    assert response.status_code == 200  # headers had been sent before the cut
    assert events[-1]["error"]["code"] == "stream_interrupted"
    assert "[DONE]" not in events
    assert len(gateway.upstream.requests) == 1, "a started stream must not be replayed"
    flush_records()
    [record] = [r async for r in CallRecord.objects.all()]
    assert record.outcome == "stream_error"


async def test_a_stream_that_ends_without_finishing_is_reported(gateway: Gateway):
    def truncated(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
        )

    gateway.upstream.first(truncated)
    _, events = await stream(gateway)
    assert events[-1]["error"]["code"] == "stream_truncated"


async def test_a_429_before_the_stream_starts_still_fails_over(gateway: Gateway):
    from tests.proxy.conftest import status

    gateway.upstream.first(status(429))
    response, events = await stream(gateway)
    assert response["x-llmrotate-attempts"] == "2"
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("break_with", "outcome"),
    [
        (httpx.RemoteProtocolError("peer closed connection"), "connection_error"),
        (httpx.ReadTimeout("no first byte in time"), "timeout"),
        (None, "bad_response"),  # a 200 that ends at once, with no event at all
    ],
    ids=["reset", "read-timeout", "empty"],
)
async def test_a_stream_that_fails_before_its_first_byte_moves_to_the_next_key(
    gateway: Gateway, flush_records, break_with: Exception | None, outcome: str
):
    gateway.upstream.first(streaming(break_with) if break_with else streaming())
    response, events = await stream(gateway)
    assert response.status_code == 200
    assert response["x-llmrotate-attempts"] == "2"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert (text, events[-1]) == ("Hello!", "[DONE]")
    first, second = gateway.upstream.keys_used()
    assert first != second
    flush_records()
    rows = [r async for r in CallRecord.objects.order_by("attempt")]
    assert [(r.key_id, r.outcome) for r in rows] == [(first, outcome), (second, "success")]


async def test_a_stream_that_opens_with_an_error_event_moves_to_the_next_key(
    gateway: Gateway, flush_records
):
    overloaded = b'data: {"error": {"message": "Overloaded", "type": "server_error"}}\n\n'
    gateway.upstream.first(streaming(overloaded))
    response, events = await stream(gateway)
    assert response["x-llmrotate-attempts"] == "2"
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    flush_records()
    rows = [r async for r in CallRecord.objects.order_by("attempt")]
    assert [(r.outcome, r.error_type) for r in rows] == [
        ("upstream_error", "upstream_error_event"),
        ("success", ""),
    ]
