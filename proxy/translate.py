"""Translation between OpenAI Chat Completions and Anthropic Messages, so that a route can fail
over across dialects: requests, whole answers, error bodies and streams, both ways. Pure: it
takes and returns parsed JSON (and SSE bytes for streams), and imports nothing of Django.

What cannot be said in the other API raises `Untranslatable` naming it, rather than changing the
answer silently: OpenAI's `n` > 1, `logprobs`, `response_format`, penalties, `seed`... bound
for Anthropic; Anthropic's `thinking`, `top_k`, server tools, documents... bound for OpenAI.
Every field of one API with no counterpart in the other raises unless it holds its "ask for
nothing" value (`n: 1`, `logprobs: false`, `modalities: ["text"]`, `service_tier: "auto"`).

`cache_control` (on Anthropic blocks, tools, or the body) bound for OpenAI is the one deliberate
drop: it is a caching hint with no effect on the answer. What is ignored besides is not asked of
the model at all but earlier output echoed back in the history: an OpenAI assistant message's
`annotations`, `reasoning_content` or null fields, and Anthropic `thinking` blocks of earlier
turns (which Anthropic itself strips from the context).

Top-level fields unknown to both APIs pass through unchanged: the upstream rejects them loudly
if they matter, and an OpenAI-compatible server's extensions keep working. `stream_options` is
consumed, and an OpenAI-bound stream always asks for usage (`include_usage`), since Anthropic
clients are always told it.

Streams are translated by stateful objects, one per stream, fed one parsed upstream event at a
time and returning the client's SSE bytes. They are on the hot path: the frequent events (text
and argument deltas) are spliced into pre-encoded frames, one small JSON encode each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

ANTHROPIC_API = "Anthropic Messages API"
OPENAI_API = "OpenAI Chat Completions API"

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# Anthropic's `max_tokens` is required; OpenAI's is not.
DEFAULT_MAX_TOKENS = 4096


class Untranslatable(Exception):
    """A feature of the request that the other API cannot express."""

    def __init__(self, feature: str, param: str | None = None, *, api: str = ANTHROPIC_API) -> None:
        # Parts of it can be the client's own strings (a role, a part's type): kept short.
        feature, param = feature[:100], param[:100] if param else param
        self.feature = feature
        self.param = param
        self.api = api
        named = feature if " " in feature else f"'{feature}'"
        super().__init__(f"{named} cannot be translated to the {api}.")


def _none(value: Any) -> bool:
    return value is None


def _falsy(value: Any) -> bool:
    return not value


# OpenAI fields with no Anthropic counterpart, and whether a value asks for nothing.
_CHAT_ONLY: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v is None or v == 1,
    "logprobs": _falsy,
    "top_logprobs": _falsy,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "audio": _none,
    "modalities": lambda v: v is None or v == ["text"],
    "presence_penalty": _falsy,
    "frequency_penalty": _falsy,
    "logit_bias": _falsy,
    "seed": _none,
    "prediction": _none,
    "reasoning_effort": _none,
    "functions": _falsy,
    "function_call": _none,
    "web_search_options": _none,
    "verbosity": _none,
    "store": _falsy,
    "metadata": _falsy,
    "service_tier": lambda v: v is None or v == "auto",
    "prompt_cache_key": _none,
    "prompt_cache_retention": _none,
    "moderation": _none,
}
# OpenAI fields this module translates (or consumes).
_CHAT_HANDLED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "temperature",
        "top_p",
        "user",
        "safety_identifier",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
# Anthropic fields with no OpenAI counterpart, and whether a value asks for nothing.
_MESSAGES_ONLY: dict[str, Callable[[Any], bool]] = {
    "thinking": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "disabled"),
    "top_k": _none,
    "container": _none,
    "context_management": _none,
    "mcp_servers": _falsy,
    "output_config": _falsy,
    "output_format": _none,
    "inference_geo": _none,
    "speed": _none,
    "diagnostics": _none,
    "service_tier": lambda v: v is None or v == "auto",
}
_MESSAGES_HANDLED = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "temperature",
        "top_p",
        "metadata",
        "stream",
        "tools",
        "tool_choice",
        "cache_control",
    }
)
# Output echoed back in an OpenAI assistant message: not asked of the model, so not sent on.
_CHAT_ECHOES = frozenset({"annotations", "reasoning_content"})
# Message fields that are fine when null or empty (SDKs dump them so), untranslatable otherwise.
_CHAT_MESSAGE_NULLABLE = frozenset({"name", "audio", "function_call", "refusal"})

_CHAT_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_ANTHROPIC_ERROR_TYPES = frozenset({*_ERROR_TYPES.values(), "api_error", "billing_error"})


def _check_only(body: dict[str, Any], only: dict[str, Callable[[Any], bool]], api: str) -> None:
    for name, asks_nothing in only.items():
        if name in body and not asks_nothing(body[name]):
            raise Untranslatable(name, name, api=api)


def _passthrough(body: dict[str, Any], known: frozenset[str], only: dict[str, Any]) -> dict:
    return {k: v for k, v in body.items() if k not in known and k not in only}


# ---------------------------------------------------------------------------------------------
# OpenAI request -> Anthropic request


def chat_request_to_messages(body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
    """An OpenAI Chat Completions body as an Anthropic Messages body for `model`."""
    _check_only(body, _CHAT_ONLY, ANTHROPIC_API)
    out = _passthrough(body, _CHAT_HANDLED, _CHAT_ONLY)
    system, messages = _chat_messages_to_anthropic(body.get("messages") or [])
    out["model"] = model
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 and len(system[0]) == 2 else system
    out["messages"] = messages
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = max_tokens or DEFAULT_MAX_TOKENS
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and temperature > 1:
        # OpenAI's scale goes to 2, Anthropic's to 1: scaling it would change the answer.
        raise Untranslatable("a temperature above 1", "temperature")
    user = body.get("user") or body.get("safety_identifier")
    if user:
        out["metadata"] = {"user_id": user}
    tools = body.get("tools")
    if tools:
        out["tools"] = [_chat_tool_to_anthropic(tool, i) for i, tool in enumerate(tools)]
        choice = _chat_tool_choice_to_anthropic(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False and choice.get("type") != "none":
            choice["disable_parallel_tool_use"] = True
        if choice != {"type": "auto"}:
            out["tool_choice"] = choice
    elif body.get("tool_choice") not in (None, "none", "auto"):
        raise Untranslatable("tool_choice without tools", "tool_choice")
    if stream:
        out["stream"] = True
    return out


def _chat_messages_to_anthropic(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise Untranslatable(f"the message role {role!r}", f"messages[{i}].role")
        _chat_message_check(message, i)
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content"), f"messages[{i}].content"))
            continue
        content: str | list[dict[str, Any]]
        if role == "user":
            content = _chat_user_content(message.get("content"), i)
        elif role == "assistant":
            content = _chat_assistant_content(message, i)
        else:  # a tool result
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
            }
            result_content = message.get("content")
            if result_content:
                result["content"] = (
                    result_content
                    if isinstance(result_content, str)
                    else _text_blocks(result_content, f"messages[{i}].content")
                )
            role, content = "user", [result]
        _append_turn(out, role, content)
    return system, out


def _chat_message_check(message: dict[str, Any], i: int) -> None:
    """Anthropic's messages hold a role and content only: any other field of an OpenAI message
    that asks for something (a participant `name`, audio, a legacy `function_call`, a field
    this module does not know) cannot be said there."""
    for key, value in message.items():
        if key in ("role", "content", "tool_calls", "tool_call_id") or key in _CHAT_ECHOES:
            continue
        if key in _CHAT_MESSAGE_NULLABLE and not value:
            continue
        raise Untranslatable(f"messages[].{key}", f"messages[{i}].{key}")


def _append_turn(out: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    # Anthropic wants user and assistant turns to alternate: neighbours of one role merge.
    if out and out[-1]["role"] == role:
        previous = out[-1]
        previous["content"] = _as_blocks(previous["content"]) + _as_blocks(content)
        return
    out.append({"role": role, "content": content})


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for j, part in enumerate(content):
        if part.get("type") != "text":
            raise Untranslatable(f"content part {part.get('type')!r} here", f"{where}[{j}]")
        blocks.append(dict(part))
    return blocks


def _chat_user_content(content: Any, i: int) -> str | list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return content or ""
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            # The same shape in both APIs; extensions such as cache_control ride along.
            blocks.append(dict(part))
        elif kind == "image_url":
            blocks.append(_chat_image_to_anthropic(part, f"messages[{i}].content[{j}]"))
        else:
            raise Untranslatable(f"content part {kind!r}", f"messages[{i}].content[{j}]")
    return blocks


def _chat_image_to_anthropic(part: dict[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url") or {}
    if image.get("detail") not in (None, "auto"):
        raise Untranslatable("image_url.detail", f"{where}.image_url.detail")
    url: str = image.get("url") or ""
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64":
            raise Untranslatable("an image data: URL that is not base64", f"{where}.image_url.url")
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif url.startswith(("https://", "http://")):
        source = {"type": "url", "url": url}
    else:
        raise Untranslatable("an image URL that is neither data: nor http(s)", where)
    return {"type": "image", "source": source}


def _chat_assistant_content(message: dict[str, Any], i: int) -> str | list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str) and not message.get("tool_calls"):
        return content
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        blocks = _as_blocks(content)
    elif content:
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind == "text":
                blocks.append(dict(part))
            elif kind == "refusal":
                blocks.append({"type": "text", "text": part.get("refusal", "")})
            else:
                raise Untranslatable(f"content part {kind!r}", f"messages[{i}].content[{j}]")
    for k, call in enumerate(message.get("tool_calls") or ()):
        where = f"messages[{i}].tool_calls[{k}]"
        if call.get("type", "function") != "function":
            raise Untranslatable(f"a {call.get('type')!r} tool call", where)
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _arguments(function.get("arguments"), f"{where}.function.arguments"),
            }
        )
    return blocks


def _arguments(arguments: str | None, where: str) -> dict[str, Any]:
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise Untranslatable("tool call arguments that are not a JSON object", where)
    return value


def _chat_tool_to_anthropic(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type", "function") != "function":
        raise Untranslatable(f"a {tool.get('type')!r} tool", f"tools[{i}]")
    function = tool.get("function") or {}
    out: dict[str, Any] = {"name": function.get("name")}
    if function.get("description"):
        out["description"] = function["description"]
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    if function.get("strict") is not None:
        out["strict"] = function["strict"]
    return out


def _chat_tool_choice_to_anthropic(choice: Any) -> dict[str, Any]:
    if choice is None or choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    raise Untranslatable("this tool_choice", "tool_choice")


# ---------------------------------------------------------------------------------------------
# Anthropic request -> OpenAI request


def messages_request_to_chat(body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
    """An Anthropic Messages body as an OpenAI Chat Completions body for `model`."""
    _check_only(body, _MESSAGES_ONLY, OPENAI_API)
    out = _passthrough(body, _MESSAGES_HANDLED, _MESSAGES_ONLY)
    out["model"] = model
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _openai_text(system, "system")})
    for i, message in enumerate(body.get("messages") or ()):
        messages.extend(_anthropic_message_to_chat(message, i))
    out["messages"] = messages
    if body.get("max_tokens") is not None:
        out["max_completion_tokens"] = body["max_tokens"]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    metadata = body.get("metadata") or {}
    for key in metadata:
        if key != "user_id":
            raise Untranslatable(f"metadata.{key}", f"metadata.{key}", api=OPENAI_API)
    if metadata.get("user_id"):
        out["user"] = metadata["user_id"]
    tools = body.get("tools")
    if tools:
        out["tools"] = [_anthropic_tool_to_chat(tool, i) for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice:
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "none", "any"):
            out["tool_choice"] = "required" if kind == "any" else kind
        else:
            raise Untranslatable(f"tool_choice {kind!r}", "tool_choice", api=OPENAI_API)
        if choice.get("disable_parallel_tool_use") and tools:
            out["parallel_tool_calls"] = False
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _openai_text(content: str | list[dict[str, Any]], where: str) -> str | list[dict[str, Any]]:
    """Text blocks as OpenAI content: a string when there is one (what every compatible server
    reads), text parts otherwise; cache_control is dropped."""
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(content):
        if block.get("type") != "text":
            raise Untranslatable(
                f"a {block.get('type')!r} block in {where.split('[')[0]}",
                f"{where}[{j}]",
                api=OPENAI_API,
            )
        parts.append({"type": "text", "text": block.get("text", "")})
    return parts[0]["text"] if len(parts) == 1 else parts


def _anthropic_message_to_chat(message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise Untranslatable(f"the message role {role!r}", f"messages[{i}].role", api=OPENAI_API)
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if role == "assistant":
        return [_anthropic_assistant_to_chat(content or [], i)]
    # A user turn: its tool results become "tool" messages, which must come first (right
    # after the assistant's tool calls), then the rest as one user message.
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content or ()):
        kind = block.get("type")
        where = f"messages[{i}].content[{j}]"
        if kind == "tool_result":
            out.append(_tool_result_to_chat(block, where))
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_anthropic_image_to_chat(block, where))
        else:
            raise Untranslatable(f"a {kind!r} content block", where, api=OPENAI_API)
    if parts:
        text_only = len(parts) == 1 and parts[0]["type"] == "text"
        out.append({"role": "user", "content": parts[0]["text"] if text_only else parts})
    return out


def _tool_result_to_chat(block: dict[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content") or ""
    text = _openai_text(content, f"{where}.content") if content else ""
    if block.get("is_error"):
        # Chat completions have no error flag on a tool result: the model reads it in words
        # instead (agent loops send failed tool calls back all the time).
        if isinstance(text, str):
            text = f"Error: {text}" if text else "Error"
        else:
            text = [{"type": "text", "text": "Error:"}, *text]
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}


def _anthropic_image_to_chat(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") or {}
    kind = source.get("type")
    if kind == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url":
        url = source.get("url") or ""
    else:
        raise Untranslatable(f"an image of source {kind!r}", f"{where}.source", api=OPENAI_API)
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_use_to_call(block: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic tool_use block as an OpenAI tool call (arguments as JSON text)."""
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": _encode(block.get("input") or {})},
    }


