"""What each request leaves behind besides its attempts: exactly one final row with the status
the client got (attempt 0 when no attempt was made), its tool calls, session and turn, who
called, and the prompt as the gateway counts it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db.models import Sum
from django.test import AsyncClient

from keys.health import CallResult, KeyPolicy, Outcome
from keys.state_store import get_key_state_store
from proxy.dialects import MAX_TOOL_NAMES, ToolCalls
from tests.proxy.anthropic_wire import event, message, message_delta, message_start
from tests.proxy.conftest import (
    DONE,
    AnthropicGateway,
    Gateway,
    chunk_event,
    completion,
    status,
    streaming,
)
from usage.models import CallRecord, MinuteRollup, SessionRollup, ToolRollup
from usage.sketches import sketch_count

pytestmark = pytest.mark.asyncio
HI = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def post(gateway: Gateway, body: dict[str, Any] | None = None, **headers: str) -> Any:
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(body or HI),
        content_type="application/json",
        headers={**gateway.headers(), **headers},
    )


async def records(flush: Callable[[], None]) -> list[CallRecord]:
    await sync_to_async(flush)()
    return [r async for r in CallRecord.objects.order_by("id")]


@sync_to_async
def rollup_sum(*columns: str) -> dict[str, Any]:
    return MinuteRollup.objects.aggregate(**{c: Sum(c) for c in columns})


async def test_a_request_that_failed_over_has_one_final_row_and_counts_once(
    gateway: Gateway, flush_records
):
    gateway.upstream.first(status(500))
    assert (await post(gateway)).status_code == 200
    first, second = await records(flush_records)
    assert (first.final, first.client_status) == (False, None)
    assert (second.final, second.client_status) == (True, 200)
    assert await rollup_sum("calls", "requests") == {"calls": 2, "requests": 1}
    # The prompt is counted once, on the final row: the attempt that failed over has none.
    assert (first.counted_prompt_tokens, first.forwarded_prompt_tokens) == (None, None)
    assert (second.counted_prompt_tokens, second.forwarded_prompt_tokens) == (8, 8)


async def test_a_give_up_marks_the_last_attempt_with_the_status_the_client_got(
    gateway: Gateway, flush_records
):
    gateway.upstream.then("k1", status(429, headers={"retry-after": "30"}))
    gateway.upstream.then("k2", status(429, headers={"retry-after": "30"}))
    assert (await post(gateway)).status_code == 503
    rows = await records(flush_records)
    assert [(r.final, r.client_status) for r in rows] == [(False, None), (True, 503)]


async def test_a_request_answered_without_any_attempt_still_counts_as_a_request(
    gateway: Gateway, flush_records
):
    store, now = get_key_state_store(), time.time()
    for key_id in ("openai-1", "openai-2"):
        limited = CallResult(Outcome.RATE_LIMITED, now=now, policy=KeyPolicy(), retry_after=60)
        await store.record(key_id, limited)
    assert (await post(gateway, **{"X-Session-Id": "s-1"})).status_code == 503
    [row] = await records(flush_records)
    assert (row.attempt, row.outcome, row.final, row.client_status) == (
        0,
        "unavailable",
        True,
        503,
    )
    assert (row.key_id, row.session_id) == ("", "s-1")
    assert await rollup_sum("calls", "requests") == {"calls": 0, "requests": 1}


async def test_a_relayed_client_error_is_the_final_row_with_its_status(
    gateway: Gateway, flush_records
):
    gateway.upstream.first(status(422))
    assert (await post(gateway)).status_code == 422
    [row] = await records(flush_records)
    assert (row.final, row.client_status, row.status_code) == (True, 422, 422)


def with_tools(request: httpx.Request) -> httpx.Response:
    body = completion("gpt-4o-mini")
    body["choices"][0]["message"]["tool_calls"] = [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    return httpx.Response(200, json=body)


async def test_tool_calls_of_a_json_answer_are_counted_with_their_names(
    gateway: Gateway, flush_records
):
    gateway.upstream.first(with_tools)
    assert (await post(gateway)).status_code == 200
    [row] = await records(flush_records)
    assert (row.tool_calls, row.tool_names) == (2, ["get_weather", "get_time"])
    assert await rollup_sum("tool_calls") == {"tool_calls": 2}
    names = await sync_to_async(
        lambda: sorted(ToolRollup.objects.values_list("tool_name", "calls"))
    )()
    assert names == [("get_time", 1), ("get_weather", 1)]


async def test_tool_calls_of_a_stream_are_counted_once_each_across_their_deltas(
    gateway: Gateway, flush_records
):
    def call(index: int, **function: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, "function": function}]}

    gateway.upstream.first(
        streaming(
            chunk_event({"role": "assistant", "content": None}),
            chunk_event(call(0, name="lookup", arguments="")),
            chunk_event(call(0, arguments='{"q":')),
            chunk_event(call(0, arguments='"x"}')),
            chunk_event(call(1, name="search", arguments="{}")),
            chunk_event({}, "tool_calls"),
            DONE,
        )
    )
    response = await post(gateway, {**HI, "stream": True})
    b"".join([chunk async for chunk in response.streaming_content])
    [row] = await records(flush_records)
    assert (row.tool_calls, row.tool_names, row.client_status) == (2, ["lookup", "search"], 200)


async def test_tool_names_are_kept_printable_bounded_and_few_while_every_call_counts():
    tools = ToolCalls()
    tools.add("get weather\n\x00" + "x" * 300)  # an upstream's name is not trusted
    tools.add(None)  # a call without a name still counts
    for i in range(MAX_TOOL_NAMES + 3):
        tools.add(f"t{i}")
    assert tools.count == MAX_TOOL_NAMES + 5
    assert len(tools.names) == MAX_TOOL_NAMES
    assert tools.names[0] == ("get_weather_" + "x" * 300)[:64]


def tool_use_message(request: httpx.Request) -> httpx.Response:
    body = message()
    body["content"] = [{"type": "tool_use", "id": "t1", "name": "calculator", "input": {}}]
    return httpx.Response(200, json=body)


async def test_anthropic_tool_use_is_counted_streamed_or_not(
    anthropic_gateway: AnthropicGateway, flush_records
):
    anthropic_gateway.upstream.first(tool_use_message)
    block = {"type": "tool_use", "id": "t2", "name": "browser", "input": {}}
    anthropic_gateway.upstream.first(
        streaming(
            message_start(),
            event({"type": "content_block_start", "index": 0, "content_block": block}),
            event({"type": "content_block_stop", "index": 0}),
            message_delta(),
            event({"type": "message_stop"}),
        )
    )
    base = {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    for body in (base, {**base, "stream": True}):
        response = await AsyncClient().post(
            "/v1/messages",
            data=json.dumps(body),
            content_type="application/json",
            headers=anthropic_gateway.headers(),
        )
        if body.get("stream"):
            b"".join([chunk async for chunk in response.streaming_content])
    rows = await records(flush_records)
    assert [(r.tool_calls, r.tool_names) for r in rows] == [(1, ["calculator"]), (1, ["browser"])]


@pytest.mark.parametrize(
    ("extra_body", "headers", "session"),
    [
        ({}, {"X-Session-Id": "from-header"}, "from-header"),
        ({"metadata": {"session_id": "from-metadata"}, "user": "u-1"}, {}, "from-metadata"),
        ({"user": "from-user"}, {}, "from-user"),
    ],
)
async def test_the_session_comes_from_the_header_then_metadata_then_user(
    gateway: Gateway, flush_records, extra_body, headers, session
):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert (
        await post(gateway, {**HI, "messages": messages, **extra_body}, **headers)
    ).status_code == 200
    [row] = await records(flush_records)
    assert (row.session_id, row.turn) == (session, 2)
    rollups = await sync_to_async(list)(SessionRollup.objects.order_by("bucket_seconds"))
    assert [(r.bucket_seconds, r.requests) for r in rollups] == [(3600, 1), (86400, 1)]
    assert [sketch_count(bytes(r.sketch)) for r in rollups] == [1, 1]


async def test_who_called_is_kept_bounded_and_without_credentials(gateway: Gateway, flush_records):
    headers = {
        "User-Agent": "my-app/1.2 " + "x" * 500,
        "Origin": "https://user:pw@app.example.com:8443/path?token=secret",
        "X-Title": "Support bot\n\x00with sk-proj-abcdefghijklmnopqrstuvwx inside",
    }
    assert (await post(gateway, **headers)).status_code == 200
    [row] = await records(flush_records)
    assert row.user_agent.startswith("my-app/1.2 ") and len(row.user_agent) == 200
    assert row.origin == "https://app.example.com:8443"
    assert "\n" not in row.app_title and "\x00" not in row.app_title
    assert "abcdefghijklmnopqrstuvwx" not in row.app_title


async def test_the_prompt_is_counted_as_sent_and_as_forwarded_beside_reported_usage(
    gateway: Gateway, flush_records
):
    assert (await post(gateway)).status_code == 200
    [row] = await records(flush_records)
    # "user" and "hi": 2 tokens, 3 of framing for the message and 3 priming the reply.
    assert row.counted_prompt_tokens == 8
    assert row.forwarded_prompt_tokens == 8
    assert (row.prompt_tokens, row.usage_source) == (12, "reported")
    totals = await rollup_sum("reconciled_reported_tokens", "reconciled_counted_tokens")
    assert totals == {"reconciled_reported_tokens": 12, "reconciled_counted_tokens": 8}


async def test_a_non_streamed_call_gets_its_completion_rate_over_the_whole_call(
    gateway: Gateway, flush_records
):
    async def slow_answer(request: httpx.Request) -> httpx.Response:
        import asyncio

        await asyncio.sleep(0.05)
        return httpx.Response(200, json=completion("gpt-4o-mini"))

    gateway.upstream.first(slow_answer)
    assert (await post(gateway)).status_code == 200
    [row] = await records(flush_records)
    seconds = (row.finished_at - row.started_at).total_seconds()
    assert row.tokens_per_second is not None
    assert row.tokens_per_second == pytest.approx(3 / seconds, rel=0.2)
    assert row.ttlt_ms is not None
