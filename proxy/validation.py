"""Request bodies of the proxy endpoints, checked by hand.

The body is forwarded as the client sent it (only `model`, and `stream_options` for OpenAI
streams, are rewritten), so fields this gateway does not know about still reach the upstream.
A ninja schema would drop or reshape them, which is why these checks exist instead, and why
the OpenAPI document describes the body separately (`json_body_doc`). Only what the gateway
itself relies on is checked; the upstream checks the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest

from common.errors import ApiError, invalid_body

# (message, code, param) -> the error to raise, in the envelope of the endpoint's own API.
Invalid = Callable[[str, str, str | None], ApiError]

_MODEL = {"model": {"type": "string", "description": "A route name."}}
_MESSAGES = {"messages": {"type": "array", "minItems": 1, "items": {"type": "object"}}}


def json_body_doc(
    *, required: list[str], properties: dict[str, Any], conversation: bool = True
) -> dict[str, Any]:
    """The OpenAPI `requestBody` of a JSON object with `model` (and `messages`, for a
    conversation)."""
    base = {**_MODEL, **_MESSAGES} if conversation else dict(_MODEL)
    schema = {
        "type": "object",
        "required": [*base, *required],
        "additionalProperties": True,
        "properties": {**base, **properties},
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def body_load(request: HttpRequest, *, invalid: Invalid) -> dict[str, Any]:
    try:
        raw = request.body
    except RequestDataTooBig:
        raw = None
    if raw is None or len(raw) > settings.LLMROTATE_MAX_REQUEST_BYTES:
        raise body_too_large()
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:
        raise invalid_body(
            f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", "invalid_type", None)
    limit = settings.LLMROTATE_MAX_JSON_DEPTH
    # Counting brackets is fast and usually settles it: fewer of them than the limit cannot
    # nest deeper. (Brackets inside strings only make the count err on the safe side.)
    if raw.count(b"{") + raw.count(b"[") > limit and _depth_exceeds(body, limit):
        raise _too_deep()
    return body


def body_too_large() -> ApiError:
    return ApiError(
        413,
        f"Request body is larger than {settings.LLMROTATE_MAX_REQUEST_BYTES} bytes.",
        type="invalid_request_error",
        code="request_too_large",
    )


def _too_deep() -> ApiError:
    return invalid_body(
        f"The request body nests arrays and objects more than"
        f" {settings.LLMROTATE_MAX_JSON_DEPTH} levels deep.",
        code="too_deep",
    )


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether `value` nests arrays and objects more than `limit` deep (the top one is 1).
    Iterative: recursion is what a deep body is built to break."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object] = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        containers = [c for c in children if isinstance(c, dict | list)]
        if containers:
            if depth >= limit:
                return True
            stack.extend((c, depth + 1) for c in containers)
    return False


def _code(value: object) -> str:
    return "missing_required_parameter" if value is None else "invalid_type"


def body_check_model(body: dict[str, Any], *, invalid: Invalid) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a non-empty string.", _code(model), "model")


def body_check_conversation(
    body: dict[str, Any], *, invalid: Invalid, item: str = "messages[{}]"
) -> None:
    """`model` a non-empty string, `messages` a non-empty array of objects with a string role,
    `stream` (when present) a boolean: what both wire formats share. `item` names a message
    the way the endpoint's own API does (`messages[0]`, Anthropic's `messages.0`)."""
    body_check_model(body, invalid=invalid)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid(
            "'messages' is required and must be a non-empty array.", _code(messages), "messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            where = item.format(i)
            raise invalid(f"{where} must be an object with a string 'role'.", "invalid_type", where)
    if not isinstance(body.get("stream", False), bool):
        raise invalid("'stream' must be a boolean.", "invalid_type", "stream")
