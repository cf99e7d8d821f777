"""Splitting an upstream's event stream as the SSE specification says, incrementally, with a
bound on one event's size."""

from __future__ import annotations

import json
import time

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from keys.state_store import get_key_state_store
from proxy.dialects import OPENAI, StreamState, sse_data
from proxy.streaming import SseSplitter
from tests.proxy.conftest import DONE, Gateway, chunk_event, streaming
from tests.proxy.test_streaming import stream
from usage.models import CallRecord


def split(chunks: list[bytes], *, max_event: int = 1 << 20) -> list[bytes]:
    splitter = SseSplitter(max_event=max_event)
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    assert splitter.rest() == b""
    return events


def test_an_event_in_many_small_chunks_comes_out_whole():
    raw = b'data: {"a": 1}\n\ndata: {"b": 2}\n\n'
    assert split([raw[i : i + 1] for i in range(len(raw))]) == [
        b'data: {"a": 1}\n\n',
        b'data: {"b": 2}\n\n',
    ]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: x\r\n\r\n", b"data: y\r\n\r\n"],
        [b"data: x\r", b"\n\r", b"\ndata: y\r\n", b"\r\n"],  # CRLF cut between chunks
        [b"data: x\r\rdata: y\r\r"],  # bare CR line ends
        [b"data: x\r", b"\r", b"data: y\r", b"\r"],
        [b"data: x\n\ndata: y\n\n"],
    ],
)
def test_every_line_ending_the_specification_allows_ends_events(chunks):
    assert split(chunks) == [b"data: x\n\n", b"data: y\n\n"]


def test_a_bare_cr_event_is_complete_without_waiting_for_the_next_chunk():
    splitter = SseSplitter(max_event=1 << 20)
    assert splitter.feed(b"data: x\r\r") == [b"data: x\n\n"]


def test_several_data_lines_are_joined_with_newlines():
    assert sse_data(b"event: e\ndata: line one\ndata:  two\ndata:three\n\n") == (
        b"e",
        b"line one\n two\nthree",
    )


def test_an_event_past_the_limit_overflows_the_splitter():
    splitter = SseSplitter(max_event=1000)
    assert splitter.feed(b"data: " + b"x" * 900) == []
    assert not splitter.overflowed
    splitter.feed(b"x" * 200)
    assert splitter.overflowed


def test_a_multi_line_openai_chunk_still_counts_as_a_token():
    state = StreamState()
    event = chunk_event({"content": "hi"}).replace(b'", "object', b'",\ndata: "object')
    OPENAI.event(state, event.replace(b"\n\n", b"") + b"\n\n")
    assert state.first_token_at is not None


@pytest.mark.asyncio
async def test_a_stream_whose_event_outgrows_the_limit_ends_with_an_error_and_a_record(
    gateway: Gateway, flush_records
):
    endless = [b"data: " + b"x" * 1000] + [b"y" * 1000] * 20
    gateway.upstream.first(
        streaming(chunk_event({"role": "assistant", "content": "Hi"}), *endless, DONE)
    )
    with override_settings(LLMROTATE_MAX_SSE_EVENT_BYTES=8000):
        _, events = await stream(gateway)
    assert events[-1]["error"]["code"] == "event_too_large"
    await sync_to_async(flush_records)()
    record = await CallRecord.objects.aget()
    assert (record.outcome, record.error_type) == ("stream_error", "event_too_large")
    _, inflight = get_key_state_store().get_many([record.key_id], now=time.time())[record.key_id]
    assert inflight == 0


@pytest.mark.asyncio
async def test_a_crlf_stream_is_relayed_event_by_event(gateway: Gateway):
    def crlf(event: bytes) -> bytes:
        return event.replace(b"\n", b"\r\n")

    gateway.upstream.first(
        streaming(
            crlf(chunk_event({"role": "assistant", "content": ""})),
            crlf(chunk_event({"content": "Hel"}))[:10],
            crlf(chunk_event({"content": "Hel"}))[10:],
            crlf(chunk_event({}, "stop")),
            crlf(DONE),
        )
    )
    _, events = await stream(gateway)
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["", "Hel", None]
    assert events[-1] == "[DONE]"
    assert json.dumps(events)  # every event parsed
