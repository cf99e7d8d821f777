"""The rest of OpenAI's API the gateway serves besides chat completions: embeddings, legacy text
completions and the Responses API. Each is a dialect of the shared engine (proxy.dialects), so
rotation, health, breakers, failover, limits, recording and cost are the chat path's own; what
is here is only where each puts its usage, its text and its stream events, and the checks of
its body.

Only OpenAI-format upstreams serve them (Anthropic has none of the three), and none is
translated to Anthropic's API: a route whose deployments are all Anthropic answers 400
`dialect_not_supported` for them.

The Responses API keeps state at the provider (`previous_response_id`, stored responses,
`background` runs polled later, conversations). A later call must reach the provider and key
that created the state, which rotation and failover cannot promise, so the gateway refuses
those fields with a 400 naming them (docs/api.md says so), rather than have them fail at
random on another key.
"""

from __future__ import annotations

from typing import Any

from common.errors import ApiError
from proxy.dialects import (
    Dialect,
    OpenAIDialect,
    StreamState,
    ToolCalls,
    Usage,
    event_type,
    json_object,
    sse_data,
    token_seen,
    usage_from,
)
from proxy.validation import body_check_model


def bad_request(message: str, code: str, param: str | None) -> ApiError:
    """A body error on the OpenAI endpoints: 400, as OpenAI answers it."""
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


