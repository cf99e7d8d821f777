"""Wire-level tests for the fake upstream: no Django, no DB, only 127.0.0.1 sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fake_upstream import FakeUpstream, load_script_file, normalize_behaviour

REPO = Path(__file__).resolve().parents[1]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there, fake"}]}
MSG = {
    "model": "claude-haiku-4-5",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "Hello there, fake"}],
}


def cut_stream_lines(client: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    """The non-empty lines of a stream the fake cuts (the read ends in a protocol error)."""
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", path, json={**body, "stream": True}) as r,
    ):
        received.extend(line for line in r.iter_lines() if line)
    return received


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # Shared: building an httpx.Client (its SSL context) costs ~30 ms, a request ~1 ms.
    with httpx.Client(timeout=5) as c:
        yield c


@pytest.fixture(scope="module")
def _k1_client(fake_upstream_server: FakeUpstream) -> Iterator[httpx.Client]:
    headers = {"authorization": "Bearer k1"}
    with httpx.Client(base_url=fake_upstream_server.base_url, headers=headers, timeout=5) as c:
        yield c


@pytest.fixture
def client(fake: FakeUpstream, _k1_client: httpx.Client) -> httpx.Client:
    """Authenticated as key "k1", against a freshly reset server."""
    return _k1_client


def sse_data(lines: Iterator[str]) -> list[Any]:
    """Decoded `data:` payloads of an OpenAI stream; "[DONE]" kept as a string."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            raw = line[len("data: ") :]
            out.append(raw if raw == "[DONE]" else json.loads(raw))
    return out


def raw_exchange(fake: FakeUpstream, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (the request must ask for close)."""
    with socket.create_connection((fake.host, fake.port), timeout=2) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def post_raw(path: str, body: dict[str, Any], extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + payload


def dechunk(body: bytes) -> list[bytes]:
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


# ---- OpenAI happy paths --------------------------------------------------------------


def test_models_list_requires_auth(
    fake: FakeUpstream, client: httpx.Client, http: httpx.Client
) -> None:
    r = client.get("/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1-mini",
        "claude-3-5-haiku-latest",
    ]
    assert body["data"][0] == {
        "id": "gpt-4o-mini",
        "object": "model",
        "created": body["data"][0]["created"],
        "owned_by": "fake-upstream",
    }
    anon = http.get(f"{fake.base_url}/models")
    assert anon.status_code == 401
    assert anon.json()["error"]["code"] == "invalid_api_key"


def test_json_completion_shape_and_headers(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    for header in (
        "x-request-id",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
    ):
        assert header in r.headers
    assert r.headers["x-ratelimit-reset-requests"] == "1s"
    assert r.headers["x-ratelimit-reset-tokens"] == "6m0s"
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    text = choice["message"]["content"]
    assert text.startswith("This is a fake reply to: Hello there, fake")
    assert len(text.split()) == 16
    usage = body["usage"]
    assert usage["prompt_tokens"] == 3
    assert usage["completion_tokens"] == 16
    assert usage["total_tokens"] == 19
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    # Deterministic apart from ids/timestamps.
    again = client.post("/chat/completions", json=CHAT).json()
    assert again["choices"][0]["message"]["content"] == text
    remaining = int(r.headers["x-ratelimit-remaining-requests"])
    assert remaining == int(r.headers["x-ratelimit-limit-requests"]) - 1


def test_completion_length_behaviour_and_max_tokens(fake: FakeUpstream, client: httpx.Client):
    fake.script(keys={"k1": {"queue": [{"completion_tokens": 3}]}})
    body = client.post("/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"]["content"] == "This is a"
    assert body["usage"]["completion_tokens"] == 3
    body = client.post("/chat/completions", json={**CHAT, "max_completion_tokens": 5}).json()
    assert len(body["choices"][0]["message"]["content"].split()) == 5
    assert body["choices"][0]["finish_reason"] == "length"
    body = client.post("/chat/completions", json={**CHAT, "max_tokens": 100}).json()
    assert body["usage"]["completion_tokens"] == 16


def test_stream_exact_sequence_without_usage(client: httpx.Client) -> None:
    with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["transfer-encoding"] == "chunked"
        events = sse_data(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 1 + 16 + 1
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert "".join(words).startswith("This is a fake reply to:")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_stream_with_include_usage(client: httpx.Client) -> None:
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/chat/completions", json=req) as r:
        events = sse_data(r.iter_lines())
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 16
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 16


def test_each_sse_event_is_its_own_http_chunk(fake: FakeUpstream) -> None:
    raw = raw_exchange(fake, post_raw("/v1/chat/completions", {**CHAT, "stream": True}))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in head
    chunks = dechunk(body)
    assert len(chunks) == 1 + 16 + 1 + 1
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
    assert all(c.count(b"data: ") == 1 for c in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"


def test_tool_call_stream_and_json(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"fault": "tool_call", "times": 2}]}})
    with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as r:
        chunks = sse_data(r.iter_lines())[:-1]
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert first["id"].startswith("call_")
    pieces = [
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]
    ]
    assert len(pieces) == 3
    assert json.loads("".join(pieces)) == {"location": "Paris, France"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    body = client.post("/chat/completions", json=CHAT).json()
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["location"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_sdk_roundtrip(fake: FakeUpstream) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=fake.base_url, api_key="sk-sdk", max_retries=0)
    completion = sdk.chat.completions.create(**CHAT)
    assert completion.choices[0].message.content.startswith("This is a fake reply")
    assert completion.usage.completion_tokens == 16
    stream = sdk.chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 16
    assert next(m.id for m in sdk.models.list()) == "gpt-4o-mini"
    fake.script(keys={"sk-sdk": {"queue": [{"fault": "429", "retry_after": 7}, "quota"]}})
    with pytest.raises(openai.RateLimitError) as exc:
        sdk.chat.completions.create(**CHAT)
    assert exc.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError) as exc:
        sdk.chat.completions.create(**CHAT)
    assert exc.value.code == "insufficient_quota"


# ---- tool calls, scripted replies, answers without usage ------------------------------

TOOLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    {"name": "search_docs", "arguments": '{"query": "rotate keys", "limit": 3}', "id": "call_x"},
]


def validated_openai(body: Any, chunk: bool = False) -> Any:
    """Strict pydantic validation against the SDK's own types (the SDK itself only constructs,
    so a wrong shape would otherwise pass unnoticed until an attribute is read)."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    return (ChatCompletionChunk if chunk else ChatCompletion).model_validate(body)


