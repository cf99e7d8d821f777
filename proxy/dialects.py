"""The two wire formats the proxy speaks: OpenAI chat completions and Anthropic Messages.

Everything that differs between them lives here: the upstream path and headers, the body sent
upstream, where usage is reported, how a stream's events are read, and the error event the
gateway adds to a stream that breaks. The failover engine and the stream relay take the
dialect from the CallContext and are otherwise the same for both, so rotation, failover, key
health, recording and the disconnect handling cannot drift apart between the two.

Token semantics are OpenAI's whatever the dialect: `prompt_tokens` includes cache reads
(`cached_tokens`) and cache writes (`cache_write_tokens`). Anthropic reports them apart from
`input_tokens`, so its usage is normalised here, once, before anything is recorded or priced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from common.upstream import messages_headers, upstream_headers
from keys.ratelimits import Headroom, parse_headroom
from keys.routing import DeploymentInfo, RouteInfo
from proxy.classify import Verdict, clip_code


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    # False while only part of it is known: an Anthropic stream reports its input tokens at
    # the start and the output count at the end; a stream cut in between gets the rest
    # estimated from the text it carried.
    reported: bool = False


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def usage_from(obj: Any) -> Usage | None:
    """OpenAI's `usage` object, defensively: upstreams (vLLM, Ollama, …) vary in what they send."""
    if not isinstance(obj, dict):
        return None
    prompt_details = obj.get("prompt_tokens_details")
    completion_details = obj.get("completion_tokens_details")
    prompt = _int(obj.get("prompt_tokens"))
    completion = _int(obj.get("completion_tokens"))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=_int(obj.get("total_tokens")) or prompt + completion,
        cached_tokens=_int(prompt_details.get("cached_tokens"))
        if isinstance(prompt_details, dict)
        else 0,
        reasoning_tokens=_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0,
        reported=True,
    )


def anthropic_usage_from(obj: Any, *, reported: bool = True) -> Usage | None:
    """Anthropic's `usage`, normalised: cache reads and writes are added to the prompt."""
    if not isinstance(obj, dict):
        return None
    read = _int(obj.get("cache_read_input_tokens"))
    write = _int(obj.get("cache_creation_input_tokens"))
    prompt = _int(obj.get("input_tokens")) + read + write
    completion = _int(obj.get("output_tokens")) if reported else 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=read,
        cache_write_tokens=write,
        reported=reported,
    )


# Tool names kept per call (the count is always whole); each is cut as an error code is
# (proxy.classify.clip_code: printable ASCII, 64 characters).
MAX_TOOL_NAMES = 16


@dataclass(slots=True)
class ToolCalls:
    """How many tool calls an answer made, and the names of the first few."""

    count: int = 0
    names: list[str] = field(default_factory=list)
    # Streams: the (choice, tool index) pairs seen, since a call spans many deltas.
    seen: set[tuple[Any, Any]] = field(default_factory=set)

    def add(self, name: Any) -> None:
        self.count += 1
        if len(self.names) < MAX_TOOL_NAMES and isinstance(name, str) and name:
            self.names.append(clip_code(name))


def _stream_tool_calls(state: StreamState, choice: Any, calls: list[Any]) -> None:
    """OpenAI streams a tool call over many deltas, all with its `index`; only the first has
    its `function.name` (and `id`)."""
    for call in calls:
        if not isinstance(call, dict):
            continue
        key = (choice, call.get("index", len(state.tools.seen)))
        if key in state.tools.seen:
            continue
        state.tools.seen.add(key)
        function = call.get("function")
        state.tools.add(function.get("name") if isinstance(function, dict) else None)


