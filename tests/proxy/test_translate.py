"""Translation between OpenAI Chat Completions and Anthropic Messages (proxy/translate.py): table
tests over fixtures written from the published API references, the features each API cannot
express, and the official SDKs parsing what the translators produce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from proxy.translate import (
    ChatStreamToMessages,
    MessagesStreamToChat,
    Untranslatable,
    anthropic_error_to_openai,
    chat_request_to_messages,
    chat_response_to_messages,
    messages_request_to_chat,
    messages_response_to_chat,
    openai_error_to_anthropic,
)

FIXTURES = Path(__file__).parent / "fixtures" / "translate"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def cases(name: str, direction: str) -> list[Any]:
    return [
        pytest.param(case, id=case["name"])
        for case in fixture(name)
        if case.get("direction", "both") in ("both", direction)
    ]


def without_created(body: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(body.pop("created", 0), int)
    return body


# -- requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("requests.json", "chat_to_messages"))
def test_chat_request_to_messages(case):
    body = chat_request_to_messages(
        case["chat"], model=case["messages"]["model"], stream=case["stream"]
    )
    assert body == case["messages"]


@pytest.mark.parametrize("case", cases("requests.json", "messages_to_chat"))
def test_messages_request_to_chat(case):
    body = messages_request_to_chat(
        case["messages"], model=case["chat"]["model"], stream=case["stream"]
    )
    assert body == case["chat"]


def test_translating_a_request_leaves_the_clients_body_as_it_was():
    for case in fixture("requests.json"):
        chat, messages = json.dumps(case["chat"]), json.dumps(case["messages"])
        chat_request_to_messages(case["chat"], model="m", stream=case["stream"])
        messages_request_to_chat(case["messages"], model="m", stream=case["stream"])
        assert (json.dumps(case["chat"]), json.dumps(case["messages"])) == (chat, messages)


USER = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def user_parts(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize(
    ("extra", "feature"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -0.1}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"seed": 7}, "seed"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"prompt_cache_key": "k"}, "prompt_cache_key"),
        (
            {
                "messages": user_parts(
                    {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}
                )
            },
            "content part 'input_audio'",
        ),
        (
            {"messages": user_parts({"type": "file", "file": {"file_id": "file-abc"}})},
            "content part 'file'",
        ),
        (
            {
                "messages": user_parts(
                    {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}}
                )
            },
            "image_url.detail",
        ),
        ({"messages": [{"role": "user", "content": "Hi", "name": "alice"}]}, "messages[].name"),
        ({"messages": [{"role": "function", "name": "f", "content": "1"}]}, "role 'function'"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    }
                ]
            },
            "not a JSON object",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "grammar"}}]}, "'custom' tool"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
            "tool_choice",
        ),
    ],
)
def test_openai_features_anthropic_cannot_express_are_refused_by_name(extra, feature):
    with pytest.raises(Untranslatable) as raised:
        chat_request_to_messages(
            {"model": "gpt", "messages": USER, **extra}, model="c", stream=False
        )
    assert feature in raised.value.feature
    assert "Anthropic Messages API" in str(raised.value)


def test_the_refusal_says_what_and_where():
    with pytest.raises(Untranslatable) as raised:
        chat_request_to_messages({"messages": USER, "logprobs": True}, model="c", stream=False)
    assert (raised.value.feature, raised.value.param) == ("logprobs", "logprobs")
    assert str(raised.value) == "'logprobs' cannot be translated to the Anthropic Messages API."


MESSAGES_USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("extra", "feature"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
        ({"top_k": 5}, "top_k"),
        ({"mcp_servers": [{"type": "url", "url": "https://mcp", "name": "m"}]}, "mcp_servers"),
        ({"container": "container_1"}, "container"),
        ({"output_config": {"effort": "low"}}, "output_config"),
        ({"metadata": {"user_id": "u", "team": "x"}}, "metadata.team"),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
            "server tool 'web_search_20250305'",
        ),
        (
            {"tools": [{"name": "f", "input_schema": {"type": "object"}, "input_examples": [{}]}]},
            "tools[].input_examples",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {
                                    "type": "base64",
                                    "media_type": "application/pdf",
                                    "data": "JVBER",
                                },
                            }
                        ],
                    }
                ]
            },
            "'document' content block",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [
                                    {
                                        "type": "image",
                                        "source": {"type": "url", "url": "https://x/a.png"},
                                    }
                                ],
                            }
                        ],
                    }
                ]
            },
            "'image' block",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
                        ],
                    }
                ]
            },
            "source 'file'",
        ),
    ],
)
def test_anthropic_features_openai_cannot_express_are_refused_by_name(extra, feature):
    body = {"model": "c", "max_tokens": 10, "messages": MESSAGES_USER, **extra}
    with pytest.raises(Untranslatable) as raised:
        messages_request_to_chat(body, model="gpt", stream=False)
    assert feature in raised.value.feature
    assert "OpenAI Chat Completions API" in str(raised.value)


# -- whole answers -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("responses.json", "messages_to_chat"))
def test_messages_response_to_chat(case):
    completion = messages_response_to_chat(case["message"], model=case["model"])
    assert without_created(completion) == case["completion"]


@pytest.mark.parametrize("case", cases("responses.json", "chat_to_messages"))
def test_chat_response_to_messages(case):
    message = chat_response_to_messages(case["completion"], model=case["model"])
    assert message == case["message"]


# -- error bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("errors.json", "anthropic_to_openai"))
def test_anthropic_error_to_openai(case):
    assert anthropic_error_to_openai(case["status"], case["anthropic"]) == case["openai"]


@pytest.mark.parametrize("case", cases("errors.json", "openai_to_anthropic"))
def test_openai_error_to_anthropic(case):
    assert openai_error_to_anthropic(case["status"], case["openai"]) == case["anthropic"]


# -- streams -----------------------------------------------------------------------------------


def openai_events(raw: bytes) -> list[Any]:
    """The chunks of an OpenAI stream, checking each is one `data:` line and a blank line."""
    assert raw.endswith(b"\n\n")
    events: list[Any] = []
    for frame in raw.decode().split("\n\n")[:-1]:
        assert frame.startswith("data: ") and "\n" not in frame
        data = frame[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def anthropic_events(raw: bytes) -> list[list[Any]]:
    """The events of an Anthropic stream, checking the event name matches the data's type."""
    assert raw.endswith(b"\n\n")
    events = []
    for frame in raw.decode().split("\n\n")[:-1]:
        name_line, data_line = frame.split("\n")
        name, data = name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append([name, data])
    return events


