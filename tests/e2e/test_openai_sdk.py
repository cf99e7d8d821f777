"""The official OpenAI SDK through the running gateway to a fake upstream, all over loopback.

The same behaviours as tests/proxy, but with real sockets at both ends: uvicorn in front,
httpx's connection pool behind, a server that really drops connections and cuts streams.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from keys.state_store import get_key_state_store
from tests.e2e.conftest import ROUTE, LiveGateway, RawCapture, call_records

pytestmark = pytest.mark.timeout(60)

PROMPT = [{"role": "user", "content": "Say hi"}]
# The fake upstream's deterministic answer to PROMPT: the prompt echoed, then filler words up
# to its default of 16 completion tokens (one word each).
REPLY = "This is a fake reply to: Say hi lorem ipsum dolor sit amet consectetur adipiscing elit"
PROMPT_TOKENS, COMPLETION_TOKENS = 2, 16


def chat(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.create(model=ROUTE, messages=PROMPT, **extra)


def stream_chunks(client: openai.OpenAI, **extra: Any) -> list[Any]:
    return list(chat(client, stream=True, **extra))


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- the happy path -----------------------------------------------------------------------------


def test_a_completion_comes_back_through_the_gateway(live_gateway: LiveGateway, client):
    raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=PROMPT)
    completion = raw.parse()
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == ROUTE
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
    )
    assert raw.headers["x-llmrotate-attempts"] == "1"
    [record] = call_records(1)
    assert record.request_id == raw.headers["x-llmrotate-request-id"]
    assert record.key_id == raw.headers["x-llmrotate-key"]
    assert (record.outcome, record.status_code, record.stream) == ("success", 200, False)
    assert (record.prompt_tokens, record.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)
    assert record.usage_source == "reported"
    assert record.client == "e2e"


def test_a_stream_arrives_delta_by_delta(live_gateway: LiveGateway, client):
    chunks = stream_chunks(client)
    assert text_of(chunks) == REPLY
    # One chunk per word plus the role chunk and the finish chunk: passed through, not merged.
    assert len(chunks) == COMPLETION_TOKENS + 2
    assert chunks[-1].choices[0].finish_reason == "stop"
    [record] = call_records(1)
    assert (record.outcome, record.stream) == ("success", True)
    assert record.ttft_ms is not None and record.ttft_ms > 0


def test_models_lists_the_routes(live_gateway: LiveGateway, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [ROUTE]
    assert models.data[0].owned_by == "llmrotate"
    assert live_gateway.upstream.stats()["total"] == 0


def test_calls_rotate_over_both_keys(live_gateway: LiveGateway, client):
    for _ in range(4):
        assert chat(client).choices[0].message.content == REPLY
    assert live_gateway.requests_per_key() == {"key-a": 2, "key-b": 2}


# --- failover and key health --------------------------------------------------------------------


def test_a_429_on_the_first_key_succeeds_on_the_second_and_both_attempts_are_recorded(
    live_gateway: LiveGateway, client
):
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "429", "retry_after": 20}])
    raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=PROMPT)
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-llmrotate-attempts"] == "2"
    assert raw.headers["x-llmrotate-key"] == "key-b"
    assert live_gateway.requests_per_key() == {"key-a": 1, "key-b": 1}

    first, second = call_records(2)
    assert first.request_id == second.request_id == raw.headers["x-llmrotate-request-id"]
    assert (first.attempt, first.key_id, first.outcome, first.status_code) == (
        1,
        "key-a",
        "rate_limited",
        429,
    )
    assert (second.attempt, second.key_id, second.outcome, second.status_code) == (
        2,
        "key-b",
        "success",
        200,
    )
    state, _ = get_key_state_store().get_many(["key-a"], now=time.time())["key-a"]
    assert state.status == "cooldown"
    assert state.cooldown_until >= time.time() + 18  # Retry-After honoured, never shortened

    # The cooling key is left alone while it cools.
    for _ in range(3):
        chat(client)
    assert live_gateway.requests_per_key() == {"key-a": 1, "key-b": 4}


def test_a_401_quarantines_the_key_and_later_calls_avoid_it(live_gateway: LiveGateway, client):
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "401"}])
    assert chat(client).choices[0].message.content == REPLY
    states = get_key_state_store().get_many(["key-a", "key-b"], now=time.time())
    assert states["key-a"][0].status == "quarantined"
    assert states["key-b"][0].status == "active"
    for _ in range(3):
        chat(client)
    # key-a, first in priority, was asked once and never again.
    assert live_gateway.requests_per_key() == {"key-a": 1, "key-b": 4}
    assert [r.outcome for r in call_records(5)][:2] == ["auth_failed", "success"]


def test_when_every_key_cools_down_the_sdk_gets_503_with_retry_after(
    live_gateway: LiveGateway, client
):
    live_gateway.script(
        key_a=[{"fault": "429", "retry_after": 40}], key_b=[{"fault": "429", "retry_after": 40}]
    )
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            chat(client)
        error = caught.value
        assert error.status_code == 503
        assert isinstance(error.body, dict) and error.body["code"] == "no_key_available"
        # 40 s asked by the upstream, plus at most 10% jitter, rounded up.
        assert 39 <= int(error.response.headers["retry-after"]) <= 45
    # Both keys were tried once by the first call; the second call did not touch the upstream.
    assert live_gateway.upstream.stats()["total"] == 2
    assert live_gateway.requests_per_key() == {"key-a": 1, "key-b": 1}


def test_a_dropped_connection_fails_over_to_the_other_key(live_gateway: LiveGateway, client):
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "drop"}])
    raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=PROMPT)
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-llmrotate-key"] == "key-b"
    assert [(r.key_id, r.outcome) for r in call_records(2)] == [
        ("key-a", "connection_error"),
        ("key-b", "success"),
    ]


def test_upstream_500_everywhere_gives_the_sdk_a_502(live_gateway: LiveGateway, client):
    live_gateway.script(key_a={"default": {"fault": "500"}}, key_b={"default": {"fault": "500"}})
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client)
    assert caught.value.status_code == 502
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "upstream_error"
    assert live_gateway.requests_per_key() == {"key-a": 1, "key-b": 1}
    assert {r.outcome for r in call_records(2)} == {"upstream_error"}


# --- streams ------------------------------------------------------------------------------------


def test_a_stream_cut_midway_raises_in_the_sdk_and_is_not_replayed(
    live_gateway: LiveGateway, client
):
    cut = [{"fault": "cut", "cut_after": 3}]
    live_gateway.script(key_a=cut, key_b=cut)  # whichever key is picked dies midway
    received: list[Any] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in chat(client, stream=True):
            received.append(chunk)
    assert not isinstance(caught.value, openai.APIStatusError)  # the 200 had already begun
    partial = text_of(received)
    assert partial and REPLY.startswith(partial) and partial != REPLY
    assert live_gateway.upstream.stats()["total"] == 1
    [record] = call_records(1)
    assert (record.outcome, record.stream) == ("stream_error", True)


def test_a_stream_that_dies_before_its_first_byte_is_answered_by_the_other_key(
    live_gateway: LiveGateway, client
):
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "cut", "cut_after": 0}])  # headers, then a reset
    assert text_of(stream_chunks(client)) == REPLY
    assert live_gateway.requests_per_key() == {"key-a": 1, "key-b": 1}
    assert [(r.key_id, r.outcome) for r in call_records(2)] == [
        ("key-a", "connection_error"),
        ("key-b", "success"),
    ]


def test_a_client_that_leaves_mid_stream_frees_its_key_and_is_recorded(
    live_gateway: LiveGateway, client
):
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"token_delay_ms": 300}])  # about 5 s for the whole answer
    stream = chat(client, stream=True)
    next(iter(stream))
    stream.close()
    [record] = call_records(1)
    assert (record.key_id, record.outcome, record.status_code) == (
        "key-a",
        "client_disconnected",
        200,
    )
    assert record.latency_ms < 3000, "the gateway kept streaming to a client that had left"
    state, inflight = get_key_state_store().get_many(["key-a"], now=time.time())["key-a"]
    assert (inflight, state.total_failures) == (0, 0)


def test_the_usage_chunk_is_stripped_unless_the_client_asked(live_gateway: LiveGateway, client):
    chunks = stream_chunks(client)
    assert all(c.choices for c in chunks), "a usage-only chunk reached a client that did not ask"
    assert all(c.usage is None for c in chunks)
    # The gateway asked anyway, to record the real numbers.
    upstream_body = live_gateway.upstream.stats()["last_request_bodies"][-1]
    assert upstream_body["stream_options"] == {"include_usage": True}
    [record] = call_records(1)
    assert (record.prompt_tokens, record.completion_tokens, record.usage_source) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        "reported",
    )


def test_the_usage_chunk_is_passed_on_when_the_client_asked(live_gateway: LiveGateway, client):
    chunks = stream_chunks(client, stream_options={"include_usage": True})
    assert text_of(chunks) == REPLY
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        PROMPT_TOKENS + COMPLETION_TOKENS,
    )
    assert sum(1 for c in chunks if not c.choices) == 1


# --- records and logs ---------------------------------------------------------------------------


def test_every_attempt_is_one_usage_log_line_and_one_call_record(
    live_gateway: LiveGateway, client, usage_log
):
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "429", "retry_after": 20}])
    chat(client)  # two attempts: 429 on key-a, success on key-b
    stream_chunks(client)  # one attempt on key-b
    rows = call_records(3)
    lines = usage_log()
    assert len(lines) == 3
    assert sorted((line["request_id"], line["attempt"], line["outcome"]) for line in lines) == (
        sorted((r.request_id, r.attempt, r.outcome) for r in rows)
    )
    by_attempt = {(line["request_id"], line["attempt"]): line for line in lines}
    for row in rows:
        line = by_attempt[(row.request_id, row.attempt)]
        assert (line["key_id"], line["status_code"], line["stream"]) == (
            row.key_id,
            row.status_code,
            row.stream,
        )
        assert line["completion_tokens"] == row.completion_tokens


def test_no_secret_reaches_an_error_body_or_any_log(
    live_gateway: LiveGateway, client, usage_log, raw_log: RawCapture, caplog
):
    caplog.set_level(logging.DEBUG)
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "401"}], key_b=[{"fault": "500"}])
    bodies: list[str] = []

    def fails(status: int, call: Callable[[], Any]) -> None:
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert caught.value.status_code == status
        bodies.append(caught.value.response.text)

    fails(502, lambda: chat(client))  # 401 on key-a (quarantined), then 500 on key-b
    assert chat(client).choices[0].message.content == REPLY  # key-b alone
    live_gateway.script(key_b=[{"fault": "cut"}])
    with pytest.raises(openai.APIError):  # a stream cut midway
        stream_chunks(client)
    live_gateway.script(key_b={"default": {"fault": "429", "retry_after": 30}})
    fails(503, lambda: chat(client))
    fails(401, lambda: chat(live_gateway.openai(token=live_gateway.token + "x")))
    fails(404, lambda: client.chat.completions.create(model="nope", messages=PROMPT))
    # Five attempts, and the two refusals (401, 404): a record each, attempt 0.
    assert len(call_records(7)) == 7
    lines = usage_log()
    assert len(lines) == 7
    assert raw_log.lines, "nothing was logged: the capture is not working"
    text = "\n".join([*bodies, caplog.text, *raw_log.lines, *map(json.dumps, lines)])
    for secret in [*live_gateway.secrets.values(), live_gateway.token]:
        assert secret not in text