@dataclass(slots=True)
class StreamState:
    """What the relay has learnt from a stream's events so far."""

    strip_usage: bool = False  # OpenAI: drop the usage chunk the client did not ask for
    usage: Usage | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    complete: bool = False  # the upstream said the answer is whole ([DONE], message_stop, …)
    failure: tuple[str, str] | None = None  # (outcome, error_type)
    # The streamed text, for a token estimate when usage is missing. OpenAI: the content
    # strings. Anthropic: the raw `data` of each content delta, decoded only if an estimate is
    # needed (it always reports usage, so that is rare and parsing each delta would be waste).
    # Only the first `keep_max` (in characters or bytes, as kept) are held: the estimator
    # tokenizes no more than that and scales by `seen`, so a long stream costs no memory.
    pieces: list[Any] = field(default_factory=list)
    kept: int = 0
    seen: int = 0
    keep_max: int = 64 * 1024
    # Anthropic: the usage of message_start, updated by message_delta.
    raw_usage: dict[str, Any] = field(default_factory=dict)
    tools: ToolCalls = field(default_factory=ToolCalls)
    # A bridge's translator of this stream's events into the client's wire format.
    translator: Any = None

    def keep(self, piece: str | bytes) -> None:
        self.seen += len(piece)
        if self.kept < self.keep_max:
            self.pieces.append(piece)
            self.kept += len(piece)

    def full_length(self, text: str) -> int:
        """The length of the whole streamed text, of which `text` is the kept part."""
        return len(text) if self.seen <= self.kept else round(len(text) * self.seen / self.kept)


def token_seen(state: StreamState, text: Any) -> None:
    """A stream carried generated output: TTFT starts at the first, TTLT at the last."""
    now = time.perf_counter()
    if state.first_token_at is None:
        state.first_token_at = now
    state.last_token_at = now
    if isinstance(text, str) and text:
        state.keep(text)


def sse_data(raw: bytes) -> tuple[bytes, bytes]:
    """(event name, data) of one SSE event; several `data:` lines are joined with newlines and
    one space after the colon is dropped, as the SSE specification says."""
    name = b""
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, b"\n".join(data)


# One encoder for every upstream body: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_body(body: dict[str, Any]) -> bytes:
    return _encode(body).encode()


def event_type(data: bytes) -> bytes:
    """The name of an event whose `event:` line an intermediary dropped: its data's `type`."""
    chunk = json_object(data)
    return str(chunk.get("type", "")).encode() if chunk else b""