def translate_anthropic_stream(case: dict[str, Any]) -> bytes:
    translator = MessagesStreamToChat(
        model="smart", include_usage=case["include_usage"], request_id="req_1"
    )
    out = b"".join(translator.event(name, data) for name, data in case["upstream"])
    if case["upstream"][-1][0] != "error":
        out += translator.end()
    return out


def translate_openai_stream(upstream: list[Any]) -> bytes:
    translator = ChatStreamToMessages(model="smart", request_id="req_1")
    return b"".join(
        translator.done() if chunk == "[DONE]" else translator.chunk(chunk) for chunk in upstream
    )


@pytest.mark.parametrize(
    "name",
    ["anthropic_stream_text.json", "anthropic_stream_tools.json", "anthropic_stream_error.json"],
)
def test_anthropic_stream_to_openai_chunks(name):
    case = fixture(name)
    events = openai_events(translate_anthropic_stream(case))
    got = [e if isinstance(e, str) or "error" in e else without_created(e) for e in events]
    assert got == case["expected"]


@pytest.mark.parametrize(
    "name",
    [
        "openai_stream_text.json",
        "openai_stream_tools.json",
        "openai_stream_no_usage.json",
        "openai_stream_error.json",
    ],
)
def test_openai_stream_to_anthropic_events(name):
    case = fixture(name)
    assert anthropic_events(translate_openai_stream(case["upstream"])) == case["expected"]


