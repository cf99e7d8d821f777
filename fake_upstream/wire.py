"""OpenAI and Anthropic wire shapes: bodies, SSE events, errors and rate-limit headers.

Kept byte-compatible with the real APIs (field names, nulls, event order) because the
gateway's parsers and the official SDKs are exercised against this fake.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from .http11 import encode_json

RATE_LIMIT_REQUESTS = 10_000
RATE_LIMIT_TOKENS = 2_000_000
TOOL_NAME = "get_weather"
# Split in three so a proxy's tool-call streaming (and TTFT on tool deltas) gets exercised.
TOOL_ARG_PIECES = ('{"location"', ': "Paris, ', 'France"}')
FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
MODEL_CREATED = 1_715_367_049

# fault -> (status, type, code, message) in OpenAI's {"error": {message, type, param, code}}.
OPENAI_FAULTS: dict[str, tuple[int, str, str | None, str]] = {
    "429": (
        429,
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for {model} in organization org-fake on requests per min (RPM): "
        "Limit 10000, Used 10000, Requested 1. Please try again in {retry}s.",
    ),
    "quota": (
        429,
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "402": (402, "billing_error", "payment_required", "Payment required: billing is not set up."),
    "401": (
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: {masked}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    "403": (
        403,
        "invalid_request_error",
        "invalid_api_key",
        "Your API key {masked} is not allowed to access this resource.",
    ),
    "500": (
        500,
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    "503": (503, "server_error", None, "The engine is currently overloaded, please try again."),
    "529": (529, "server_error", None, "The engine is currently overloaded, please try again."),
}
# fault -> (status, type, message). Anthropic reports exhausted credit as a 400, not a 429,
# which is why "quota" maps to a different status in each flavour.
ANTHROPIC_FAULTS: dict[str, tuple[int, str, str]] = {
    "429": (429, "rate_limit_error", "Number of requests has exceeded your rate limit."),
    "quota": (
        400,
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. "
        "Please go to Plans & Billing to upgrade or purchase credits.",
    ),
    "402": (402, "billing_error", "Payment required."),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "403": (403, "permission_error", "Your API key does not have permission to use this."),
    "500": (500, "api_error", "Internal server error"),
    "503": (503, "overloaded_error", "Overloaded"),
    "529": (529, "overloaded_error", "Overloaded"),
}

_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    # Unique across restarts (random prefix) yet far cheaper than uuid4 on the hot path.
    return f"{prefix}{_ID_PREFIX}{next(_ids):012x}"


def openai_error(
    message: str,
    etype: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def anthropic_error(etype: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": etype, "message": message},
        "request_id": new_id("req_"),
    }


def fault_error(
    fault: str, anthropic: bool, retry_after: Any, masked_key: str, model: str
) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
    """(status, body, headers) for a scripted error fault ("429", "quota", "503", "418"...)."""
    headers: list[tuple[str, str]] = []
    if retry_after is not None:
        headers.append(("retry-after", str(retry_after)))
    status = int(fault) if fault.isdigit() else 429
    if anthropic:
        generic = (status, "invalid_request_error" if status < 500 else "api_error", "")
        status, etype, message = ANTHROPIC_FAULTS.get(fault, generic)
        if fault == "429":
            reset = time.gmtime(time.time() + float(retry_after or 1))
            headers += [
                ("anthropic-ratelimit-requests-limit", str(RATE_LIMIT_REQUESTS)),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", time.strftime("%Y-%m-%dT%H:%M:%SZ", reset)),
            ]
        payload = anthropic_error(etype, message or f"Scripted HTTP {status} error.")
        headers.append(("request-id", payload["request_id"]))
        return status, payload, headers
    generic4 = (status, "invalid_request_error" if status < 500 else "server_error", None, "")
    status, etype, code, message = OPENAI_FAULTS.get(fault, generic4)
    if fault == "429":
        headers += [
            ("x-ratelimit-limit-requests", str(RATE_LIMIT_REQUESTS)),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", f"{retry_after or 1}s"),
        ]
    message = message.format(
        model=model or "gpt-4o-mini", masked=masked_key, retry=retry_after or 1
    )
    headers.append(("x-request-id", new_id("req_")))
    return status, openai_error(message or f"Scripted HTTP {status} error.", etype, code), headers


def ratelimit_headers(anthropic: bool, nth: int, tokens: int) -> list[tuple[str, str]]:
    """Success-path rate-limit headers; ``nth`` is the key's request count (deterministic)."""
    remaining = RATE_LIMIT_REQUESTS - 1 - (nth - 1) % RATE_LIMIT_REQUESTS
    tokens_left = max(RATE_LIMIT_TOKENS - tokens, 0)
    if anthropic:
        return [
            ("request-id", new_id("req_")),
            ("anthropic-ratelimit-requests-limit", str(RATE_LIMIT_REQUESTS)),
            ("anthropic-ratelimit-requests-remaining", str(remaining)),
            ("anthropic-ratelimit-tokens-limit", str(RATE_LIMIT_TOKENS)),
            ("anthropic-ratelimit-tokens-remaining", str(tokens_left)),
        ]
    return [
        ("x-request-id", new_id("req_")),
        ("openai-processing-ms", "1"),
        ("x-ratelimit-limit-requests", str(RATE_LIMIT_REQUESTS)),
        ("x-ratelimit-remaining-requests", str(remaining)),
        ("x-ratelimit-limit-tokens", str(RATE_LIMIT_TOKENS)),
        ("x-ratelimit-remaining-tokens", str(tokens_left)),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    ]


