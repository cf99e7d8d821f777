"""TTFT is the first content, tool-call or reasoning delta, not the first byte, and what comes
before it is passed on at once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.proxy.conftest import DONE, Gateway, chunk_event, post_stream_timed, streaming
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio

DELAY = 0.3  # between the role chunk and the first real delta
ROLE = chunk_event({"role": "assistant", "content": None})
# Usage-only, as OpenAI sends it: no choices.
USAGE_BODY = {
    "choices": [],
    "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
}
USAGE = b"data: " + json.dumps(USAGE_BODY).encode() + b"\n\n"


async def timed_stream(gateway: Gateway) -> tuple[float, list[bytes]]:
    """Milliseconds until the client got its first bytes, and every chunk it got."""
    _, chunks, first_ms = await post_stream_timed(
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},  # so nothing is stripped
        },
        gateway.headers(),
    )
    return first_ms, chunks


async def the_record(flush: Any) -> CallRecord:
    flush()
    [record] = [r async for r in CallRecord.objects.all()]
    return record


async def test_ttft_is_the_first_content_not_the_role_chunk(gateway: Gateway, flush_records):
    gateway.upstream.first(
        streaming(ROLE, DELAY, chunk_event({"content": "Hi"}), chunk_event({}, "stop"), DONE)
    )
    first_byte_ms, chunks = await timed_stream(gateway)
    assert chunks[0] == ROLE, "the role chunk was held back until the content came"
    record = await the_record(flush_records)
    assert record.outcome == "success"
    assert record.ttft_ms is not None and record.ttft_ms >= DELAY * 1000 * 0.95
    assert first_byte_ms < record.ttft_ms - DELAY * 1000 / 2


async def test_ttft_is_the_first_tool_call_delta_and_tool_calls_pass_through_intact(
    gateway: Gateway, flush_records
):
    call = {"index": 0, "id": "call_1", "type": "function"}
    events = [
        ROLE,
        chunk_event({"tool_calls": [{**call, "function": {"name": "weather", "arguments": ""}}]}),
        chunk_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk_event({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk_event({}, "tool_calls"),
        USAGE,
        DONE,
    ]
    gateway.upstream.first(streaming(events[0], DELAY, *events[1:]))
    _, chunks = await timed_stream(gateway)
    assert b"".join(chunks) == b"".join(events)
    record = await the_record(flush_records)
    assert record.outcome == "success"
    assert record.ttft_ms is not None and record.ttft_ms >= DELAY * 1000 * 0.95
    assert record.ttlt_ms is not None and record.ttlt_ms >= record.ttft_ms
    assert (record.completion_tokens, record.usage_source) == (6, "reported")


async def test_tokens_per_second_is_the_generation_rate_after_the_first_token(
    gateway: Gateway, flush_records
):
    words = [chunk_event({"content": w}) for w in ("a", "b", "c", "d", "e", "f")]
    paced: list[bytes | float] = [ROLE, words[0]]
    for word in words[1:]:
        paced += [0.04, word]  # 5 more tokens over ~200 ms: about 25 tokens/s
    gateway.upstream.first(streaming(*paced, chunk_event({}, "stop"), USAGE, DONE))
    await timed_stream(gateway)
    record = await the_record(flush_records)
    assert record.tokens_per_second is not None
    assert 5 <= record.tokens_per_second <= 30


async def test_a_buffered_answer_has_no_tokens_per_second(gateway: Gateway, flush_records):
    # Everything after the first token in one burst: there is no rate to speak of.
    burst = b"".join(chunk_event({"content": w}) for w in ("b", "c", "d", "e", "f"))
    script = [ROLE, DELAY, chunk_event({"content": "a"}), burst, chunk_event({}, "stop")]
    gateway.upstream.first(streaming(*script, USAGE, DONE))
    await timed_stream(gateway)
    record = await the_record(flush_records)
    assert record.completion_tokens == 6 and record.ttft_ms is not None
    assert record.tokens_per_second is None