def validated_anthropic(data: Any, event: bool = False) -> Any:
    from anthropic.types import Message, RawMessageStreamEvent
    from pydantic import TypeAdapter

    if event:
        return TypeAdapter(RawMessageStreamEvent).validate_python(data)
    return Message.model_validate(data)


def anthropic_sse(
    fake: FakeUpstream, body: dict[str, Any], *, validate: bool = True
) -> list[dict[str, Any]]:
    """The events of a streamed message, each checked against the SDK's event types (but
    `ping`, which the SDK skips, and with validate=False for answers scripted without usage,
    a field the SDK's types require)."""
    raw = raw_exchange(fake, post_raw("/v1/messages", {**body, "stream": True}, "x-api-key: a\r\n"))
    events = []
    for piece in dechunk(raw.partition(b"\r\n\r\n")[2]):
        name_line, data_line, *_ = piece.decode().split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name_line.removeprefix("event: ")
        if validate and data["type"] != "ping":
            validated_anthropic(data, event=True)
        events.append(data)
    return events


def test_scripted_tool_calls_openai_json(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"tool_calls": TOOLS}]}})
    body = client.post("/chat/completions", json=CHAT).json()
    completion = validated_openai(body)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name) for c in calls] == [
        ("function", "get_weather"),
        ("function", "search_docs"),
    ]
    assert calls[0].id.startswith("call_") and calls[1].id == "call_x"
    # An object is sent as its JSON text; a string is sent as given.
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert calls[1].function.arguments == '{"query": "rotate keys", "limit": 3}'
    # One token for each name and each streamed piece of the arguments.
    assert body["usage"]["completion_tokens"] == (1 + 4) + (1 + 5)


def test_scripted_tool_calls_openai_stream_chunks(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"tool_calls": TOOLS}]}})
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/chat/completions", json=req) as r:
        events = sse_data(r.iter_lines())
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    for c in events[:-1]:
        validated_openai(c, chunk=True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    # The role chunk carries the first call's start; no text chunk before it.
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    starts = [
        d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]
    ]
    assert starts == [
        {
            "index": 0,
            "id": starts[0]["id"],
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        {
            "index": 1,
            "id": "call_x",
            "type": "function",
            "function": {"name": "search_docs", "arguments": ""},
        },
    ]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    for d in deltas:
        for call in d.get("tool_calls", ()):
            if "id" not in call:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                pieces[call["index"]].append(call["function"]["arguments"])
    assert len(pieces[0]) == 4 and len(pieces[1]) == 5  # arguments really arrive in pieces
    assert json.loads("".join(pieces[0])) == {"city": "Paris", "unit": "celsius"}
    assert "".join(pieces[1]) == '{"query": "rotate keys", "limit": 3}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert usage_chunk["usage"]["completion_tokens"] == 11


def test_tool_calls_through_the_openai_sdk(fake: FakeUpstream) -> None:
    import openai

    sdk = openai.OpenAI(base_url=fake.base_url, api_key="sk-tools", max_retries=0)
    fake.script(keys={"sk-tools": {"queue": [{"tool_calls": TOOLS, "reply": "Let me check."}]}})
    # The SDK's stream helper assembles the calls from the deltas.
    with sdk.chat.completions.stream(**CHAT) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Let me check."
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "search_docs"]
    assert json.loads(message.tool_calls[0].function.arguments)["city"] == "Paris"
    assert json.loads(message.tool_calls[1].function.arguments)["limit"] == 3
    assert final.choices[0].finish_reason == "tool_calls"


def test_scripted_tool_calls_anthropic(fake: FakeUpstream, http: httpx.Client) -> None:
    # The JSON call authenticates with x-api-key; the raw SSE one carries "Bearer k1" as well,
    # and the fake takes the bearer key first.
    fake.script(
        keys={"a": {"queue": [{"tool_calls": TOOLS}]}, "k1": {"queue": [{"tool_calls": TOOLS}]}}
    )
    r = http.post(f"{fake.base_url}/messages", json=MSG, headers={"x-api-key": "a"})
    message = validated_anthropic(r.json())
    assert message.stop_reason == "tool_use"
    assert [(b.type, b.name) for b in message.content] == [
        ("tool_use", "get_weather"),
        ("tool_use", "search_docs"),
    ]
    assert message.content[0].id.startswith("toolu_") and message.content[1].id == "call_x"
    assert message.content[0].input == {"city": "Paris", "unit": "celsius"}
    assert message.content[1].input == {"query": "rotate keys", "limit": 3}
    assert message.usage.output_tokens == 11

    events = anthropic_sse(fake, MSG)
    names = [e["type"] for e in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [s["content_block"]["input"] for s in starts] == [{}, {}]
    assert [(s["index"], s["content_block"]["name"]) for s in starts] == [
        (0, "get_weather"),
        (1, "search_docs"),
    ]
    for index, expected in ((0, TOOLS[0]["arguments"]), (1, {"query": "rotate keys", "limit": 3})):
        deltas = [
            e["delta"] for e in events if e["type"] == "content_block_delta" and e["index"] == index
        ]
        assert {d["type"] for d in deltas} == {"input_json_delta"}
        assert json.loads("".join(d["partial_json"] for d in deltas)) == expected
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"output_tokens": 11}


def test_tool_calls_through_the_anthropic_sdk(fake: FakeUpstream) -> None:
    import anthropic

    sdk = anthropic.Anthropic(
        base_url=fake.base_url.removesuffix("/v1"), api_key="ak-tools", max_retries=0
    )
    behaviour = {"tool_calls": TOOLS, "reply": "Let me check."}
    fake.script(keys={"ak-tools": {"queue": [behaviour, behaviour]}})
    with sdk.messages.stream(**MSG) as stream:
        final = stream.get_final_message()
    message = sdk.messages.create(**MSG)
    for answer in (final, message):
        assert answer.stop_reason == "tool_use"
        assert [b.type for b in answer.content] == ["text", "tool_use", "tool_use"]
        assert answer.content[0].text == "Let me check."
        assert answer.content[1].name == "get_weather"
        assert answer.content[1].input == {"city": "Paris", "unit": "celsius"}
        assert answer.content[2].input == {"query": "rotate keys", "limit": 3}
        assert answer.usage.output_tokens == 3 + 11