def json_object(data: bytes) -> dict[str, Any] | None:
    """`data` as a JSON object; None for anything else, a nesting deep enough to exhaust the
    parser included (an upstream's, or a string inside the request such as tool arguments)."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


class Dialect:
    path = ""  # appended to the provider's base_url
    records = True  # whether each attempt becomes a CallRecord
    anthropic = False  # whether the gateway's own errors take Anthropic's envelope
    operation = "chat"  # the record's call kind (usage.models.Operation)
    wire_name = "openai"  # the wire format spoken upstream (usage.models.Dialect)
    # Why a route without a deployment this endpoint can use is refused (a 400).
    unserved = "it has no deployment at all."

    def serves(self, kind: str) -> bool:
        """Whether a deployment of this provider kind can answer in this dialect."""
        return True

    def wire(self, kind: str) -> Dialect | None:
        """The dialect that talks to a deployment of this provider kind on this endpoint's
        behalf: this one, a translating bridge (proxy.bridges), or None if none can."""
        return self if self.serves(kind) else None

    def deployments(self, route: RouteInfo) -> list[DeploymentInfo]:
        """The route's fallback chain, in order, as far as this endpoint can use it."""
        return [d for d in route.deployments if self.wire(d.provider.kind) is not None]

    def answer(self, content: bytes, parsed: dict[str, Any] | None, status: int) -> bytes | None:
        """The body the client gets for the upstream's (non-streamed) answer: as it came,
        except across dialects; None when it cannot be read as the upstream's API answers."""
        return content

    def stream_translator(self, *, model: str, include_usage: bool, request_id: str) -> Any:
        """A bridge's per-stream translator (None: events are passed through)."""
        return None

    def verdict(self, verdict: Verdict) -> Verdict:
        """What an upstream answer means here (the classification is shared)."""
        return verdict

    def headroom(self, headers: Any) -> Headroom | None:
        return parse_headroom(headers)

    def forwarded(self, body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
        """The body sent upstream: the client's, with the deployment's model."""
        out = dict(body)
        out["model"] = model
        return out

    def tool_calls(self, parsed: dict[str, Any]) -> ToolCalls:
        """The tool calls of a whole (non-streamed) answer."""
        return ToolCalls()

    def headers(
        self, kind: str, secret: str, *, stream: bool, forward: dict[str, str]
    ) -> dict[str, str]:
        raise NotImplementedError

    def usage(self, parsed: dict[str, Any]) -> Usage | None:
        raise NotImplementedError

    def completion_text(self, parsed: dict[str, Any]) -> str:
        raise NotImplementedError

    def event(self, state: StreamState, raw: bytes) -> bytes | None:
        """Inspect one complete event; return what to forward (None drops it)."""
        raise NotImplementedError

    def streamed_text(self, state: StreamState) -> str:
        raise NotImplementedError

    def error_event(self, message: str, *, code: str) -> bytes:
        """What the gateway sends when the upstream fails mid-stream, so the SDK raises."""
        raise NotImplementedError


class OpenAIDialect(Dialect):
    path = "/chat/completions"

    def forwarded(self, body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
        out = dict(body)
        out["model"] = model
        if stream:
            # Asked for always, so a stream's tokens are reported rather than estimated; the
            # relay strips the extra chunk when the client did not ask for it.
            options = body.get("stream_options")
            out["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        return out

    def tool_calls(self, parsed: dict[str, Any]) -> ToolCalls:
        found = ToolCalls()
        choices = parsed.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                found.add(function.get("name") if isinstance(function, dict) else None)
            legacy = message.get("function_call")  # the deprecated single-function form
            if isinstance(legacy, dict):
                found.add(legacy.get("name"))
        return found

    def headers(
        self, kind: str, secret: str, *, stream: bool, forward: dict[str, str]
    ) -> dict[str, str]:
        return upstream_headers(kind, secret, stream=stream)

    def usage(self, parsed: dict[str, Any]) -> Usage | None:
        return usage_from(parsed.get("usage"))

    def completion_text(self, parsed: dict[str, Any]) -> str:
        choices = parsed.get("choices")
        texts = []
        for choice in choices if isinstance(choices, list) else ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                texts.append(message["content"])
        return "".join(texts)

    def event(self, state: StreamState, raw: bytes) -> bytes | None:
        _, data = sse_data(raw)
        if not data:
            return raw
        if data == b"[DONE]":
            state.complete = True
            return raw
        chunk = json_object(data)
        if chunk is None:
            return raw
        if "error" in chunk:
            state.failure = ("stream_error", "upstream_error_event")
            return raw
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if usage:
            state.usage = usage_from(usage)
            if state.strip_usage and not choices:
                return None
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                self.choice_event(state, choice)
                if choice.get("finish_reason"):
                    state.complete = True
        return raw

    def choice_event(self, state: StreamState, choice: dict[str, Any]) -> None:
        """One streamed choice: a chat delta (text, tool-call pieces, reasoning)."""
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            tool_calls = delta.get("tool_calls")
            if isinstance(tool_calls, list):
                _stream_tool_calls(state, choice.get("index"), tool_calls)
            if content or tool_calls or delta.get("reasoning_content"):
                token_seen(state, content)

    def streamed_text(self, state: StreamState) -> str:
        return "".join(state.pieces)

    def error_event(self, message: str, *, code: str) -> bytes:
        body = {
            "error": {"message": message, "type": "upstream_error", "code": code, "param": None}
        }
        return b"data: " + json.dumps(body).encode() + b"\n\n"


# Content deltas that are generated output (TTFT starts at the first non-empty one), and the
# field that carries each one's text.
_ANTHROPIC_DELTAS = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}


def _delta_text(data: bytes) -> str:
    """The generated text a content_block_delta carries ("" for signatures and the like)."""
    chunk = json_object(data)
    delta = chunk.get("delta") if chunk else None
    if not isinstance(delta, dict):
        return ""
    text = delta.get(_ANTHROPIC_DELTAS.get(str(delta.get("type")), ""))
    return text if isinstance(text, str) else ""


class AnthropicDialect(Dialect):
    path = "/messages"
    anthropic = True
    wire_name = "anthropic"

    def serves(self, kind: str) -> bool:
        # Only Anthropic itself speaks the native Messages API; the other kinds are OpenAI's
        # wire format (and an `anthropic` provider's base_url is api.anthropic.com/v1).
        return kind == "anthropic"

    def headers(
        self, kind: str, secret: str, *, stream: bool, forward: dict[str, str]
    ) -> dict[str, str]:
        # The client's anthropic-version / anthropic-beta win over the defaults.
        return {**messages_headers(secret, stream=stream), **forward}

    def usage(self, parsed: dict[str, Any]) -> Usage | None:
        return anthropic_usage_from(parsed.get("usage"))

    def completion_text(self, parsed: dict[str, Any]) -> str:
        content = parsed.get("content")
        return "".join(
            block["text"]
            for block in (content if isinstance(content, list) else ())
            if isinstance(block, dict) and isinstance(block.get("text"), str)
        )

    def event(self, state: StreamState, raw: bytes) -> bytes | None:
        name, data = sse_data(raw)
        if not name and data:
            name = event_type(data)
        if name == b"content_block_delta":
            # The bulk of a stream. Once its first token is seen nothing in it is needed
            # but the time it arrived (its text is kept raw for a possible estimate).
            now = time.perf_counter()
            if state.first_token_at is None:
                if not _delta_text(data):
                    return raw
                state.first_token_at = now
            state.last_token_at = now
            state.keep(data)
            return raw
        if name == b"content_block_start" and b"tool_use" in data:
            # A tool call begins (its name is here; its arguments follow as deltas).
            chunk = json_object(data)
            block = chunk.get("content_block") if chunk else None
            if isinstance(block, dict) and block.get("type") == "tool_use":
                state.tools.add(block.get("name"))
            return raw
        if name in (b"ping", b"content_block_start", b"content_block_stop") or not data:
            return raw
        if name == b"message_stop":
            state.complete = True
            return raw
        chunk = json_object(data)
        if chunk is None:
            return raw
        kind = name.decode() if name else str(chunk.get("type", ""))
        if kind == "message_start":
            message = chunk.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                state.raw_usage = dict(usage)
                # Its output_tokens is a placeholder; the real count comes with message_delta.
                state.usage = anthropic_usage_from(usage, reported=False)
        elif kind == "message_delta":
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                # Cumulative counts: they replace what message_start said (a null does not).
                state.raw_usage.update((k, v) for k, v in usage.items() if v is not None)
                state.usage = anthropic_usage_from(state.raw_usage)
        elif kind == "error":
            state.failure = ("stream_error", "upstream_error_event")
        elif kind == "message_stop":  # an event without its `event:` line
            state.complete = True
        return raw

    def tool_calls(self, parsed: dict[str, Any]) -> ToolCalls:
        found = ToolCalls()
        content = parsed.get("content")
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "tool_use":
                found.add(block.get("name"))
        return found

    def streamed_text(self, state: StreamState) -> str:
        return "".join(_delta_text(data) for data in state.pieces)

    def error_event(self, message: str, *, code: str) -> bytes:
        # The anthropic SDK raises on an `error` event; `code` is the gateway's own detail.
        body = {"type": "error", "error": {"type": "api_error", "message": message, "code": code}}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


OPENAI = OpenAIDialect()
ANTHROPIC = AnthropicDialect()