def test_the_finish_is_held_back_until_usage_arrives():
    translator = ChatStreamToMessages(model="smart", request_id="req_1")
    upstream = fixture("openai_stream_text.json")["upstream"]
    before_usage = b"".join(translator.chunk(chunk) for chunk in upstream[:4])
    assert b"message_delta" not in before_usage
    assert b"content_block_stop" in before_usage
    assert b"message_stop" in translator.chunk(upstream[4])
    assert translator.done() == b""


def test_an_empty_openai_stream_still_makes_a_whole_message():
    events = anthropic_events(ChatStreamToMessages(model="smart", request_id="req_1").done())
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert events[0][1]["message"]["id"] == "req_1"


def test_an_anthropic_stream_cut_before_message_delta_still_finishes_for_openai():
    translator = MessagesStreamToChat(model="smart", include_usage=True, request_id="req_1")
    upstream = fixture("anthropic_stream_text.json")["upstream"]
    for name, data in upstream[:4]:
        translator.event(name, data)
    events = openai_events(translator.end())
    assert events[0]["choices"][0]["finish_reason"] == "stop"
    assert events[1]["choices"] == [] and events[1]["usage"]["prompt_tokens"] == 35
    assert events[2] == "[DONE]"


# -- the official SDKs read what the translators write -----------------------------------------


def transport(http: Any, body: bytes, content_type: str, status: int) -> Any:
    """An HTTP client of `http` (httpx, or the httpx2 the anthropic SDK ships) that answers
    every request with `body`."""

    def reply(request: Any) -> Any:
        return http.Response(status, content=body, headers={"content-type": content_type})

    return http.Client(transport=http.MockTransport(reply))


def openai_client(body: bytes, content_type: str, status: int = 200) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://127.0.0.1/v1",
        http_client=transport(httpx, body, content_type, status),
        max_retries=0,
    )


def anthropic_client(body: bytes, content_type: str, status: int = 200) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://127.0.0.1",
        http_client=transport(httpx2, body, content_type, status),
        max_retries=0,
    )


SSE = "text/event-stream"
ASK = {"model": "smart", "messages": [{"role": "user", "content": "Hi"}]}
ASK_ANTHROPIC = {**ASK, "max_tokens": 100}


def test_the_openai_sdk_reads_a_translated_text_stream():
    client = openai_client(translate_anthropic_stream(fixture("anthropic_stream_text.json")), SSE)
    chunks = list(client.chat.completions.create(**ASK, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        'Hello! éè "quoted"\n'
    )
    with client.chat.completions.stream(**ASK) as stream:
        final = stream.get_final_completion()
    assert final.id == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
    assert final.choices[0].message.content == 'Hello! éè "quoted"\n'
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (35, 15)
    assert final.usage.prompt_tokens_details.cached_tokens == 10


def test_the_openai_sdk_reads_a_translated_tool_stream():
    client = openai_client(translate_anthropic_stream(fixture("anthropic_stream_tools.json")), SSE)
    with client.chat.completions.stream(**ASK) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Okay, let me check."
    calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    assert calls == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", {"location": "San Francisco, CA"}),
        ("toolu_02", "get_time", {}),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is None  # the client did not ask for it


def test_the_openai_sdk_raises_a_translated_stream_error():
    client = openai_client(translate_anthropic_stream(fixture("anthropic_stream_error.json")), SSE)
    with pytest.raises(openai.APIError, match="Overloaded"):
        list(client.chat.completions.create(**ASK, stream=True))


def test_the_anthropic_sdk_reads_a_translated_text_stream():
    raw = translate_openai_stream(fixture("openai_stream_text.json")["upstream"])
    client = anthropic_client(raw, SSE)
    events = list(client.messages.create(**ASK_ANTHROPIC, stream=True))
    assert events[0].type == "message_start"
    with client.messages.stream(**ASK_ANTHROPIC) as stream:
        assert "".join(stream.text_stream) == 'Hello! é "quoted"\n'
        final = stream.get_final_message()
    assert final.id == "chatcmpl-123"
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text == 'Hello! é "quoted"\n'
    assert final.stop_reason == "end_turn"
    usage = final.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens) == (12, 5, 8)