def test_scripted_reply_text(fake: FakeUpstream, client: httpx.Client) -> None:
    reply = "Exactly these seven words, nothing else here."
    fake.script(keys={"k1": {"default": {"reply": reply, "completion_tokens": 2}}})
    body = client.post("/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"]["content"] == reply
    assert body["usage"]["completion_tokens"] == 7  # the reply's words, not completion_tokens
    with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as r:
        chunks = sse_data(r.iter_lines())[:-1]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == reply
    capped = client.post("/chat/completions", json={**CHAT, "max_tokens": 3}).json()
    assert capped["choices"][0]["message"]["content"] == "Exactly these seven"
    assert capped["choices"][0]["finish_reason"] == "length"


def test_answers_without_usage(
    fake: FakeUpstream, client: httpx.Client, http: httpx.Client
) -> None:
    fake.script(default={"usage": False})
    body = client.post("/chat/completions", json=CHAT).json()
    assert "usage" not in body
    assert validated_openai(body).usage is None
    assert body["choices"][0]["message"]["content"].startswith("This is a fake reply")
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/chat/completions", json=req) as r:
        events = sse_data(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all("usage" not in c and c["choices"] for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"

    r = http.post(f"{fake.base_url}/messages", json=MSG, headers={"x-api-key": "a"})
    assert r.status_code == 200 and "usage" not in r.json()
    assert r.json()["content"][0]["text"].startswith("This is a fake reply")
    events = anthropic_sse(fake, MSG, validate=False)
    assert "usage" not in events[0]["message"]
    assert events[-2]["type"] == "message_delta" and "usage" not in events[-2]
    # The default reports usage again.
    fake.script(reset=True)
    assert client.post("/chat/completions", json=CHAT).json()["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(
    "bad",
    [
        {"tool_calls": [{"arguments": {}}]},
        {"tool_calls": [{"name": ""}]},
        {"tool_calls": [{"name": "f", "arguments": "[1, 2]"}]},
        {"tool_calls": [{"name": "f", "arguments": "{not json"}]},
        {"tool_calls": [{"name": "f", "arguments": 3}]},
        {"tool_calls": [{"name": "f", "args": {}}]},
        {"tool_calls": [{"name": "f", "id": 7}]},
        {"tool_calls": {"name": "f"}},
        {"usage": "no"},
        {"reply": 5},
    ],
)
def test_bad_tool_call_and_reply_scripts_are_refused(fake: FakeUpstream, bad: dict) -> None:
    with pytest.raises(ValueError):
        fake.script(keys={"k1": {"queue": [bad]}})
    assert fake.stats()["queued"] == {}


def test_tool_call_fault_is_the_default_tool_call() -> None:
    behaviour = normalize_behaviour("tool_call")
    [call] = behaviour["tool_calls"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"location": "Paris, France"})
    assert normalize_behaviour({})["tool_calls"] == ()
    # Scripted calls win over the default one; an error fault wins over both.
    named = normalize_behaviour({"fault": "tool_call", "tool_calls": [{"name": "f"}]})
    assert [c.name for c in named["tool_calls"]] == ["f"]
    assert normalize_behaviour(normalize_behaviour(named))["tool_calls"] == named["tool_calls"]


def test_error_fault_wins_over_scripted_tool_calls(
    fake: FakeUpstream, client: httpx.Client
) -> None:
    fake.script(keys={"k1": {"queue": [{"fault": "503", "tool_calls": TOOLS}]}})
    assert client.post("/chat/completions", json=CHAT).status_code == 503


def test_cut_tool_call_stream(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"fault": "cut", "cut_after": 2, "tool_calls": TOOLS}]}})
    received = cut_stream_lines(client, "/chat/completions", CHAT)
    assert len(received) == 2
    assert "tool_calls" in received[1]


# ---- faults --------------------------------------------------------------------------


def test_429_with_retry_after(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"fault": "429", "retry_after": 5}]}})
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "5"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"] == "5s"
    err = r.json()["error"]
    assert err["type"] == "requests"
    assert err["code"] == "rate_limit_exceeded"
    assert err["param"] is None
    assert err["message"].startswith("Rate limit reached for gpt-4o-mini")
    assert client.post("/chat/completions", json=CHAT).status_code == 200  # one-shot


@pytest.mark.parametrize(
    ("fault", "status", "etype", "code"),
    [
        ("quota", 429, "insufficient_quota", "insufficient_quota"),
        ("402", 402, "billing_error", "payment_required"),
        ("401", 401, "invalid_request_error", "invalid_api_key"),
        ("403", 403, "invalid_request_error", "invalid_api_key"),
        ("500", 500, "server_error", None),
        ("503", 503, "server_error", None),
        ("418", 418, "invalid_request_error", None),
    ],
)
def test_error_faults(fake: FakeUpstream, client: httpx.Client, fault, status, etype, code):
    fake.script(keys={"k1": {"queue": [fault]}})
    r = client.post("/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert (err["type"], err["code"]) == (etype, code)
    assert set(err) == {"message", "type", "param", "code"}
    assert "retry-after" not in r.headers


def test_drop_closes_without_response(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": ["drop"]}})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post("/chat/completions", json=CHAT)
    assert client.post("/chat/completions", json=CHAT).status_code == 200


def test_cut_stream_mid_body(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"fault": "cut", "cut_after": 3}]}})
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        assert r.status_code == 200
        received.extend(line for line in r.iter_lines() if line)
    assert len(received) == 3
    assert "[DONE]" not in received[-1]


