"""Anthropic Messages streams: passed through event by event, usage from message_start and
message_delta, TTFT at the first generated delta, and Anthropic `error` events when the
upstream fails midway."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.proxy.anthropic_wire import (
    BLOCK_START,
    BLOCK_STOP,
    MESSAGE_STOP,
    PING,
    error,
    event,
    events,
    message_delta,
    message_start,
    text_delta,
)
from tests.proxy.conftest import AnthropicGateway, post_stream_timed, streaming
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio

DELAY = 0.3  # between message_start and the first generated delta


async def stream(gateway: AnthropicGateway) -> tuple[Any, list[bytes], float]:
    """The response, every chunk the client got, and ms until its first chunk."""
    return await post_stream_timed(
        "/v1/messages",
        {
            "model": "claude",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        },
        gateway.headers(),
    )


def parsed(chunks: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in b"".join(chunks).decode().split("\n\n"):
        if block:
            name, data = block.split("\n", 1)
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def the_record(flush: Any) -> CallRecord:
    flush()
    [record] = [r async for r in CallRecord.objects.all()]
    return record


async def test_every_event_passes_through_byte_for_byte(anthropic_gateway, flush_records):
    sent = events(["Hel", "lo", "!"])
    anthropic_gateway.upstream.first(streaming(*sent))
    response, chunks, _ = await stream(anthropic_gateway)
    assert response.status_code == 200
    assert response["content-type"].startswith("text/event-stream")
    assert b"".join(chunks) == b"".join(sent)
    assert len(chunks) == len(sent), "events were merged instead of passed on as they came"
    [request] = anthropic_gateway.upstream.requests
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["accept-encoding"] == "identity"
    assert "stream_options" not in json.loads(request.content)


async def test_it_records_the_streamed_usage_with_cache_tokens(anthropic_gateway, flush_records):
    await stream(anthropic_gateway)
    record = await the_record(flush_records)
    assert (record.outcome, record.stream, record.usage_source) == ("success", True, "reported")
    # Input from message_start, output from message_delta (not message_start's placeholder 1).
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (
        1300,
        1000,
        50,
    )
    assert record.cost_usd == Decimal("0.00056")
    assert record.ttft_ms is not None and record.ttlt_ms is not None
    assert 0 < record.ttft_ms <= record.ttlt_ms <= record.latency_ms


@pytest.mark.parametrize(
    "delta",
    [
        {"type": "text_delta", "text": "Hi"},
        {"type": "thinking_delta", "thinking": "Let me think"},
        {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'},
    ],
    ids=["text", "thinking", "tool-input"],
)
async def test_ttft_is_the_first_generated_delta_not_message_start(
    anthropic_gateway, flush_records, delta
):
    first = event({"type": "content_block_delta", "index": 0, "delta": delta})
    anthropic_gateway.upstream.first(
        streaming(
            message_start(),
            BLOCK_START,
            PING,
            # An empty delta is not a token yet.
            text_delta(""),
            DELAY,
            first,
            BLOCK_STOP,
            message_delta(),
            MESSAGE_STOP,
        )
    )
    _, chunks, first_byte_ms = await stream(anthropic_gateway)
    assert chunks[0] == message_start(), "message_start was held back until the text came"
    record = await the_record(flush_records)
    assert record.outcome == "success"
    assert record.ttft_ms is not None and record.ttft_ms >= DELAY * 1000 * 0.95
    assert first_byte_ms < record.ttft_ms - DELAY * 1000 / 2


async def test_a_stream_cut_midway_ends_with_an_anthropic_error_event(
    anthropic_gateway, flush_records
):
    anthropic_gateway.upstream.first(
        streaming(
            message_start(),
            BLOCK_START,
            text_delta("Hello there, this was going well"),
            httpx.ReadError("connection reset"),
        )
    )
    response, chunks, _ = await stream(anthropic_gateway)
    assert response.status_code == 200
    name, data = parsed(chunks)[-1]
    assert name == "error"
    assert data["type"] == "error"
    assert (data["error"]["type"], data["error"]["code"]) == ("api_error", "stream_interrupted")
    assert len(anthropic_gateway.upstream.requests) == 1, "a started stream must not be replayed"
    record = await the_record(flush_records)
    assert (record.outcome, record.error_type) == ("stream_error", "ReadError")
    # The input was reported at the start; the output never was, so it is estimated from the
    # text that did stream (and is billed).
    assert record.prompt_tokens == 1300
    assert record.usage_source == "estimated" and record.completion_tokens >= 5


async def test_a_stream_that_ends_without_message_stop_is_reported_as_truncated(
    anthropic_gateway, flush_records
):
    anthropic_gateway.upstream.first(
        streaming(message_start(), BLOCK_START, text_delta("Hi"), BLOCK_STOP, message_delta())
    )
    _, chunks, _ = await stream(anthropic_gateway)
    name, data = parsed(chunks)[-1]
    assert (name, data["error"]["code"]) == ("error", "stream_truncated")
    record = await the_record(flush_records)
    assert (record.outcome, record.error_type) == ("stream_error", "truncated")
    assert record.completion_tokens == 50  # message_delta did arrive: reported, not estimated


async def test_an_upstream_error_event_is_passed_on_and_recorded(anthropic_gateway, flush_records):
    overloaded = event(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    anthropic_gateway.upstream.first(
        streaming(message_start(), BLOCK_START, text_delta("Hi"), overloaded)
    )
    _, chunks, _ = await stream(anthropic_gateway)
    assert chunks[-1] == overloaded
    assert [name for name, _ in parsed(chunks)].count("error") == 1, "no second error event"
    record = await the_record(flush_records)
    assert (record.outcome, record.error_type) == ("stream_error", "upstream_error_event")


async def test_a_stream_that_fails_before_its_first_byte_goes_to_the_next_key(
    anthropic_gateway, flush_records
):
    anthropic_gateway.upstream.then("a1", streaming(httpx.ReadError("reset before any byte")))
    response, chunks, _ = await stream(anthropic_gateway)
    assert response["x-llmrotate-key"] == "claude-2"
    assert b"".join(chunks) == b"".join(events(["Hel", "lo", "!"]))


async def test_a_429_to_a_stream_request_goes_to_the_next_key(anthropic_gateway, flush_records):
    anthropic_gateway.upstream.then(
        "a1", error(429, "rate_limit_error", headers={"retry-after": "10"})
    )
    response, chunks, _ = await stream(anthropic_gateway)
    assert response.status_code == 200
    assert response["x-llmrotate-attempts"] == "2"
    assert parsed(chunks)[-1][0] == "message_stop"


async def test_message_delta_counts_replace_message_start_ones_but_nulls_do_not(
    anthropic_gateway, flush_records
):
    delta = event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 60, "input_tokens": 150, "cache_read_input_tokens": None},
        }
    )
    anthropic_gateway.upstream.first(
        streaming(message_start(), BLOCK_START, text_delta("Hi"), BLOCK_STOP, delta, MESSAGE_STOP)
    )
    await stream(anthropic_gateway)
    record = await the_record(flush_records)
    # 150 input (updated) + 1000 cache reads (kept) + 200 cache writes; 60 output.
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (
        1350,
        1000,
        60,
    )


async def test_events_without_event_lines_are_read_by_their_type(anthropic_gateway, flush_records):
    # What an intermediary that keeps only `data:` lines passes on.
    bare = [e.split(b"\n", 1)[1] for e in events(["Hel", "lo", "!"])]
    anthropic_gateway.upstream.first(streaming(*bare))
    _, chunks, _ = await stream(anthropic_gateway)
    assert b"".join(chunks) == b"".join(bare)
    record = await the_record(flush_records)
    assert (record.outcome, record.completion_tokens) == ("success", 50)
    assert record.ttft_ms is not None


async def test_a_stream_that_opens_with_an_error_event_goes_to_the_next_key(
    anthropic_gateway, flush_records
):
    overloaded = event(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    anthropic_gateway.upstream.first(streaming(overloaded))
    response, chunks, _ = await stream(anthropic_gateway)
    assert response["x-llmrotate-attempts"] == "2"
    assert overloaded not in chunks
    flush_records()
    rows = [r async for r in CallRecord.objects.order_by("attempt")]
    assert [r.outcome for r in rows] == ["upstream_error", "success"]
