"""OpenAI and Anthropic wire shapes: bodies, SSE events, errors and rate-limit headers.

Kept byte-compatible with the real APIs (field names, nulls, event order) because the
gateway's parsers and the official SDKs are exercised against this fake.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import re
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .http11 import encode_json

RATE_LIMIT_REQUESTS = 10_000
EMBEDDING_DIMENSIONS = 8  # small on purpose: tests compare whole vectors
RATE_LIMIT_TOKENS = 2_000_000
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS = '{"location": "Paris, France"}'  # streamed in three pieces (see ToolCall)
FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
MODEL_CREATED = 1_715_367_049
_PIECE = re.compile(r"\s*\S+\s*")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call of an answer: a function name and its arguments, a JSON object's text.

    Streamed, the arguments go out a word at a time (whitespace stays with the word before it),
    so a proxy has to reassemble them, and a string without spaces is never split.
    """

    name: str
    arguments: str
    id: str | None = None

    @property
    def input(self) -> dict[str, Any]:
        """The arguments as Anthropic's `tool_use.input` (checked to be an object up front,
        except for the `bad_tool_args` fault's, which an object cannot carry: then {})."""
        try:
            value: dict[str, Any] = json.loads(self.arguments)
        except ValueError:
            return {}
        return value

    def pieces(self) -> list[str]:
        return _PIECE.findall(self.arguments) or [self.arguments]

    def tokens(self) -> int:
        """Its share of completion tokens: one for the name, one per streamed piece."""
        return 1 + len(self.pieces())


DEFAULT_TOOL_CALL = ToolCall(TOOL_NAME, TOOL_ARGUMENTS)


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


def model_info(model: str, anthropic: bool) -> dict[str, Any]:
    """One model, as `GET /v1/models/{model}` returns it and as listed by `GET /v1/models`."""
    if anthropic:
        return {
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": "2024-10-22T00:00:00Z",
        }
    return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "fake-upstream"}


def models_list(models: list[str], anthropic: bool) -> dict[str, Any]:
    data = [model_info(m, anthropic) for m in models]
    if anthropic:
        first, last = (models[0], models[-1]) if models else (None, None)
        return {"data": data, "has_more": False, "first_id": first, "last_id": last}
    return {"object": "list", "data": data}


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


def reply_words(
    last_user: str, want: int, cap: Any, reply: str | None = None
) -> tuple[list[str], bool]:
    """The reply, one word per "token", and whether the request's max-tokens cap cut it.

    ``reply`` (scripted) replaces the generated text, whatever ``want`` says.
    """
    base = (
        reply.split() if reply is not None else f"This is a fake reply to: {last_user[:40]}".split()
    )
    if reply is not None:
        want = len(base)
    truncated = isinstance(cap, int) and not isinstance(cap, bool) and 0 < cap < want
    if truncated:
        want = cap
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


def _call_ids(tools: Sequence[ToolCall], prefix: str) -> list[str]:
    return [tool.id or new_id(prefix) for tool in tools]