def test_cut_json_body_is_short(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": ["cut"]}})
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/chat/completions", json=CHAT)


def test_garbage_body(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": ["garbage"]}})
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        r.json()


def test_inspection_faults_on_the_wire(fake: FakeUpstream, client: httpx.Client) -> None:
    """The faults capture_inspect is tested on: each breaks the answer the way it says."""
    stream = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    fake.script(
        keys={
            "k1": {
                "queue": [
                    "no_done",
                    "no_usage",
                    "error_200",
                    "error_200",
                    {"fault": "bad_tool_args"},
                    "bad_sse",
                    {"usage_completion_tokens": 99},
                ]
            }
        }
    )

    def lines(body: dict[str, Any]) -> list[str]:
        with client.stream("POST", "/chat/completions", json=body) as r:
            assert r.status_code == 200
            return [line for line in r.iter_lines() if line]

    assert lines(stream)[-1] != "data: [DONE]"  # no_done
    assert lines(stream)[-1] == "data: [DONE]"  # no_usage: the stream still ends...
    # ...(checked above) without a usage chunk; error_200 as JSON, then in a stream:
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["error"]["type"] == "server_error"
    last = json.loads(lines(stream)[-1][len("data: ") :])
    assert last["error"]["type"] == "server_error"
    message = client.post("/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["arguments"] == '{"location": "Paris, France"'
    assert "this line is not SSE" in lines(stream)
    assert client.post("/chat/completions", json=CHAT).json()["usage"]["completion_tokens"] == 99
    with pytest.raises(ValueError, match="usage_completion_tokens"):
        normalize_behaviour({"usage_completion_tokens": -1})


def test_no_usage_leaves_usage_out(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": ["no_usage"]}})
    assert "usage" not in client.post("/chat/completions", json=CHAT).json()


def test_latency_and_token_delay(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"latency_ms": 80}, {"token_delay_ms": 10}]}})
    start = time.perf_counter()
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert time.perf_counter() - start >= 0.08
    req = {**CHAT, "stream": True, "max_tokens": 4}
    with client.stream("POST", "/chat/completions", json=req) as r:
        start = time.perf_counter()
        lines = r.iter_lines()
        first = next(lines)
        ttft = time.perf_counter() - start
        list(lines)
        total = time.perf_counter() - start
    assert first.startswith("data: ")
    assert ttft < 0.05
    assert total >= 0.05  # 6 more events, 10 ms apart


# ---- scripting, auth, validation -----------------------------------------------------


def test_queue_then_key_default_then_global_default(fake: FakeUpstream, http: httpx.Client) -> None:
    fake.script(
        keys={"a": {"queue": [{"fault": "500", "times": 2}, "429"], "default": "503"}},
        default="402",
    )

    def status(key: str) -> int:
        headers = {"authorization": f"Bearer {key}"}
        return http.post(
            f"{fake.base_url}/chat/completions", json=CHAT, headers=headers
        ).status_code

    assert fake.stats()["queued"] == {"a": 3}
    assert [status("a") for _ in range(5)] == [500, 500, 429, 503, 503]
    assert status("b") == 402
    fake.script(reset=True)
    assert status("a") == 200
    stats = fake.stats()
    assert stats["requests"] == {"a": 6, "b": 1}
    assert stats["total"] == 7
    assert stats["queued"] == {}
    assert stats["last_request_bodies"][-1] == CHAT


def test_script_rejects_bad_input_atomically(fake: FakeUpstream) -> None:
    for bad in ({"fault": "nope"}, {"latency": 5}, {"fault": "429", "times": -1}):
        with pytest.raises(ValueError):
            fake.script(keys={"ok": {"queue": ["500"]}, "bad": {"queue": [bad]}})
    assert fake.stats()["queued"] == {}
    assert normalize_behaviour("429")["fault"] == "429"


def test_control_api(fake: FakeUpstream, http: httpx.Client) -> None:
    base = f"http://{fake.host}:{fake.port}/_fake"
    script = {"keys": {"k9": {"queue": [{"fault": "429", "retry_after": 2}]}}}
    assert http.post(f"{base}/script", json=script).json() == {"ok": True}
    r = http.post(
        f"{fake.base_url}/chat/completions", json=CHAT, headers={"authorization": "Bearer k9"}
    )
    assert r.status_code == 429
    stats = http.get(f"{base}/stats").json()
    assert stats["requests"] == {"k9": 1}
    assert stats["total"] == 1
    assert stats["last_request_bodies"] == [CHAT]
    bad = http.post(f"{base}/script", json={"keys": {"x": {"queue": ["bogus"]}}})
    assert bad.status_code == 400
    assert "bogus" in bad.json()["error"]
    assert http.post(f"{base}/reset").json() == {"ok": True}
    assert http.get(f"{base}/stats").json()["total"] == 0
    assert http.get(f"{base}/health").json() == {"ok": True}
    assert http.get(f"{base}/nope").status_code == 404