def _anthropic_assistant_to_chat(content: list[dict[str, Any]], i: int) -> dict[str, Any]:
    texts = []
    calls = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(_tool_use_to_call(block))
        elif kind not in ("thinking", "redacted_thinking"):
            where = f"messages[{i}].content[{j}]"
            raise Untranslatable(f"a {kind!r} content block", where, api=OPENAI_API)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


_ANTHROPIC_TOOL_KEYS = frozenset({"name", "description", "input_schema", "type", "strict"})


def _anthropic_tool_to_chat(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") not in (None, "custom"):
        raise Untranslatable(f"the server tool {tool.get('type')!r}", f"tools[{i}]", api=OPENAI_API)
    for key, value in tool.items():
        if key not in _ANTHROPIC_TOOL_KEYS and key != "cache_control" and value:
            raise Untranslatable(f"tools[].{key}", f"tools[{i}].{key}", api=OPENAI_API)
    function: dict[str, Any] = {"name": tool.get("name")}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


# ---------------------------------------------------------------------------------------------
# Whole answers


def _chat_usage(usage: dict[str, Any]) -> dict[str, Any]:
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (
        (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    )
    completion = usage.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _anthropic_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": (usage.get("prompt_tokens") or 0) - cached,
        "output_tokens": usage.get("completion_tokens") or 0,
        "cache_read_input_tokens": cached,
    }


def messages_response_to_chat(message: dict[str, Any], *, model: str | None = None) -> dict:
    """An Anthropic message as a `chat.completion` (model None: the upstream's)."""
    texts = []
    thinking = []
    calls = []
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thinking.append(block.get("thinking", ""))
        elif kind == "tool_use":
            calls.append(_tool_use_to_call(block))
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        reply["tool_calls"] = calls
    if thinking:
        reply["reasoning_content"] = "".join(thinking)
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": _CHAT_FINISH.get(message.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": _chat_usage(message.get("usage") or {}),
    }