class _OpenAIOnly(OpenAIDialect):
    unserved = (
        "only OpenAI-format deployments (openai, openai_compatible) serve it, and this route "
        "has only Anthropic ones."
    )

    def serves(self, kind: str) -> bool:
        return kind != "anthropic"

    def forwarded(self, body: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
        # The client's body with the deployment's model: embeddings do not stream, and the
        # Responses API always reports usage (it has no stream_options).
        return Dialect.forwarded(self, body, model=model, stream=stream)


class EmbeddingsDialect(_OpenAIOnly):
    path = "/embeddings"
    operation = "embeddings"


class CompletionsDialect(_OpenAIOnly):
    """Legacy `POST /v1/completions`: chat's wire, with `text` where chat has `delta`."""

    path = "/completions"
    operation = "text_completion"
    # Chat's: a stream asks for usage (stream_options), the relay strips it if not asked for.
    forwarded = OpenAIDialect.forwarded

    def completion_text(self, parsed: dict[str, Any]) -> str:
        choices = parsed.get("choices")
        return "".join(
            choice["text"]
            for choice in (choices if isinstance(choices, list) else ())
            if isinstance(choice, dict) and isinstance(choice.get("text"), str)
        )

    def choice_event(self, state: StreamState, choice: dict[str, Any]) -> None:
        text = choice.get("text")
        if text:
            token_seen(state, text)


# Stream events of the Responses API that carry generated output (TTFT starts at the first).
_OUTPUT_DELTAS = frozenset(
    {
        b"response.output_text.delta",
        b"response.function_call_arguments.delta",
        b"response.refusal.delta",
        b"response.reasoning_text.delta",
        b"response.reasoning_summary_text.delta",
    }
)
# The events that end a response, whole or not; each carries the response with its usage.
_ENDINGS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


def responses_usage(obj: Any) -> Usage | None:
    """The Responses API's usage (input/output tokens), in the gateway's terms."""
    if not isinstance(obj, dict):
        return None
    inputs = obj.get("input_tokens_details")
    outputs = obj.get("output_tokens_details")
    return usage_from(
        {
            "prompt_tokens": obj.get("input_tokens"),
            "completion_tokens": obj.get("output_tokens"),
            "total_tokens": obj.get("total_tokens"),
            "prompt_tokens_details": inputs,
            "completion_tokens_details": outputs,
        }
    )


def _output_items(parsed: dict[str, Any]) -> list[dict[str, Any]]:
    output = parsed.get("output")
    return [item for item in output if isinstance(item, dict)] if isinstance(output, list) else []


class ResponsesDialect(_OpenAIOnly):
    path = "/responses"
    operation = "responses"

    def usage(self, parsed: dict[str, Any]) -> Usage | None:
        return responses_usage(parsed.get("usage"))

    def completion_text(self, parsed: dict[str, Any]) -> str:
        texts = []
        for item in _output_items(parsed):
            content = item.get("content")
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        return "".join(texts)

    def tool_calls(self, parsed: dict[str, Any]) -> ToolCalls:
        found = ToolCalls()
        for item in _output_items(parsed):
            if item.get("type") == "function_call":
                found.add(item.get("name"))
        return found

    def event(self, state: StreamState, raw: bytes) -> bytes | None:
        name, data = sse_data(raw)
        if not data:
            return raw
        if not name:
            name = event_type(data)
        if name in _OUTPUT_DELTAS:
            # The bulk of a stream: only text deltas are parsed (kept for an estimate).
            chunk = json_object(data) if name == b"response.output_text.delta" else None
            token_seen(state, chunk.get("delta") if chunk else None)
            return raw
        if name == b"response.output_item.added" and b"function_call" in data:
            chunk = json_object(data)
            item = chunk.get("item") if chunk else None
            if isinstance(item, dict) and item.get("type") == "function_call":
                state.tools.add(item.get("name"))
            return raw
        if name in _ENDINGS:
            chunk = json_object(data)
            response = chunk.get("response") if chunk else None
            if isinstance(response, dict):
                state.usage = responses_usage(response.get("usage")) or state.usage
            if name == b"response.failed":
                state.failure = ("stream_error", "upstream_error_event")
            state.complete = True
        elif name == b"error":
            state.failure = ("stream_error", "upstream_error_event")
        return raw


EMBEDDINGS = EmbeddingsDialect()
COMPLETIONS = CompletionsDialect()
RESPONSES = ResponsesDialect()


# --- bodies


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _text_or_tokens(value: Any) -> bool:
    """A string, a list of strings, a list of token ids or a list of such lists: what both
    `input` (embeddings) and `prompt` (completions) accept."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    return (
        all(isinstance(v, str) for v in value)
        or _is_tokens(value)
        or all(_is_tokens(v) and v for v in value)
    )


def _text_or_tokens_field(body: dict[str, Any], name: str) -> None:
    """`model`, and `name` holding text or token ids (embeddings' input, completions' prompt)."""
    body_check_model(body, invalid=bad_request)
    value = body.get(name)
    if value is None:
        raise bad_request(f"'{name}' is required.", "missing_required_parameter", name)
    if not _text_or_tokens(value):
        raise bad_request(
            f"'{name}' must be a string, an array of strings, an array of token ids or an array "
            "of such arrays (none of them empty).",
            "invalid_type",
            name,
        )


def stream_flag_check(body: dict[str, Any]) -> None:
    if not isinstance(body.get("stream", False), bool):
        raise bad_request("'stream' must be a boolean.", "invalid_type", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "invalid_type", "stream_options")


def embeddings_validate(body: dict[str, Any]) -> dict[str, Any]:
    _text_or_tokens_field(body, "input")
    if "stream" in body:
        raise bad_request(
            "Embeddings are not streamed: remove 'stream'.", "invalid_value", "stream"
        )
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise bad_request(
            "'encoding_format' must be 'float' or 'base64'.", "invalid_value", "encoding_format"
        )
    return body


def completions_validate(body: dict[str, Any]) -> dict[str, Any]:
    _text_or_tokens_field(body, "prompt")
    stream_flag_check(body)
    return body


# Fields of a Responses request that point at state kept by the provider (module docstring).
STATEFUL_FIELDS = ("previous_response_id", "conversation", "background")


def responses_validate(body: dict[str, Any]) -> dict[str, Any]:
    body_check_model(body, invalid=bad_request)
    value = body.get("input")
    if value is None:
        raise bad_request("'input' is required.", "missing_required_parameter", "input")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise bad_request(
            "'input' must be a string or a non-empty array of input items.", "invalid_type", "input"
        )
    if isinstance(value, list) and not all(isinstance(item, dict) for item in value):
        raise bad_request("'input' items must be objects.", "invalid_type", "input")
    for name in STATEFUL_FIELDS:
        if body.get(name):
            raise bad_request(
                f"'{name}' is not supported through this gateway: it refers to state the "
                "provider keeps for one key, and the gateway may send the call with another. "
                "Send the conversation in 'input' instead.",
                "stateful_response_not_supported",
                name,
            )
    stream_flag_check(body)
    return body