def test_auth_and_validation_errors(
    fake: FakeUpstream, client: httpx.Client, http: httpx.Client
) -> None:
    r = http.post(f"{fake.base_url}/chat/completions", json=CHAT)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post(
        "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    for missing in ("model", "messages"):
        body = {k: v for k, v in CHAT.items() if k != missing}
        r = client.post("/chat/completions", json=body)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == missing
    r = client.post("/moderations", json=CHAT)
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "Invalid URL (POST /v1/moderations)"
    # A malformed request does not consume the scripted behaviour.
    fake.script(keys={"k1": {"queue": ["500"]}})
    assert client.post("/chat/completions", json={"model": "x"}).status_code == 400
    assert client.post("/chat/completions", json=CHAT).status_code == 500


def test_allowed_keys(http: httpx.Client) -> None:
    with FakeUpstream(allowed_keys={"good"}, models=["m1"]) as fake:
        url = f"{fake.base_url}/models"
        assert (
            http.get(url, headers={"authorization": "Bearer good"}).json()["data"][0]["id"] == "m1"
        )
        bad = http.get(url, headers={"authorization": "Bearer sk-wrong-key"})
        assert bad.status_code == 401
        assert bad.json()["error"]["code"] == "invalid_api_key"
        assert "sk-wrong-key" not in bad.json()["error"]["message"]  # masked like OpenAI


def test_malformed_http_gets_400_and_close(fake: FakeUpstream) -> None:
    raw = raw_exchange(fake, b"THIS IS NOT HTTP\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in raw
    raw = raw_exchange(fake, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")


def test_keep_alive_and_chunked_request_body(fake: FakeUpstream) -> None:
    body = json.dumps(CHAT).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    keep = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked
    )
    raw = raw_exchange(fake, keep + post_raw("/v1/chat/completions", CHAT))
    assert raw.count(b"HTTP/1.1 200 OK") == 2  # two responses on one connection
    assert raw.count(b"connection: keep-alive") == 1


# ---- Anthropic -----------------------------------------------------------------------


def test_anthropic_json_and_errors(fake: FakeUpstream, http: httpx.Client) -> None:
    url = f"{fake.base_url}/messages"
    headers = {"x-api-key": "ak1", "anthropic-version": "2023-06-01"}
    r = http.post(url, json=MSG, headers=headers)
    assert r.status_code == 200
    assert "request-id" in r.headers
    body = r.json()
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["id"].startswith("msg_")
    assert body["content"][0]["type"] == "text"
    assert body["content"][0]["text"].startswith("This is a fake reply to:")
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["input_tokens"] == 3
    assert body["usage"]["output_tokens"] == 16
    # Bearer works too.
    assert http.post(url, json=MSG, headers={"authorization": "Bearer ak1"}).status_code == 200
    r = http.post(url, json=MSG)
    assert r.status_code == 401
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error"
    fake.script(keys={"ak1": {"queue": [{"fault": "429", "retry_after": 3}, "quota", "503"]}})
    r = http.post(url, json=MSG, headers=headers)
    assert (r.status_code, r.json()["error"]["type"]) == (429, "rate_limit_error")
    assert r.headers["retry-after"] == "3"
    r = http.post(url, json=MSG, headers=headers)
    assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_request_error")
    assert "credit balance" in r.json()["error"]["message"]
    r = http.post(url, json=MSG, headers=headers)
    assert (r.status_code, r.json()["error"]["type"]) == (503, "overloaded_error")
    r = http.post(url, json={k: v for k, v in MSG.items() if k != "max_tokens"}, headers=headers)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "max_tokens: Field required"


def test_anthropic_sse_sequence(fake: FakeUpstream) -> None:
    raw = raw_exchange(
        fake, post_raw("/v1/messages", {**MSG, "stream": True}, "x-api-key: ak1\r\n")
    )
    _, _, body = raw.partition(b"\r\n\r\n")
    events = []
    for chunk in dechunk(body):
        name_line, data_line, *_ = chunk.decode().split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append(data)
    names = [e["type"] for e in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 16,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["usage"]["input_tokens"] == 3
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text.startswith("This is a fake reply to: Hello there, fake")
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    assert events[-2]["usage"] == {"output_tokens": 16}


def test_anthropic_sdk(fake: FakeUpstream) -> None:
    anthropic = pytest.importorskip("anthropic")
    sdk = anthropic.Anthropic(
        base_url=fake.base_url.removesuffix("/v1"), api_key="ak2", max_retries=0
    )
    message = sdk.messages.create(**MSG)
    assert message.content[0].text.startswith("This is a fake reply")
    with sdk.messages.stream(**MSG) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == message.content[0].text
    assert final.usage.output_tokens == 16
    fake.script(keys={"ak2": {"queue": ["tool_call", "429"]}})
    with sdk.messages.stream(**MSG) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == {"location": "Paris, France"}
    with pytest.raises(anthropic.RateLimitError):
        sdk.messages.create(**MSG)
    assert sdk.models.list().data[0].id == "gpt-4o-mini"


# ---- lifecycle and CLI ---------------------------------------------------------------


def test_serve_on_callers_loop() -> None:
    async def scenario() -> int:
        fake = FakeUpstream()
        task = asyncio.create_task(fake.serve("127.0.0.1", 0))
        while not fake.port:
            await asyncio.sleep(0.001)
        async with httpx.AsyncClient(headers={"authorization": "Bearer k"}) as client:
            status = (await client.get(f"{fake.base_url}/models")).status_code
        await fake.aclose()
        await asyncio.wait_for(task, 2)
        return status

    assert asyncio.run(scenario()) == 200


def test_stop_closes_idle_keep_alive_connections() -> None:
    fake = FakeUpstream()
    fake.start_in_thread()
    with httpx.Client(headers={"authorization": "Bearer k"}) as client:
        assert client.get(f"{fake.base_url}/models").status_code == 200
        fake.stop()
        fake.stop()  # idempotent
        with pytest.raises(httpx.TransportError):
            client.get(f"{fake.base_url}/models")


def test_script_file_and_cli(tmp_path: Path, http: httpx.Client) -> None:
    pytest.importorskip("yaml")
    script = tmp_path / "script.yaml"
    script.write_text("keys:\n  k-cli:\n    queue:\n      - {fault: '503', times: 2}\n")
    assert load_script_file(str(script))["keys"]["k-cli"]["queue"][0]["times"] == 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fake_upstream", "--port", "0", "--script", str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake-upstream listening on http://127.0.0.1:")
        base = line.split()[-1]
        headers = {"authorization": "Bearer k-cli"}
        codes = [http.get(f"{base}/models", headers=headers).status_code for _ in range(3)]
        assert codes == [503, 503, 200]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_expect_100_continue(fake: FakeUpstream) -> None:
    body = json.dumps(CHAT).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection((fake.host, fake.port), timeout=2) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")


def test_stop_during_slow_stream_ends_it() -> None:
    fake = FakeUpstream(script={"default": {"token_delay_ms": 50}})
    fake.start_in_thread()
    req = {**CHAT, "stream": True}
    with (
        httpx.Client(base_url=fake.base_url, headers={"authorization": "Bearer k"}) as client,
        client.stream("POST", "/chat/completions", json=req) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        start = time.perf_counter()
        fake.stop()
        with pytest.raises(httpx.RemoteProtocolError):
            list(lines)
    assert time.perf_counter() - start < 1


# ---- embeddings, legacy completions, Responses, model lookup, keyless mode -----------

EMBED = {"model": "text-embedding-3-small", "input": ["alpha beta", "gamma"]}
PROMPT = {"model": "gpt-3.5-turbo-instruct", "prompt": "Hello there, fake"}
RESP = {"model": "gpt-4o-mini", "input": "Hello there, fake"}
RESP_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    }
]


@pytest.fixture
def sdk(fake: FakeUpstream) -> Any:
    import openai

    return openai.OpenAI(base_url=fake.base_url, api_key="k1", max_retries=0)


def response_sse(fake: FakeUpstream, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed Response, each `event:` line checked against its data's type
    and each event validated by the SDK's own union of stream events."""
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    raw = raw_exchange(fake, post_raw("/v1/responses", {**body, "stream": True}))
    events = []
    for piece in dechunk(raw.partition(b"\r\n\r\n")[2]):
        name_line, data_line, *_ = piece.decode().split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name_line.removeprefix("event: ")
        adapter.validate_python(data)
        events.append(data)
    return events


def test_embeddings_float_and_base64_are_the_same_deterministic_vectors(
    sdk: Any, client: httpx.Client
) -> None:
    import struct

    from openai.types import CreateEmbeddingResponse

    body = client.post("/embeddings", json=EMBED).json()
    parsed = CreateEmbeddingResponse.model_validate(body)
    assert parsed.object == "list" and parsed.model == "text-embedding-3-small"
    assert [(d.object, d.index) for d in parsed.data] == [("embedding", 0), ("embedding", 1)]
    floats = [d.embedding for d in parsed.data]
    assert [len(v) for v in floats] == [8, 8]  # the default dimensions
    assert floats[0] != floats[1]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-5 for v in floats)  # unit vectors
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert client.post("/embeddings", json=EMBED).json()["data"] == body["data"]

    raw = client.post("/embeddings", json={**EMBED, "encoding_format": "base64"}).json()
    packed = [base64.b64decode(d["embedding"]) for d in raw["data"]]
    assert [list(struct.unpack("<8f", b)) for b in packed] == floats
    # The SDK asks for base64 when no format is given and decodes it itself.
    assert [d.embedding for d in sdk.embeddings.create(**EMBED).data] == floats
    one = sdk.embeddings.create(model="m", input="gamma", encoding_format="float")
    assert one.data[0].embedding == floats[1]  # the same text embeds the same everywhere
    # Asked for base64 explicitly, the SDK hands the string over as it came.
    wide = sdk.embeddings.create(model="m", input="gamma", dimensions=16, encoding_format="base64")
    assert len(base64.b64decode(wide.data[0].embedding)) == 16 * 4


def test_embeddings_take_token_arrays(client: httpx.Client) -> None:
    one = client.post("/embeddings", json={"model": "m", "input": [1, 2, 3]}).json()
    assert len(one["data"]) == 1 and one["usage"]["prompt_tokens"] == 3
    two = client.post("/embeddings", json={"model": "m", "input": [[1, 2, 3], [4]]}).json()
    assert [d["index"] for d in two["data"]] == [0, 1]
    assert two["data"][0]["embedding"] == one["data"][0]["embedding"]
    assert two["usage"]["prompt_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"input": "x"}, "model"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": ["a", 1]}, "input"),
        ({"model": "m", "input": {"text": "a"}}, "input"),
        ({"model": "m", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "m", "input": "a", "dimensions": "8"}, "dimensions"),
    ],
)
def test_embeddings_validation_is_a_400_in_openai_envelope(
    fake: FakeUpstream, client: httpx.Client, body: dict[str, Any], param: str
) -> None:
    fake.script(keys={"k1": {"queue": ["500"]}})
    r = client.post("/embeddings", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    assert set(err) == {"message", "type", "param", "code"}
    assert fake.stats()["queued"] == {"k1": 1}  # a refused request consumes no behaviour


def test_embeddings_429_fault_reaches_the_sdk(fake: FakeUpstream, sdk: Any) -> None:
    import openai

    fake.script(keys={"k1": {"queue": [{"fault": "429", "retry_after": 4}, "cut"]}})
    with pytest.raises(openai.RateLimitError) as exc:
        sdk.embeddings.create(**EMBED)
    assert exc.value.code == "rate_limit_exceeded"
    assert exc.value.response.headers["retry-after"] == "4"
    assert "text-embedding-3-small" in exc.value.message
    with pytest.raises(openai.APIConnectionError):
        sdk.embeddings.create(**EMBED)  # "cut": a short JSON body
    assert len(sdk.embeddings.create(**EMBED).data) == 2


def test_embeddings_without_usage(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"usage": False}]}})
    body = client.post("/embeddings", json=EMBED).json()
    assert "usage" not in body and len(body["data"]) == 2