def test_the_anthropic_sdk_reads_a_translated_tool_stream():
    raw = translate_openai_stream(fixture("openai_stream_tools.json")["upstream"])
    with anthropic_client(raw, SSE).messages.stream(**ASK_ANTHROPIC) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == "Let me check."
    tools = [(b.id, b.name, b.input) for b in final.content[1:] if b.type == "tool_use"]
    assert tools == [
        ("call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", {"location": "Paris"}),
        ("call_2", "get_time", {}),
    ]
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (80, 30)


def test_the_anthropic_sdk_raises_a_translated_stream_error():
    raw = translate_openai_stream(fixture("openai_stream_error.json")["upstream"])
    with pytest.raises(anthropic.APIStatusError, match="The server had an error"):
        list(anthropic_client(raw, SSE).messages.create(**ASK_ANTHROPIC, stream=True))


def encoded(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def test_the_openai_sdk_reads_translated_whole_answers():
    for case in fixture("responses.json"):
        if case["direction"] != "messages_to_chat":
            continue
        completion = messages_response_to_chat(case["message"], model=case["model"])
        parsed = openai_client(encoded(completion), "application/json").chat.completions.create(
            **ASK
        )
        expected = case["completion"]["choices"][0]
        assert parsed.choices[0].finish_reason == expected["finish_reason"]
        assert parsed.choices[0].message.content == expected["message"]["content"]
        calls = parsed.choices[0].message.tool_calls or []
        assert [c.function.arguments for c in calls] == [
            c["function"]["arguments"] for c in expected["message"].get("tool_calls", [])
        ]
        assert parsed.usage is not None
        assert parsed.usage.prompt_tokens == case["completion"]["usage"]["prompt_tokens"]


def test_the_anthropic_sdk_reads_translated_whole_answers():
    for case in fixture("responses.json"):
        if case["direction"] != "chat_to_messages":
            continue
        message = chat_response_to_messages(case["completion"], model=case["model"])
        parsed = anthropic_client(encoded(message), "application/json").messages.create(
            **ASK_ANTHROPIC
        )
        expected = {k: v for k, v in case["message"].items() if v is not None}
        assert parsed.model_dump(exclude_none=True) == expected


def test_the_sdks_raise_the_right_class_for_translated_errors():
    [rate_limited] = [e for e in fixture("errors.json") if e["name"] == "429 rate limit"]
    body = anthropic_error_to_openai(429, rate_limited["anthropic"])
    with pytest.raises(openai.RateLimitError, match="per-minute rate limit"):
        openai_client(encoded(body), "application/json", 429).chat.completions.create(**ASK)
    body = openai_error_to_anthropic(529, {"error": {"message": "Overloaded", "type": "x"}})
    with pytest.raises(anthropic.APIStatusError, match="Overloaded") as raised:
        anthropic_client(encoded(body), "application/json", 529).messages.create(**ASK_ANTHROPIC)
    assert raised.value.body == body


def test_a_failed_tool_result_reaches_openai_in_words():
    body = {
        "max_tokens": 64,
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": "boom",
                        "is_error": True,
                    }
                ],
            },
        ],
    }
    out = messages_request_to_chat(body, model="m", stream=False)
    assert out["messages"][-1] == {"role": "tool", "tool_call_id": "t1", "content": "Error: boom"}
