"""Failover across dialects: the chat endpoints, and the bridges that let each be served by a
deployment that speaks the other API.

`/v1/chat/completions` (OpenAI's wire) is served by an Anthropic deployment through
Anthropic's native Messages API, not its OpenAI-compatible endpoint, so that what that layer
drops (prompt caching, extended thinking, exact usage) works; `/v1/messages` (Anthropic's wire)
is served by an OpenAI-format deployment through chat completions. A route may mix both kinds
in one fallback chain: each deployment is spoken to in its own API, and the client always gets
its own.

A bridge is the upstream's dialect for everything the engine learns from the answer (usage,
TTFT, tool calls, how the stream ended: what is recorded and settled), and translates (proxy
.translate) what goes up and what comes back: the body, a JSON answer or error, every stream
event, and the gateway's own mid-stream error event, which is the client's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy import translate
from proxy.dialects import (
    ANTHROPIC,
    OPENAI,
    AnthropicDialect,
    Dialect,
    OpenAIDialect,
    StreamState,
    encode_body,
    json_object,
    sse_data,
)

Translation = Callable[[dict[str, Any]], dict[str, Any]]
ErrorTranslation = Callable[[int, dict[str, Any] | None], dict[str, Any]]


def translated_answer(
    parsed: dict[str, Any] | None,
    content: bytes,
    status: int,
    *,
    answer: Translation,
    error: ErrorTranslation,
) -> bytes:
    """A whole answer in the client's API: the upstream's (a JSON that is not an object is
    already the client's own error, proxy.engine)."""
    if parsed is None:
        return content
    return encode_body(answer(parsed) if status == 200 else error(status, parsed))


class ChatViaMessages(AnthropicDialect):
    """An OpenAI chat completion sent to Anthropic's Messages API."""

    anthropic = False  # the client's errors: OpenAI's envelope

    def forwarded(self, body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
        return translate.chat_request_to_messages(body, model=model, stream=stream)

    def answer(self, content: bytes, parsed: dict[str, Any] | None, status: int) -> bytes:
        return translated_answer(
            parsed,
            content,
            status,
            answer=translate.messages_response_to_chat,
            error=translate.anthropic_error_to_openai,
        )

    def stream_translator(self, *, model: str, include_usage: bool, request_id: str) -> Any:
        return translate.MessagesStreamToChat(
            model=model, include_usage=include_usage, request_id=request_id
        )

    def event(self, state: StreamState, raw: bytes) -> bytes | None:
        super().event(state, raw)  # what is recorded: usage, TTFT, tools, the stream's end
        name, data = sse_data(raw)
        chunk = json_object(data) if data else None
        if chunk is None:
            return None  # nothing an OpenAI client could read (a comment, a bare keep-alive)
        kind = name.decode() if name else str(chunk.get("type", ""))
        out = state.translator.event(kind, chunk)
        if kind == "message_stop":
            out += state.translator.end()
        return out or None

    def error_event(self, message: str, *, code: str) -> bytes:
        return OPENAI.error_event(message, code=code)


class MessagesViaChat(OpenAIDialect):
    """An Anthropic Messages call sent to an OpenAI-format chat completions endpoint."""

    anthropic = True  # the client's errors: Anthropic's envelope

    def forwarded(self, body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
        return translate.messages_request_to_chat(body, model=model, stream=stream)

    def headers(
        self, kind: str, secret: str, *, stream: bool, forward: dict[str, str]
    ) -> dict[str, str]:
        # The client's anthropic-version / anthropic-beta mean nothing to this upstream.
        return super().headers(kind, secret, stream=stream, forward={})

    def answer(self, content: bytes, parsed: dict[str, Any] | None, status: int) -> bytes:
        return translated_answer(
            parsed,
            content,
            status,
            answer=translate.chat_response_to_messages,
            error=translate.openai_error_to_anthropic,
        )

    def stream_translator(self, *, model: str, include_usage: bool, request_id: str) -> Any:
        return translate.ChatStreamToMessages(model=model, request_id=request_id)

    def event(self, state: StreamState, raw: bytes) -> bytes | None:
        super().event(state, raw)
        _, data = sse_data(raw)
        if data == b"[DONE]":
            return state.translator.done() or None
        chunk = json_object(data) if data else None
        if chunk is None:
            return None
        return state.translator.chunk(chunk) or None

    def error_event(self, message: str, *, code: str) -> bytes:
        return ANTHROPIC.error_event(message, code=code)


class MessagesViaCompatible(MessagesViaChat):
    """The same, to an OpenAI-compatible server (vLLM, Ollama, …): those read the output limit
    as `max_tokens`, which OpenAI itself has replaced with `max_completion_tokens`."""

    def forwarded(self, body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
        out = super().forwarded(body, model=model, stream=stream)
        if "max_completion_tokens" in out:
            out["max_tokens"] = out.pop("max_completion_tokens")
        return out


CHAT_VIA_MESSAGES = ChatViaMessages()
MESSAGES_VIA_CHAT = MessagesViaChat()
MESSAGES_VIA_COMPATIBLE = MessagesViaCompatible()


class ChatEndpoint(OpenAIDialect):
    """`POST /v1/chat/completions`: natively on OpenAI-format deployments, through the Messages
    API on Anthropic's."""

    def wire(self, kind: str) -> Dialect | None:
        return CHAT_VIA_MESSAGES if kind == "anthropic" else self


class MessagesEndpoint(AnthropicDialect):
    """`POST /v1/messages`: natively on Anthropic deployments, through chat completions on the
    others."""

    def wire(self, kind: str) -> Dialect | None:
        if kind == "anthropic":
            return self
        return MESSAGES_VIA_CHAT if kind == "openai" else MESSAGES_VIA_COMPATIBLE


CHAT = ChatEndpoint()
MESSAGES = MessagesEndpoint()