def openai_completion(
    model: str,
    words: list[str],
    tools: Sequence[ToolCall],
    finish: str,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A chat.completion; with ``tools``, `message.tool_calls` (and text only if scripted).
    ``usage=None`` leaves the field out, like an upstream that does not report it."""
    message: dict[str, Any] = {"role": "assistant", "content": " ".join(words), "refusal": None}
    if tools:
        message["content"] = " ".join(words) if words else None
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": t.name, "arguments": t.arguments},
            }
            for call_id, t in zip(_call_ids(tools, "call_"), tools, strict=True)
        ]
    message["annotations"] = []
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    body: dict[str, Any] = {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if usage is not None:
        body["usage"] = usage
    body["service_tier"] = "default"
    body["system_fingerprint"] = "fp_fake"
    return body


def openai_events(
    model: str,
    words: list[str],
    tools: Sequence[ToolCall],
    finish: str,
    usage: dict[str, Any] | None,
) -> Iterator[bytes]:
    """SSE events of a chat.completion.chunk stream; ``usage`` only if include_usage.

    Text goes a word per chunk; each tool call starts with a chunk carrying its `index`, `id`,
    `type` and `function.name` (arguments ""), then one chunk per piece of its arguments."""
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

    role: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
    if words or not tools:
        yield event(role)
        for i, word in enumerate(words):
            yield event({"content": word if i == 0 else " " + word})
        role = {}
    for index, (call_id, tool) in enumerate(zip(_call_ids(tools, "call_"), tools, strict=True)):
        start = {"index": index, "id": call_id, "type": "function"}
        start["function"] = {"name": tool.name, "arguments": ""}
        if role:  # no text before: the first chunk is the role's, with the first call in it
            yield event(
                {"role": "assistant", "content": None, "tool_calls": [start], "refusal": None}
            )
            role = {}
        else:
            yield event({"tool_calls": [start]})
        for piece in tool.pieces():
            yield event({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
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
    model: str, content: list[Any], stop: str | None, usage: dict[str, Any] | None
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
    }
    if usage is not None:
        message["usage"] = usage
    return message


def _anthropic_blocks(words: list[str], tools: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """The content blocks, complete: a text block (unless only tool calls), then tool_use."""
    blocks: list[dict[str, Any]] = []
    if words or not tools:
        blocks.append({"type": "text", "text": " ".join(words)})
    for call_id, tool in zip(_call_ids(tools, "toolu_"), tools, strict=True):
        blocks.append({"type": "tool_use", "id": call_id, "name": tool.name, "input": tool.input})
    return blocks


def anthropic_message(
    model: str,
    words: list[str],
    tools: Sequence[ToolCall],
    stop: str,
    input_tokens: int,
    output_tokens: int,
    *,
    usage: bool = True,
) -> dict[str, Any]:
    report = _anthropic_usage(input_tokens, output_tokens) if usage else None
    return _anthropic_envelope(model, _anthropic_blocks(words, tools), stop, report)


def anthropic_events(
    model: str,
    words: list[str],
    tools: Sequence[ToolCall],
    stop: str,
    input_tokens: int,
    output_tokens: int,
    *,
    usage: bool = True,
) -> Iterator[bytes]:
    """The Messages stream: message_start, then per content block its content_block_start
    (a ping after the first), deltas and content_block_stop, then message_delta, message_stop.

    A tool_use block starts with an empty `input` and its arguments follow as input_json_delta
    pieces. ``usage=False`` leaves `usage` out of message_start and message_delta (the real API
    always sends it, and the anthropic SDK's stream helper relies on it)."""

    def event(data: dict[str, Any]) -> bytes:
        return f"event: {data['type']}\ndata: {encode_json(data)}\n\n".encode()

    start_usage = _anthropic_usage(input_tokens, 1) if usage else None
    yield event(
        {"type": "message_start", "message": _anthropic_envelope(model, [], None, start_usage)}
    )
    blocks = _anthropic_blocks(words, tools)
    first_tool = len(blocks) - len(tools)  # 1 after a text block, else 0
    for index, block in enumerate(blocks):
        deltas: list[dict[str, Any]]
        if block["type"] == "text":
            deltas = [
                {"type": "text_delta", "text": w if i == 0 else " " + w}
                for i, w in enumerate(words)
            ]
            block = {"type": "text", "text": ""}
        else:
            pieces = tools[index - first_tool].pieces()
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
            block = {**block, "input": {}}
        yield event({"type": "content_block_start", "index": index, "content_block": block})
        if index == 0:
            yield event({"type": "ping"})
        for delta in deltas:
            yield event({"type": "content_block_delta", "index": index, "delta": delta})
        yield event({"type": "content_block_stop", "index": index})
    end: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
    }
    if usage:
        end["usage"] = {"output_tokens": output_tokens}
    yield event(end)
    yield event({"type": "message_stop"})


# ---- embeddings and legacy completions ----------------------------------------------------


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def text_inputs(value: Any) -> list[tuple[str, int]] | None:
    """`input` / `prompt` as (text, tokens) per item, or None unless it has one of the API's
    four shapes: a string, a list of strings, a token array, a list of token arrays.

    A token array's text is its ids joined by spaces: deterministic, which is all the fake
    needs (a string of those digits embeds alike; no tokenizer is worth carrying here)."""
    if isinstance(value, str):
        return [(value, max(len(value.split()), 1))]
    if not isinstance(value, list) or not value:
        return None
    items = [value] if all(_is_token(v) for v in value) else value
    out: list[tuple[str, int]] = []
    for item in items:
        if isinstance(item, str):
            out.append((item, max(len(item.split()), 1)))
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            out.append((" ".join(map(str, item)), len(item)))
        else:
            return None
    return out


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector hashed from the text: equal texts embed equally, others almost never.

    Rounded to float32, so the "float" answer and the decoded "base64" one are the same numbers.
    """
    raw = hashlib.shake_256(text.encode()).digest(4 * dimensions)
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dimensions}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def embeddings_response(
    model: str,
    inputs: Sequence[tuple[str, int]],
    dimensions: int,
    encoding: str,
    *,
    usage: bool = True,
) -> dict[str, Any]:
    """A CreateEmbeddingResponse; "base64" packs each vector as little-endian float32.
    ``usage=False`` leaves `usage` out, like an upstream that does not report it."""
    data: list[dict[str, Any]] = []
    for index, (text, _) in enumerate(inputs):
        vector = embedding_vector(text, dimensions)
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    body: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if usage:
        tokens = sum(n for _, n in inputs)
        body["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return body


def completion_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The legacy endpoint's usage: the three counts, no details."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# One generated answer per prompt: its words and finish_reason ("stop" or "length").
Answer = tuple[list[str], str]


def text_completion(
    model: str, answers: Sequence[Answer], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """A text_completion (legacy `POST /v1/completions`), a choice per prompt."""
    body: dict[str, Any] = {
        "id": new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"text": " ".join(words), "index": i, "logprobs": None, "finish_reason": finish}
            for i, (words, finish) in enumerate(answers)
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def text_completion_events(
    model: str, answers: Sequence[Answer], usage: dict[str, Any] | None
) -> Iterator[bytes]:
    """The legacy stream: a chunk per word, a last chunk per choice carrying finish_reason,
    then (include_usage) one with `"choices":[]` and the usage, then ``[DONE]``.

    Choices go one after the other (OpenAI interleaves them; `index` tells them apart)."""
    envelope = encode_json(
        {
            "id": new_id("cmpl-"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
    )[:-1]
    prefix = f'data: {envelope},"choices":['.encode()
    tail = ',"usage":null}\n\n' if usage is not None else "}\n\n"

    def event(text: str, index: int, reason: str | None = None) -> bytes:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
        return prefix + (encode_json(choice) + "]" + tail).encode()

    for index, (words, finish) in enumerate(answers):
        for i, word in enumerate(words):
            yield event(word if i == 0 else " " + word, index)
        yield event("", index, finish)
    if usage is not None:
        yield f'data: {envelope},"choices":[],"usage":{encode_json(usage)}}}\n\n'.encode()
    yield b"data: [DONE]\n\n"


# ---- Responses API ------------------------------------------------------------------------


def responses_prompt_info(body: dict[str, Any]) -> tuple[int, str]:
    """(input "tokens" as a word count, last user text) of a `POST /v1/responses` body.

    `input` is a string (one user message) or a list of items: messages, whose content is a
    string or `input_text` parts, and items such as `function_call_output` (their `output`)."""
    words = len(_text_of(body.get("instructions")).split())
    value = body.get("input")
    if isinstance(value, str):
        return max(words + len(value.split()), 1), value
    last_user = ""
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, dict):
            continue
        text = _text_of(item.get("content")) or _text_of(item.get("output"))
        words += len(text.split())
        if item.get("role") == "user":
            last_user = text
    return max(words, 1), last_user


def responses_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        # cache_write_tokens: required by the openai SDK's types since prompt-cache writes.
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _response_output(
    words: list[str], tools: Sequence[ToolCall], truncated: bool
) -> list[dict[str, Any]]:
    """Output items: a message (unless only function calls), then a function_call per call."""
    items: list[dict[str, Any]] = []
    if words or not tools:
        items.append(
            {
                "id": new_id("msg_"),
                "type": "message",
                "status": "incomplete" if truncated else "completed",
                "content": [_output_text(" ".join(words))],
                "role": "assistant",
            }
        )
    for call_id, tool in zip(_call_ids(tools, "call_"), tools, strict=True):
        items.append(
            {
                "id": new_id("fc_"),
                "type": "function_call",
                "status": "completed",
                "arguments": tool.arguments,
                "call_id": call_id,
                "name": tool.name,
            }
        )
    return items


def response_object(
    body: dict[str, Any],
    words: list[str],
    tools: Sequence[ToolCall],
    truncated: bool,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The Response, as `POST /v1/responses` (and `GET /v1/responses/{id}`) returns it.

    Every field the real API sends is here; the request's settings are echoed like it does.
    A reply cut by `max_output_tokens` is "incomplete", as OpenAI reports it."""

    def echo(name: str, default: Any) -> Any:
        value = body.get(name)
        return default if value is None else value

    tools_in = body.get("tools")
    return {
        "id": new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if truncated else "completed",
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": str(body["model"]),
        "output": _response_output(words, tools, truncated),
        "parallel_tool_calls": echo("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": echo("store", True),
        "temperature": echo("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": echo("tool_choice", "auto"),
        "tools": tools_in if isinstance(tools_in, list) else [],
        "top_logprobs": 0,
        "top_p": echo("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": echo("metadata", {}),
    }


def response_events(
    response: dict[str, Any], words: list[str], tools: Sequence[ToolCall]
) -> Iterator[bytes]:
    """The Responses stream of ``response`` (from :func:`response_object` with the same words
    and tools), as `event:`/`data:` pairs numbered by `sequence_number`, with no `[DONE]`.

    response.created and .in_progress carry the response without output or usage; each output
    item is announced (output_item.added, in progress), filled (a message: content_part.added,
    an output_text.delta per word, output_text.done, content_part.done; a function call: a
    function_call_arguments.delta per piece, .done) and closed (output_item.done); the stream
    ends with response.completed, or response.incomplete when max_output_tokens cut it."""
    sequence = itertools.count()

    def event(etype: str, **fields: Any) -> bytes:
        data = {"type": etype, "sequence_number": next(sequence), **fields}
        return f"event: {etype}\ndata: {encode_json(data)}\n\n".encode()

    pending = {**response, "status": "in_progress", "incomplete_details": None}
    pending.update(output=[], usage=None)
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    calls = iter(tools)
    for index, item in enumerate(response["output"]):
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "content": []},
            )
            part = {**where, "content_index": 0}
            yield event("response.content_part.added", **part, part=_output_text(""))
            for i, word in enumerate(words):
                delta = word if i == 0 else " " + word
                yield event("response.output_text.delta", **part, delta=delta, logprobs=[])
            text = item["content"][0]["text"]
            yield event("response.output_text.done", **part, text=text, logprobs=[])
            yield event("response.content_part.done", **part, part=item["content"][0])
        else:
            added = {**item, "status": "in_progress", "arguments": ""}
            yield event("response.output_item.added", output_index=index, item=added)
            for piece in next(calls).pieces():
                yield event("response.function_call_arguments.delta", **where, delta=piece)
            arguments = item["arguments"]
            yield event("response.function_call_arguments.done", **where, arguments=arguments)
        yield event("response.output_item.done", output_index=index, item=item)
    final = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    yield event(final, response=response)


# ---- stream faults (the material `capture_inspect --detect-issues` is tested on) -----------

ERROR_200_MESSAGE = "The server had an error while processing your request. Sorry about that!"
# Not SSE (no field name a parser knows), then a data line whose JSON is cut short.
BAD_SSE = b'this line is not SSE\ndata: {"choices": [{"delta": \n\n'


def stream_error_event(flavour: str, sequence: int) -> bytes:
    """The error event each API sends inside a 200 stream: OpenAI chat and completions a
    `data: {"error": ...}` line, Anthropic and the Responses API an `event: error`."""
    if flavour == "anthropic":
        data: dict[str, Any] = {
            "type": "error",
            "error": {"type": "api_error", "message": "Internal server error"},
        }
    elif flavour == "responses":
        data = {
            "type": "error",
            "sequence_number": sequence,
            "code": "server_error",
            "message": ERROR_200_MESSAGE,
            "param": None,
        }
    else:
        return f"data: {encode_json(openai_error(ERROR_200_MESSAGE, 'server_error'))}\n\n".encode()
    return f"event: error\ndata: {encode_json(data)}\n\n".encode()


def faulty_events(events: Iterator[bytes], fault: str, flavour: str, after: int) -> Iterator[bytes]:
    """``events`` as the stream faults rewrite them; unchanged for every other fault.

    no_done: without the stream's last event (OpenAI's `[DONE]`, Anthropic's message_stop,
    the Responses API's response.completed). error_200: ``after`` events, then the API's error
    event, and the stream ends there. bad_sse: a malformed event (BAD_SSE) after ``after``."""
    if fault == "no_done":
        previous: bytes | None = None
        for event in events:
            if previous is not None:
                yield previous
            previous = event
        return
    if fault not in ("error_200", "bad_sse"):
        yield from events
        return
    for i, event in enumerate(events):
        if i == after:
            if fault == "error_200":
                yield stream_error_event(flavour, i)
                return
            yield BAD_SSE
        yield event