def chat_response_to_messages(completion: dict[str, Any], *, model: str | None = None) -> dict:
    """A `chat.completion` as an Anthropic message (model None: the upstream's)."""
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = reply.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if p.get("type") == "text")
    if text:
        content.append({"type": "text", "text": text})
    if reply.get("refusal"):
        content.append({"type": "text", "text": reply["refusal"]})
    for k, call in enumerate(reply.get("tool_calls") or ()):
        function = call.get("function") or {}
        where = f"choices[0].message.tool_calls[{k}].function.arguments"
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _arguments(function.get("arguments"), where),
            }
        )
    finish = choice.get("finish_reason")
    return {
        "id": completion.get("id"),
        "type": "message",
        "role": "assistant",
        "model": model or completion.get("model"),
        "content": content,
        "stop_reason": _ANTHROPIC_STOP.get(finish or "", "end_turn"),
        "stop_sequence": None,
        "usage": _anthropic_usage(completion.get("usage")),
    }


# ---------------------------------------------------------------------------------------------
# Error bodies


def _error_type(status: int) -> str:
    found = _ERROR_TYPES.get(status)
    if found:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


def _error_parts(status: int, body: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The upstream's message, and its error object (empty when it sent none)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"], error
    if isinstance(error, str):
        return error, {}
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"], {}
    return f"The upstream answered HTTP {status}.", {}


def anthropic_error_to_openai(status: int, body: dict[str, Any] | None) -> dict[str, Any]:
    """An Anthropic error body (`{"type": "error", "error": {...}}`) in OpenAI's envelope."""
    message, error = _error_parts(status, body)
    upstream_type = error.get("type")
    return {
        "error": {
            "message": message,
            "type": _error_type(status),
            "param": None,
            "code": upstream_type if isinstance(upstream_type, str) else None,
        }
    }


def openai_error_to_anthropic(status: int, body: dict[str, Any] | None) -> dict[str, Any]:
    """An OpenAI error body (`{"error": {...}}`) in Anthropic's envelope."""
    message, _ = _error_parts(status, body)
    return {"type": "error", "error": {"type": _error_type(status), "message": message}}


# ---------------------------------------------------------------------------------------------
# Streams

_DONE = b"data: [DONE]\n\n"
_CHUNK_TAIL = ',"logprobs":null,"finish_reason":null}]}\n\n'


class MessagesStreamToChat:
    """Anthropic upstream events -> OpenAI `chat.completion.chunk` events. The chunks carry the
    upstream message's id (the request id until message_start gives it)."""

    __slots__ = (
        "_created",
        "_finished",
        "_head",
        "_include_usage",
        "_model",
        "_tools",
        "_usage",
        "_usage_sent",
    )

    def __init__(self, *, model: str, include_usage: bool, request_id: str) -> None:
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time())
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._usage: dict[str, Any] = {}
        self._finished = False
        self._usage_sent = False
        self._head = ""
        self._set_id(request_id)

    def _set_id(self, id: str) -> None:
        fields = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
        }
        # Everything before the chunk's delta, encoded once per stream.
        self._head = "data: " + _encode(fields)[:-1] + ',"choices":[{"index":0,"delta":'

    def _chunk(self, delta_json: str) -> bytes:
        return (self._head + delta_json + _CHUNK_TAIL).encode()

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        if name == "content_block_delta":
            delta = data.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                return self._chunk('{"content":' + _encode(delta.get("text", "")) + "}")
            if kind == "input_json_delta":
                part = delta.get("partial_json")
                index = self._tools.get(data.get("index", -1))
                if not part or index is None:
                    return b""
                return self._chunk(
                    f'{{"tool_calls":[{{"index":{index},"function":{{"arguments":'
                    f"{_encode(part)}}}}}]}}"
                )
            if kind == "thinking_delta":
                return self._chunk(
                    '{"reasoning_content":' + _encode(delta.get("thinking", "")) + "}"
                )
            return b""  # signature and citation deltas have no OpenAI form
        if name == "content_block_start":
            return self._block_start(data)
        if name == "message_start":
            message = data.get("message") or {}
            if isinstance(message.get("model"), str):
                self._model = message["model"][:200]  # the model that answered, as unstreamed
            if message.get("id"):
                self._set_id(message["id"])
            self._usage.update(message.get("usage") or {})
            return self._chunk('{"role":"assistant","content":""}')
        if name == "message_delta":
            for key, value in (data.get("usage") or {}).items():
                if value is not None:  # cumulative counts: a later one replaces
                    self._usage[key] = value
            stop = (data.get("delta") or {}).get("stop_reason")
            return self._finish(_CHAT_FINISH.get(stop or "", "stop"))
        if name == "message_stop":
            return self._usage_chunk()
        if name == "error":
            error = data.get("error") or {}
            return (
                "data: "
                + _encode(
                    {
                        "error": {
                            "message": error.get("message") or "The upstream stream failed.",
                            "type": error.get("type") or "api_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                + "\n\n"
            ).encode()
        return b""  # ping, content_block_stop

    def _block_start(self, data: dict[str, Any]) -> bytes:
        block = data.get("content_block") or {}
        kind = block.get("type")
        if kind == "tool_use":
            index = len(self._tools)
            self._tools[data.get("index", -1)] = index
            call = {
                "index": index,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return self._chunk(_encode({"tool_calls": [call]}))
        if kind == "text" and block.get("text"):
            return self._chunk('{"content":' + _encode(block["text"]) + "}")
        return b""

    def _finish(self, reason: str) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        return (self._head + '{},"logprobs":null,"finish_reason":"' + reason + '"}]}\n\n').encode()

    def _usage_chunk(self) -> bytes:
        if not self._include_usage or self._usage_sent:
            return b""
        self._usage_sent = True
        head = self._head[: -len('[{"index":0,"delta":')]
        return (head + '[],"usage":' + _encode(_chat_usage(self._usage)) + "}\n\n").encode()

    def end(self) -> bytes:
        """The upstream finished normally: what the client is still owed, [DONE] last."""
        return self._finish("stop") + self._usage_chunk() + _DONE


class ChatStreamToMessages:
    """OpenAI upstream chunks -> Anthropic events. message_delta and message_stop wait for the
    usage chunk (OpenAI sends it after the finish_reason chunk) or for [DONE]."""

    __slots__ = (
        "_finish",
        "_model",
        "_next_block",
        "_open",
        "_open_text",
        "_request_id",
        "_started",
        "_stopped",
        "_tools",
        "_usage",
    )

    def __init__(self, *, model: str, request_id: str) -> None:
        self._model = model
        self._request_id = request_id
        self._started = False
        self._stopped = False
        self._open = -1  # the open content block's index, -1 when none is open
        self._open_text = False
        self._next_block = 0
        self._tools: dict[int, int] = {}  # OpenAI tool call index -> Anthropic block index
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def chunk(self, data: dict[str, Any]) -> bytes:
        if self._stopped:
            return b""
        error = data.get("error")
        if error is not None:
            return self._error(error)
        if not self._started and isinstance(data.get("model"), str):
            self._model = data["model"][:200]  # the model that answered, as unstreamed
        out = "" if self._started else self._start(data.get("id"))
        choices = data.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                out += self._text(text)
            refusal = delta.get("refusal")
            if refusal:
                out += self._text(refusal)
            for call in delta.get("tool_calls") or ():
                out += self._tool_call(call)
            finish = choice.get("finish_reason")
            if finish:
                self._finish = finish
                out += self._close()
        usage = data.get("usage")
        if usage:
            self._usage = usage
        if self._finish is not None and self._usage is not None:
            out += self._stop()
        return out.encode()

    def done(self) -> bytes:
        if self._stopped:
            return b""
        out = "" if self._started else self._start(None)
        return (out + self._close() + self._stop()).encode()

    def _start(self, id: str | None) -> str:
        self._started = True
        message: dict[str, Any] = {
            "id": id or self._request_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _open_block(self, block: dict[str, Any]) -> str:
        out = self._close()
        self._open = self._next_block
        self._next_block += 1
        start = {"type": "content_block_start", "index": self._open, "content_block": block}
        return out + _event("content_block_start", start)

    def _text(self, text: str) -> str:
        out = ""
        if not self._open_text:
            out = self._open_block({"type": "text", "text": ""})
            self._open_text = True
        return out + (
            'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
            f'{self._open},"delta":{{"type":"text_delta","text":{_encode(text)}}}}}\n\n'
        )

    def _tool_call(self, call: dict[str, Any]) -> str:
        function = call.get("function") or {}
        position = call.get("index", 0)
        block = self._tools.get(position)
        out = ""
        if block is None:
            tool_id = call.get("id") or f"toolu_{self._request_id}_{position}"
            start = {"type": "tool_use", "id": tool_id, "name": function.get("name") or ""}
            out = self._open_block({**start, "input": {}})
            block = self._tools[position] = self._open
        arguments = function.get("arguments")
        if arguments:
            out += (
                'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                f'{block},"delta":{{"type":"input_json_delta","partial_json":'
                f"{_encode(arguments)}}}}}\n\n"
            )
        return out

    def _close(self) -> str:
        if self._open < 0:
            return ""
        out = (
            'event: content_block_stop\ndata: {"type":"content_block_stop","index":'
            f"{self._open}}}\n\n"
        )
        self._open = -1
        self._open_text = False
        return out

    def _stop(self) -> str:
        self._stopped = True
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": _ANTHROPIC_STOP.get(self._finish or "", "end_turn"),
                "stop_sequence": None,
            },
            "usage": _anthropic_usage(self._usage),
        }
        return (
            _event("message_delta", delta)
            + 'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )

    def _error(self, error: Any) -> bytes:
        self._stopped = True
        if not isinstance(error, dict):
            error = {"message": str(error)}
        kind = error.get("type")
        body = {
            "type": "error",
            "error": {
                "type": kind if kind in _ANTHROPIC_ERROR_TYPES else "api_error",
                "message": error.get("message") or "The upstream stream failed.",
            },
        }
        return _event("error", body).encode()


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {_encode(data)}\n\n"