def models_list(models: list[str], anthropic: bool) -> dict[str, Any]:
    if anthropic:
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2024-10-22T00:00:00Z"}
            for m in models
        ]
        first, last = (models[0], models[-1]) if models else (None, None)
        return {"data": data, "has_more": False, "first_id": first, "last_id": last}
    openai_data: list[dict[str, Any]] = [
        {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": "fake-upstream"}
        for m in models
    ]
    return {"object": "list", "data": openai_data}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts / blocks: only the text ones count
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prompt_info(body: dict[str, Any]) -> tuple[int, str]:
    """(prompt "tokens" as a word count, last user text): deterministic and cheap."""
    words = len(_text_of(body.get("system")).split())
    last_user = ""
    for msg in body.get("messages") or ():
        if isinstance(msg, dict):
            text = _text_of(msg.get("content"))
            words += len(text.split())
            if msg.get("role") == "user":
                last_user = text
    return max(words, 1), last_user


def reply_words(last_user: str, want: int, cap: Any) -> tuple[list[str], bool]:
    """The reply, one word per "token", and whether the request's max-tokens cap cut it."""
    truncated = isinstance(cap, int) and not isinstance(cap, bool) and 0 < cap < want
    if truncated:
        want = cap
    base = f"This is a fake reply to: {last_user[:40]}".split()
    if want <= len(base):
        return base[:want], truncated
    return base + [FILLER[i % len(FILLER)] for i in range(want - len(base))], truncated


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_completion(
    model: str, words: list[str], tool: bool, finish: str, usage: dict[str, Any]
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": " ".join(words), "refusal": None}
    if tool:
        message["content"] = None
        function = {"name": TOOL_NAME, "arguments": "".join(TOOL_ARG_PIECES)}
        message["tool_calls"] = [{"id": new_id("call_"), "type": "function", "function": function}]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def openai_events(
    model: str, words: list[str], tool: bool, finish: str, usage: dict[str, Any] | None
) -> Iterator[bytes]:
    """SSE events of a chat.completion.chunk stream; ``usage`` only if include_usage."""
    envelope = encode_json(
        {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
    )[:-1]
    # Every chunk shares this envelope, so encode it once and splice each delta in.
    prefix = f'data: {envelope},"choices":[{{"index":0,"delta":'.encode()
    # With include_usage, OpenAI puts "usage":null on every chunk before the usage chunk.
    tail = ',"usage":null}\n\n' if usage is not None else "}\n\n"

    def event(delta: dict[str, Any], reason: str | None = None) -> bytes:
        rest = f',"logprobs":null,"finish_reason":{encode_json(reason)}}}]{tail}'
        return prefix + (encode_json(delta) + rest).encode()

    if tool:
        call = {"index": 0, "id": new_id("call_"), "type": "function"}
        call["function"] = {"name": TOOL_NAME, "arguments": ""}
        yield event({"role": "assistant", "content": None, "tool_calls": [call], "refusal": None})
        for piece in TOOL_ARG_PIECES:
            yield event({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    else:
        yield event({"role": "assistant", "content": "", "refusal": None})
        for i, word in enumerate(words):
            yield event({"content": word if i == 0 else " " + word})
    yield event({}, finish)
    if usage is not None:
        yield f'data: {envelope},"choices":[],"usage":{encode_json(usage)}}}\n\n'.encode()
    yield b"data: [DONE]\n\n"


def _anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _anthropic_envelope(
    model: str, content: list[Any], stop: str | None, usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }


def anthropic_message(
    model: str, words: list[str], tool: bool, stop: str, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": " ".join(words)}
    if tool:
        arguments = json.loads("".join(TOOL_ARG_PIECES))
        block = {"type": "tool_use", "id": new_id("toolu_"), "name": TOOL_NAME, "input": arguments}
    usage = _anthropic_usage(input_tokens, output_tokens)
    return _anthropic_envelope(model, [block], stop, usage)


def anthropic_events(
    model: str, words: list[str], tool: bool, stop: str, input_tokens: int, output_tokens: int
) -> Iterator[bytes]:
    """The Messages stream: message_start, content_block_start, ping, deltas..., stop events."""

    def event(data: dict[str, Any]) -> bytes:
        return f"event: {data['type']}\ndata: {encode_json(data)}\n\n".encode()

    message = _anthropic_envelope(model, [], None, _anthropic_usage(input_tokens, 1))
    yield event({"type": "message_start", "message": message})
    block: dict[str, Any] = {"type": "text", "text": ""}
    if tool:
        block = {"type": "tool_use", "id": new_id("toolu_"), "name": TOOL_NAME, "input": {}}
    yield event({"type": "content_block_start", "index": 0, "content_block": block})
    yield event({"type": "ping"})
    if tool:
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in TOOL_ARG_PIECES]
    else:
        deltas = [
            {"type": "text_delta", "text": w if i == 0 else " " + w} for i, w in enumerate(words)
        ]
    for delta in deltas:
        yield event({"type": "content_block_delta", "index": 0, "delta": delta})
    yield event({"type": "content_block_stop", "index": 0})
    yield event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
    )
    yield event({"type": "message_stop"})