def test_legacy_completion_json_through_the_sdk(sdk: Any, client: httpx.Client) -> None:
    from openai.types import Completion

    body = client.post("/completions", json=PROMPT).json()
    completion = Completion.model_validate(body)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert isinstance(body["created"], int) and completion.model == PROMPT["model"]
    assert body["choices"] == [
        {
            "text": body["choices"][0]["text"],
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["choices"][0]["text"].startswith("This is a fake reply to: Hello there, fake")
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
    two = sdk.completions.create(model="m", prompt=["one", "two words"], max_tokens=4)
    assert [(c.index, c.finish_reason) for c in two.choices] == [(0, "length"), (1, "length")]
    assert [c.text for c in two.choices] == ["This is a fake", "This is a fake"]
    assert two.usage.prompt_tokens == 3 and two.usage.completion_tokens == 8
    tokens = client.post("/completions", json={"model": "m", "prompt": [[1, 2], [3]]}).json()
    assert len(tokens["choices"]) == 2 and tokens["usage"]["prompt_tokens"] == 3


def test_legacy_completion_stream(fake: FakeUpstream, sdk: Any, client: httpx.Client) -> None:
    from openai.types import Completion

    text = client.post("/completions", json=PROMPT).json()["choices"][0]["text"]
    with client.stream("POST", "/completions", json={**PROMPT, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_data(r.iter_lines())
    assert events[-1] == "[DONE]"
    # Constructed, not validated: the SDK's type refuses the null finish_reason that OpenAI
    # itself sends on every chunk but the last.
    chunks = [Completion.construct(**c) for c in events[:-1]]
    assert len(chunks) == 16 + 1 and len({c.id for c in chunks}) == 1
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in events[:-1])
    assert all("usage" not in c for c in events[:-1])
    assert events[0]["choices"] == [
        {"text": "This", "index": 0, "logprobs": None, "finish_reason": None}
    ]
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == text
    assert [c["choices"][0]["finish_reason"] for c in events[:-1]][-2:] == [None, "stop"]
    Completion.model_validate(events[-2])  # the last chunk is a valid Completion

    streamed = list(
        sdk.completions.create(**PROMPT, stream=True, stream_options={"include_usage": True})
    )
    *texts, usage_chunk = streamed
    assert "".join(c.choices[0].text for c in texts) == text
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == 19
    with client.stream(
        "POST",
        "/completions",
        json={**PROMPT, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        raw = sse_data(r.iter_lines())
    assert all(c["usage"] is None for c in raw[:-2])  # like chat: null until the usage chunk


def test_legacy_completion_cut_stream_and_scripted_reply(
    fake: FakeUpstream, client: httpx.Client
) -> None:
    fake.script(
        keys={
            "k1": {
                "queue": [
                    {"fault": "cut", "cut_after": 2},
                    {"reply": "Just so.", "fault": "tool_call"},
                ]
            }
        }
    )
    received = cut_stream_lines(client, "/completions", PROMPT)
    assert len(received) == 2
    # No tools in this API: a tool_call behaviour answers with its text.
    body = client.post("/completions", json=PROMPT).json()
    assert body["choices"][0]["text"] == "Just so."
    assert body["usage"]["completion_tokens"] == 2


def test_legacy_completion_token_delay(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(keys={"k1": {"queue": [{"token_delay_ms": 10}]}})
    req = {**PROMPT, "stream": True, "max_tokens": 4}
    # Timed from before the request: the first events may arrive with the headers, so a clock
    # started after them could miss part of a delay.
    start = time.perf_counter()
    with client.stream("POST", "/completions", json=req) as r:
        lines = [line for line in r.iter_lines() if line]
    total = time.perf_counter() - start
    assert len(lines) == 4 + 1 + 1
    assert total >= 0.05  # 5 events after the first, 10 ms apart


def test_responses_json_through_the_sdk(fake: FakeUpstream, sdk: Any, client: httpx.Client):
    from openai.types.responses import Response

    body = client.post("/responses", json={**RESP, "instructions": "Be brief."}).json()
    response = Response.model_validate(body)
    assert response.id.startswith("resp_") and response.object == "response"
    assert (response.status, response.model) == ("completed", "gpt-4o-mini")
    assert response.instructions == "Be brief."
    assert (response.parallel_tool_calls, response.tool_choice, response.tools) == (
        True,
        "auto",
        [],
    )
    assert response.previous_response_id is None and isinstance(body["created_at"], int)
    [item] = body["output"]
    assert item["id"].startswith("msg_")
    assert {k: v for k, v in item.items() if k != "id"} == {
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [
            {
                "type": "output_text",
                "annotations": [],
                "logprobs": [],
                "text": item["content"][0]["text"],
            }
        ],
    }
    assert response.output_text.startswith("This is a fake reply to: Hello there, fake")
    assert body["usage"] == {
        "input_tokens": 5,  # the instructions' words count too
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 16,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 21,
    }
    items = [
        {"role": "system", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi you"}]},
    ]
    parsed = sdk.responses.create(model="gpt-4o", input=items)
    assert parsed.output_text.startswith("This is a fake reply to: Hi you")
    assert parsed.usage.input_tokens == 4
    capped = sdk.responses.create(**RESP, max_output_tokens=3)
    assert (capped.status, capped.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert capped.output_text == "This is a" and capped.max_output_tokens == 3


def test_responses_are_kept_for_get_and_previous_ids_recorded(
    fake: FakeUpstream, sdk: Any, client: httpx.Client
) -> None:
    import openai

    first = sdk.responses.create(**RESP)
    assert sdk.responses.retrieve(first.id).output_text == first.output_text
    follow = sdk.responses.create(**RESP, previous_response_id=first.id)
    assert follow.previous_response_id == first.id  # answered normally, and echoed
    assert fake.stats()["previous_response_ids"] == [first.id]
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.responses.retrieve("resp_never_made")
    assert exc.value.body["type"] == "invalid_request_error"
    assert "resp_never_made" in exc.value.message
    unstored = sdk.responses.create(**RESP, store=False)
    assert client.get(f"/responses/{unstored.id}").status_code == 404


def test_responses_stream_events(fake: FakeUpstream, client: httpx.Client) -> None:
    events = response_sse(fake, RESP)
    names = [e["type"] for e in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 16,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    created, final = events[0]["response"], events[-1]["response"]
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    assert created["id"] == final["id"] and final["status"] == "completed"
    item_id = final["output"][0]["id"]
    added = events[2]["item"]
    assert (added["id"], added["status"], added["content"]) == (item_id, "in_progress", [])
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(
        (d["item_id"], d["output_index"], d["content_index"], d["logprobs"]) == (item_id, 0, 0, [])
        for d in deltas
    )
    text = "".join(d["delta"] for d in deltas)
    assert text == events[-4]["text"] == final["output"][0]["content"][0]["text"]
    assert events[-2]["item"] == final["output"][0]
    assert final["usage"]["output_tokens"] == 16
    # The streamed response is kept like a JSON one.
    assert client.get(f"/responses/{final['id']}").json() == final


def test_responses_stream_through_the_sdk(fake: FakeUpstream, sdk: Any) -> None:
    text = sdk.responses.create(**RESP).output_text
    events = list(sdk.responses.create(**RESP, stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == text
    with sdk.responses.stream(**RESP) as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert streamed == final.output_text == text
    assert final.usage.total_tokens == 3 + 16
    fake.script(keys={"k1": {"queue": [{"usage": False}]}})
    with sdk.responses.stream(**RESP) as stream:
        assert stream.get_final_response().usage is None


def test_responses_tool_call_fault(fake: FakeUpstream, sdk: Any) -> None:
    fake.script(keys={"k1": {"queue": ["tool_call", "tool_call"]}})
    response = sdk.responses.create(**RESP, tools=RESP_TOOLS)
    [call] = response.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"location": "Paris, France"}
    assert response.tools[0].name == "get_weather"  # the request's tools are echoed
    assert response.output_text == ""
    with sdk.responses.stream(**RESP, tools=RESP_TOOLS) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert len(pieces) == 3  # the arguments arrive in pieces
    assert "".join(pieces) == final.output[0].arguments == call.arguments


def test_responses_scripted_tool_calls_stream(fake: FakeUpstream) -> None:
    fake.script(keys={"k1": {"queue": [{"tool_calls": TOOLS, "reply": "Let me check."}]}})
    events = response_sse(fake, {**RESP, "tools": RESP_TOOLS})
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][2]["call_id"] == "call_x"
    for index in (1, 2):
        item_events = [e for e in events if e.get("output_index") == index]
        assert [e["type"] for e in item_events] == [
            "response.output_item.added",
            *["response.function_call_arguments.delta"] * (4 if index == 1 else 5),
            "response.function_call_arguments.done",
            "response.output_item.done",
        ]
        assert item_events[0]["item"]["arguments"] == ""
        deltas = "".join(e["delta"] for e in item_events[1:-2])
        assert deltas == item_events[-2]["arguments"] == final["output"][index]["arguments"]
    assert final["usage"]["output_tokens"] == 3 + 11


def test_responses_cut_stream(fake: FakeUpstream, sdk: Any, client: httpx.Client) -> None:
    import openai

    fake.script(keys={"k1": {"queue": [{"fault": "cut", "cut_after": 4}, "cut"]}})
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/responses", json={**RESP, "stream": True}) as r,
    ):
        assert r.status_code == 200
        received.extend(line for line in r.iter_lines() if line.startswith("event: "))
    assert received == [
        "event: response.created",
        "event: response.in_progress",
        "event: response.output_item.added",
        "event: response.content_part.added",
    ]
    with pytest.raises(openai.APIConnectionError), sdk.responses.stream(**RESP) as stream:
        stream.get_final_response()
    # A cut answer never reached its client, so it is not kept for GET.
    assert fake.stats()["paths"] == {"/v1/responses": 2}


def test_responses_validation_and_error_faults(fake: FakeUpstream, client: httpx.Client) -> None:
    r = client.post("/responses", json={"input": "x"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "model")
    r = client.post("/responses", json={"model": "m", "input": 5})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "input")
    fake.script(keys={"k1": {"queue": ["503", {"fault": "429", "retry_after": 2}]}})
    assert client.post("/responses", json=RESP).status_code == 503
    r = client.post("/responses", json={**RESP, "stream": True})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


def test_model_retrieve(fake: FakeUpstream, sdk: Any, http: httpx.Client) -> None:
    import openai

    model = sdk.models.retrieve("gpt-4o")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o", "model", "fake-upstream")
    assert isinstance(model.created, int)
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.models.retrieve("gpt-nope")
    assert exc.value.code == "model_not_found"
    r = http.get(f"{fake.base_url}/models/gpt-4o/extra", headers={"authorization": "Bearer k1"})
    assert r.status_code == 404
    claude = http.get(f"{fake.base_url}/models/gpt-4o", headers={"x-api-key": "a"}).json()
    assert claude["type"] == "model" and claude["id"] == "gpt-4o"
    fake.script(keys={"k1": {"queue": ["500"]}})
    with pytest.raises(openai.InternalServerError):
        sdk.models.retrieve("gpt-4o")


def test_keyless_mode(http: httpx.Client) -> None:
    import openai

    with FakeUpstream(require_key=False, allowed_keys={"good"}) as fake:
        fake.script(keys={"": {"queue": ["429"]}})
        url = f"{fake.base_url}/chat/completions"
        assert http.post(url, json=CHAT).status_code == 429  # the script of key "" applies
        assert http.post(url, json=CHAT).status_code == 200
        messages = http.post(f"{fake.base_url}/messages", json=MSG)
        assert messages.status_code == 200  # no x-api-key either
        assert http.post(url, json=CHAT, headers={"authorization": "Bearer good"}).is_success
        bad = http.post(url, json=CHAT, headers={"authorization": "Bearer sk-wrong-key"})
        assert bad.status_code == 401  # a key that is sent is still checked
        assert fake.stats()["requests"] == {"": 3, "good": 1, "sk-wrong-key": 1}
        sdk = openai.OpenAI(base_url=fake.base_url, api_key="good", max_retries=0)
        assert sdk.embeddings.create(**EMBED).data[1].index == 1
    with FakeUpstream() as strict:
        assert http.post(f"{strict.base_url}/embeddings", json=EMBED).status_code == 401


def test_cli_no_auth(http: httpx.Client) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fake_upstream", "--port", "0", "--no-auth"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().split()[-1]
        assert http.post(f"{base}/embeddings", json=EMBED).status_code == 200
        assert http.get(f"http://{base.split('/')[2]}/_fake/stats").json()["requests"] == {"": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_per_path_stats_and_recorded_requests(
    fake: FakeUpstream, client: httpx.Client, http: httpx.Client
) -> None:
    client.post("/embeddings", json=EMBED)
    client.post("/embeddings", json={"model": "m"})  # refused, still counted
    client.post("/completions", json=PROMPT)
    client.get("/models/gpt-4o")
    http.post(f"{fake.base_url}/responses", json=RESP)  # no key: 401, counted under ""
    client.post("/nowhere", json={})  # not routed: not counted
    stats = fake.stats()
    assert stats["paths"] == {
        "/v1/embeddings": 2,
        "/v1/completions": 1,
        "/v1/models/gpt-4o": 1,
        "/v1/responses": 1,
    }
    assert stats["total"] == 5 and stats["requests"] == {"k1": 4, "": 1}
    assert fake.requests() == [
        ("POST", "/v1/embeddings", "k1", EMBED),
        ("POST", "/v1/embeddings", "k1", {"model": "m"}),
        ("POST", "/v1/completions", "k1", PROMPT),
        ("GET", "/v1/models/gpt-4o", "k1", None),
        ("POST", "/v1/responses", "", RESP),
    ]
    assert fake.requests()[0].path == "/v1/embeddings"
    fake.reset()
    assert fake.requests() == [] and fake.stats()["paths"] == {}
