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

from common.errors import invalid_body
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
RequestTranslation = Callable[..., dict[str, Any]]
# What a payload of the wrong shape makes the translators raise (a string where a list of
# blocks belongs, a number for a message): the translators read JSON as its API documents it,
# and the guards below turn a payload that is not so into the right error instead of a 500.
SHAPE_ERRORS = (AttributeError, TypeError, KeyError, IndexError, ValueError, RecursionError)


def translated_request(
    translation: RequestTranslation, body: dict[str, Any], *, model: str, stream: bool
) -> dict[str, Any]:
    try:
        return translation(body, model=model, stream=stream)
    except SHAPE_ERRORS:
        raise invalid_body(
            "The request has a field of the wrong type (a message, a content part or a tool is"
            " not shaped as the API documents it), so it cannot be translated for this route.",
            code="invalid_type",
        ) from None


def translated_answer(
    parsed: dict[str, Any] | None,
    content: bytes,
    status: int,
    *,
    answer: Translation,
    error: ErrorTranslation,
) -> bytes | None:
    """A whole answer in the client's API (a JSON that is not an object is already the
    client's own error, proxy.engine); None for one shaped unlike the upstream's API: a bad
    response, as unreadable JSON is."""
    if parsed is None:
        return content
    try:
        return encode_body(answer(parsed) if status == 200 else error(status, parsed))
    except SHAPE_ERRORS:
        return None


UNTRANSLATABLE_EVENT = ("stream_error", "untranslatable_event")


def translated_event(
    state: StreamState, translate_event: Callable[[], bytes], error_event: Callable[..., bytes]
) -> bytes | None:
    """One translated stream event. One shaped unlike the upstream's API ends the stream for
    the client with its API's error event (the SDKs raise on it), as a broken stream does;
    nothing after it is sent."""
    if state.failure == UNTRANSLATABLE_EVENT:
        return None
    try:
        return translate_event() or None
    except SHAPE_ERRORS:
        state.failure = UNTRANSLATABLE_EVENT
        return error_event(
            "The upstream sent a stream event the gateway cannot translate.",
            code="untranslatable_event",
        )


class ChatViaMessages(AnthropicDialect):
    """An OpenAI chat completion sent to Anthropic's Messages API."""

    def forwarded(self, body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
        return translated_request(
            translate.chat_request_to_messages, body, model=model, stream=stream
        )

    def answer(self, content: bytes, parsed: dict[str, Any] | None, status: int) -> bytes | None:
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
        translator = state.translator
        if kind == "message_stop":
            return translated_event(
                state, lambda: translator.event(kind, chunk) + translator.end(), self.error_event
            )
        return translated_event(state, lambda: translator.event(kind, chunk), self.error_event)

    def error_event(self, message: str, *, code: str) -> bytes:
        return OPENAI.error_event(message, code=code)


class MessagesViaChat(OpenAIDialect):
    """An Anthropic Messages call sent to an OpenAI-format chat completions endpoint."""

    def forwarded(self, body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
        return translated_request(
            translate.messages_request_to_chat, body, model=model, stream=stream
        )

    def headers(
        self, kind: str, secret: str, *, stream: bool, forward: dict[str, str]
    ) -> dict[str, str]:
        # The client's anthropic-version / anthropic-beta mean nothing to this upstream.
        return super().headers(kind, secret, stream=stream, forward={})

    def answer(self, content: bytes, parsed: dict[str, Any] | None, status: int) -> bytes | None:
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
        translator = state.translator
        if data == b"[DONE]":
            return translated_event(state, translator.done, self.error_event)
        chunk = json_object(data) if data else None
        if chunk is None:
            return None
        return translated_event(state, lambda: translator.chunk(chunk), self.error_event)

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
