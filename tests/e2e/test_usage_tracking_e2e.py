"""Issue #9's usage tracking, proved end to end: the official openai and anthropic SDKs,
unchanged, through the live gateway to the real fake upstream, then the call records, the
rollups and the selectors the monitoring API reads.

Records are written by the recorder thread after the answer is out, so every check waits for
its rows with a deadline (`request_rows`) instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.e2e.conftest import ROUTE, LiveGateway, wait_for
from tests.e2e.test_anthropic_sdk import CLAUDE, Claude, anthropic_config

pytestmark = pytest.mark.timeout(90)

# Two calls of the same tool in one answer, and one of another: counts are per call, names are
# kept in answer order.
TOOLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    {"name": "search_docs", "arguments": '{"query": "rotate keys", "limit": 3}'},
    {"name": "get_weather", "arguments": {"city": "Oslo"}},
]
TOOL_NAMES = ["get_weather", "search_docs", "get_weather"]
OPENAI_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} for the test",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    for name in ("get_weather", "search_docs")
]
ANTHROPIC_TOOLS: list[Any] = [
    {"name": name, "description": f"{name} for the test", "input_schema": {"type": "object"}}
    for name in ("get_weather", "search_docs")
]
PROMPT: list[Any] = [{"role": "user", "content": "Say hi"}]
# Three user messages: the third turn of a conversation.
CONVERSATION: list[Any] = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "What is the weather?"},
    {"role": "assistant", "content": "Where?"},
    {"role": "user", "content": "In Paris"},
]
SYSTEM_AND_CONVERSATION: list[Any] = [
    {"role": "system", "content": "You are terse."},
    *CONVERSATION,
]


def request_rows(request_id: str, *, attempts: int = 1, timeout: float = 15) -> list[Any]:
    """The CallRecord rows of one request (by attempt) once all `attempts` and its final row
    are written."""
    from usage.models import CallRecord
    from usage.recorder import get_recorder

    def ready() -> list[Any] | None:
        assert get_recorder().flush(timeout=timeout)
        rows = list(CallRecord.objects.filter(request_id=request_id).order_by("attempt"))
        assert len(rows) <= attempts, f"more rows than expected for {request_id}: {rows}"
        return rows if len(rows) == attempts and any(r.final for r in rows) else None

    return wait_for(ready, timeout=timeout, message=f"{attempts} rows of {request_id}")


def final_row(request_id: str) -> Any:
    [row] = request_rows(request_id)
    assert row.final and row.attempt == 1
    return row


def rollup_sums(*columns: str) -> dict[str, dict[str, int]]:
    """Each column summed over every rollup row, per resolution (they must agree)."""
    from django.db.models import Sum

    from usage.models import DayRollup, HourRollup, MinuteRollup

    out = {}
    for model in (MinuteRollup, HourRollup, DayRollup):
        sums = model.objects.aggregate(**{c: Sum(c) for c in columns})
        out[model.__name__] = {c: sums[c] or 0 for c in columns}
    return out


def assert_rollups(**expected: int) -> None:
    sums = rollup_sums(*expected)
    for resolution, got in sums.items():
        assert got == expected, f"{resolution}: {got} != {expected}"


def openai_json(client: openai.OpenAI, **extra: Any) -> tuple[str, Any]:
    extra.setdefault("messages", PROMPT)
    raw = client.chat.completions.with_raw_response.create(model=ROUTE, **extra)
    return raw.headers["x-llmrotate-request-id"], raw.parse()


def openai_stream(client: openai.OpenAI, **extra: Any) -> tuple[str, list[Any]]:
    extra.setdefault("messages", PROMPT)
    raw = client.chat.completions.with_raw_response.create(model=ROUTE, stream=True, **extra)
    return raw.headers["x-llmrotate-request-id"], list(raw.parse())


def anthropic_json(client: anthropic.Anthropic, **extra: Any) -> tuple[str, Any]:
    extra.setdefault("messages", PROMPT)
    raw = client.messages.with_raw_response.create(model=CLAUDE, max_tokens=64, **extra)
    return raw.headers["x-llmrotate-request-id"], raw.parse()


def anthropic_stream(client: anthropic.Anthropic, **extra: Any) -> tuple[str, list[Any]]:
    extra.setdefault("messages", PROMPT)
    raw = client.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=64, stream=True, **extra
    )
    return raw.headers["x-llmrotate-request-id"], list(raw.parse())


def streamed_tool_names(chunks: list[Any]) -> list[str]:
    return [
        call.function.name
        for chunk in chunks
        if chunk.choices
        for call in chunk.choices[0].delta.tool_calls or ()
        if call.function and call.function.name
    ]


@pytest.fixture
def claude(live_gateway: LiveGateway) -> Iterator[Claude]:
    """The Anthropic provider and `claude-haiku` route on the same fake upstream, beside the
    OpenAI route."""
    from keys.config_io import config_import

    config_import(data=anthropic_config(live_gateway.upstream.base_url))
    helper = Claude(live=live_gateway)
    yield helper
    for client in helper._clients:
        client.close()


def everyone_answers(live: LiveGateway, behaviour: dict[str, Any]) -> None:
    """The same behaviour on every key of both providers, whichever the route picks."""
    live.upstream.script({"default": behaviour})


# --- 1. tool calls ------------------------------------------------------------------------------


def test_openai_tool_calls_are_counted_with_their_names_in_json_and_streamed_answers(
    live_gateway: LiveGateway, client: openai.OpenAI
):
    from common.timeframes import TimeFrame
    from usage.conversation_selectors import tool_calls_by_name
    from usage.filters import UsageFilters
    from usage.selectors import usage_stats

    everyone_answers(live_gateway, {"tool_calls": TOOLS})
    json_id, completion = openai_json(client, tools=OPENAI_TOOLS)
    message = completion.choices[0].message
    assert [c.function.name for c in message.tool_calls] == TOOL_NAMES  # the SDK got them
    stream_id, chunks = openai_stream(client, tools=OPENAI_TOOLS)
    assert streamed_tool_names(chunks) == TOOL_NAMES

    for request_id, stream in ((json_id, False), (stream_id, True)):
        row = final_row(request_id)
        assert (row.stream, row.outcome) == (stream, "success")
        assert (row.tool_calls, row.tool_names) == (3, TOOL_NAMES)

    assert_rollups(tool_calls=6, requests=2, calls=2)
    frame, filters = TimeFrame(), UsageFilters()
    assert tool_calls_by_name(frame=frame, filters=filters) == [
        ("get_weather", 4),
        ("search_docs", 2),
    ]
    from django.utils import timezone

    assert usage_stats(frame=frame, filters=filters, now=timezone.now()).tool_calls == 6


def test_anthropic_tool_calls_are_counted_with_their_names_in_json_and_streamed_answers(
    claude: Claude,
):
    from common.timeframes import TimeFrame
    from usage.conversation_selectors import tool_calls_by_name
    from usage.filters import UsageFilters

    everyone_answers(claude.live, {"tool_calls": TOOLS[:2], "reply": "Let me check."})
    client = claude.client()
    json_id, message = anthropic_json(client, tools=ANTHROPIC_TOOLS)
    assert [b.name for b in message.content if b.type == "tool_use"] == TOOL_NAMES[:2]
    stream_id, events = anthropic_stream(client, tools=ANTHROPIC_TOOLS)
    started = [
        e.content_block.name
        for e in events
        if e.type == "content_block_start" and e.content_block.type == "tool_use"
    ]
    assert started == TOOL_NAMES[:2]

    for request_id in (json_id, stream_id):
        row = final_row(request_id)
        assert (row.provider, row.outcome) == ("fake-anthropic", "success")
        assert (row.tool_calls, row.tool_names) == (2, TOOL_NAMES[:2])

    assert_rollups(tool_calls=4, requests=2)
    assert tool_calls_by_name(
        frame=TimeFrame(), filters=UsageFilters(provider="fake-anthropic")
    ) == [
        ("get_weather", 2),
        ("search_docs", 2),
    ]


def test_a_plain_answer_records_no_tool_call(live_gateway: LiveGateway, client: openai.OpenAI):
    request_id, _ = openai_json(client, tools=OPENAI_TOOLS)
    row = final_row(request_id)
    assert (row.tool_calls, row.tool_names) == (0, [])
    assert_rollups(tool_calls=0, requests=1)


# --- 2. sessions and turns ----------------------------------------------------------------------


def test_openai_sessions_come_from_the_header_then_metadata_then_user(
    live_gateway: LiveGateway, client: openai.OpenAI
):
    from common.timeframes import TimeFrame
    from usage.conversation_selectors import sessions_by_client, sessions_stats
    from usage.filters import UsageFilters

    header = {"X-Session-Id": "sess-header"}
    metadata = {"session_id": "sess-meta"}
    cases: list[tuple[dict[str, Any], str]] = [
        # (what the request carries, the session expected)
        ({"extra_headers": header, "metadata": metadata, "user": "sess-user"}, "sess-header"),
        ({"extra_headers": header}, "sess-header"),
        ({"metadata": metadata, "user": "sess-user"}, "sess-meta"),
        ({"extra_body": {"metadata": metadata}}, "sess-meta"),
        ({"user": "sess-user"}, "sess-user"),
        ({}, ""),
    ]
    for extra, expected in cases:
        request_id, _ = openai_json(client, messages=SYSTEM_AND_CONVERSATION, **extra)
        row = final_row(request_id)
        assert (row.session_id, row.turn) == (expected, 3), extra
    # Streamed, and a first turn: the turn is the user messages of this request.
    request_id, _ = openai_stream(client, extra_headers={"X-Session-Id": "sess-header"})
    row = final_row(request_id)
    assert (row.session_id, row.turn) == ("sess-header", 1)

    stats = sessions_stats(frame=TimeFrame(), filters=UsageFilters())
    # Each request of a session is one of its turns.
    assert (stats.unique_sessions, stats.total_turns, stats.requests) == (3, 6, 6)
    assert stats.total_tokens > 0
    [(client, figures)] = sessions_by_client(frame=TimeFrame(), filters=UsageFilters()).items()
    assert (client, figures.unique_sessions, figures.total_turns) == ("e2e", 3, 6)


def test_anthropic_sessions_come_from_the_header_then_metadata(claude: Claude):
    client = claude.client()
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {
                "extra_headers": {"X-Session-Id": "a-header"},
                "extra_body": {"metadata": {"session_id": "a-meta"}},
            },
            "a-header",
        ),
        ({"extra_body": {"metadata": {"session_id": "a-meta"}}}, "a-meta"),
        ({"metadata": {"user_id": "someone"}}, ""),  # user_id is not a session
    ]
    for extra, expected in cases:
        request_id, _ = anthropic_json(
            client, system="You are terse.", messages=CONVERSATION, **extra
        )
        row = final_row(request_id)
        assert (row.provider, row.session_id, row.turn) == ("fake-anthropic", expected, 3), extra
    request_id, _ = anthropic_stream(client, extra_headers={"X-Session-Id": "a-stream"})
    row = final_row(request_id)
    assert (row.stream, row.session_id, row.turn) == (True, "a-stream", 1)


# --- 3. token reconciliation --------------------------------------------------------------------


def test_reconciliation_counts_every_prompt_and_compares_only_reported_usage(
    live_gateway: LiveGateway, client: openai.OpenAI, claude: Claude
):
    reported_id, completion = openai_json(client, messages=SYSTEM_AND_CONVERSATION)
    assert completion.usage is not None
    everyone_answers(live_gateway, {"usage": False})
    # A stream without include_usage: the gateway asks upstream for usage on its own (so the
    # forwarded body differs from the client's), and this upstream sends none anyway.
    unreported_id, chunks = openai_stream(client, messages=SYSTEM_AND_CONVERSATION)
    assert all(c.usage is None for c in chunks)
    anthropic_id, message = anthropic_json(claude.client(), messages=CONVERSATION)
    assert getattr(message, "usage", None) is None

    reported = final_row(reported_id)
    assert reported.usage_source == "reported"
    assert reported.prompt_tokens == completion.usage.prompt_tokens > 0
    assert reported.total_tokens == completion.usage.total_tokens
    assert reported.counted_prompt_tokens and reported.counted_prompt_tokens > 0
    assert reported.forwarded_prompt_tokens == reported.counted_prompt_tokens  # sent unchanged

    unreported = final_row(unreported_id)
    assert unreported.usage_source in ("estimated", "extrapolated")
    assert unreported.prompt_tokens > 0 and unreported.completion_tokens > 0  # estimated
    assert unreported.counted_prompt_tokens and unreported.counted_prompt_tokens > 0
    assert unreported.forwarded_prompt_tokens and unreported.forwarded_prompt_tokens > 0
    # The same prompt, counted the same way, whatever the upstream reported.
    assert unreported.counted_prompt_tokens == reported.counted_prompt_tokens

    other = final_row(anthropic_id)
    assert other.usage_source in ("estimated", "extrapolated")
    assert other.counted_prompt_tokens and other.counted_prompt_tokens > 0

    counted = sum(r.counted_prompt_tokens for r in (reported, unreported, other))
    forwarded = sum(r.forwarded_prompt_tokens for r in (reported, unreported, other))
    assert_rollups(
        counted_prompt_tokens=counted,
        forwarded_prompt_tokens=forwarded,
        # Only the call with both a count and a reported usage is compared.
        reconciled_reported_tokens=reported.prompt_tokens,
        reconciled_counted_tokens=reported.counted_prompt_tokens,
        reported_tokens=reported.total_tokens,
        estimated_tokens=unreported.total_tokens + other.total_tokens,
    )
    from django.utils import timezone

    from common.timeframes import TimeFrame
    from usage.filters import UsageFilters
    from usage.selectors import usage_stats

    tokens = usage_stats(frame=TimeFrame(), filters=UsageFilters(), now=timezone.now()).tokens
    assert (tokens.reconciled_reported, tokens.reconciled_counted) == (
        reported.prompt_tokens,
        reported.counted_prompt_tokens,
    )
    assert (tokens.counted_prompt, tokens.forwarded_prompt) == (counted, forwarded)


# --- 4. requests vs attempts --------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "429"])
def test_a_failover_is_one_request_and_two_attempts(
    live_gateway: LiveGateway, client: openai.OpenAI, fault: str
):
    from django.utils import timezone

    from common.timeframes import TimeFrame
    from usage.filters import UsageFilters
    from usage.selectors import usage_stats

    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": fault}])
    raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=PROMPT)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-llmrotate-attempts"] == "2"
    assert live_gateway.requests_per_key() == {"key-a": 1, "key-b": 1}

    first, second = request_rows(raw.headers["x-llmrotate-request-id"], attempts=2)
    assert (first.attempt, first.key_id, first.status_code, first.final) == (
        1,
        "key-a",
        int(fault),
        False,
    )
    assert first.client_status is None
    assert (second.attempt, second.key_id, second.final, second.client_status) == (
        2,
        "key-b",
        True,
        200,
    )
    assert_rollups(requests=1, calls=2)
    stats = usage_stats(frame=TimeFrame(), filters=UsageFilters(), now=timezone.now())
    assert (stats.requests, stats.calls) == (1, 2)


def test_an_anthropic_failover_is_one_request_and_two_attempts(claude: Claude):
    claude.prefer("claude-a")
    claude.script(claude_a=[{"fault": "529"}])
    with claude.client().messages.stream(model=CLAUDE, max_tokens=64, messages=PROMPT) as stream:
        assert stream.get_final_message().content
        request_id = stream.response.headers["x-llmrotate-request-id"]
    first, second = request_rows(request_id, attempts=2)
    assert (first.final, first.key_id, second.final, second.key_id) == (
        False,
        "claude-a",
        True,
        "claude-b",
    )
    assert (second.stream, second.client_status) == (True, 200)
    assert_rollups(requests=1, calls=2)


# --- 5. who called ------------------------------------------------------------------------------


def test_the_sdks_user_agent_origin_and_app_title_are_kept_clean(
    live_gateway: LiveGateway, client: openai.OpenAI, claude: Claude
):
    secret = live_gateway.secrets["key-a"]
    headers = {
        "Origin": "https://alice:hunter2@app.example.com:8443/chat?token=abc#frag",
        "X-Title": f"Team dashboard {secret} " + "x" * 300,
    }
    request_id, _ = openai_json(client, extra_headers=headers)
    row = final_row(request_id)
    assert row.user_agent == f"OpenAI/Python {openai.__version__}"
    assert row.origin == "https://app.example.com:8443"
    assert row.app_title.startswith("Team dashboard ")
    assert len(row.app_title) == 100
    assert secret not in row.app_title

    request_id, _ = anthropic_stream(
        claude.client(), extra_headers={"Origin": "http://localhost:3000", "X-Title": "CLI"}
    )
    row = final_row(request_id)
    assert row.user_agent == f"Anthropic/Python {anthropic.__version__}"
    assert (row.origin, row.app_title) == ("http://localhost:3000", "CLI")

    # A browser's opaque origin, and an origin that is no URL at all.
    request_id, _ = openai_json(client, extra_headers={"Origin": "null"})
    assert final_row(request_id).origin == "null"
    request_id, _ = openai_json(client, extra_headers={"Origin": "not a url"})
    assert final_row(request_id).origin == ""
    # A caller's own user agent replaces the SDK's, cut to the column.
    agent = "agent/1.0 " + "y" * 400
    request_id, _ = openai_json(client, extra_headers={"User-Agent": agent})
    assert final_row(request_id).user_agent == agent[:200]
