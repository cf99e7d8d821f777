"""What the Anthropic endpoints need beyond the shared proxy: request validation, the headers
passed upstream, the model list in Anthropic's shape, and token counting's dialect.

Validation answers 400, as Anthropic does (and the OpenAI endpoints, as OpenAI does): the
anthropic SDK raises `BadRequestError` for it, as code written against the real API expects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from common.errors import ApiError
from keys.health import Outcome as Health
from keys.ratelimits import Headroom
from proxy.classify import Verdict
from proxy.dialects import AnthropicDialect, Usage
from proxy.validation import body_check_conversation, json_body_doc

# Anthropic's default page size for GET /v1/models, and its maximum.
MODELS_PAGE_DEFAULT = 20
MODELS_PAGE_MAX = 1000
# Client headers that say how the request is to be read: passed upstream as they are.
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
_MAX_HEADER = 1024

MESSAGES_BODY_DOC = json_body_doc(
    required=["max_tokens"],
    properties={
        "max_tokens": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"},
        "system": {"oneOf": [{"type": "string"}, {"type": "array"}]},
    },
)
COUNT_TOKENS_BODY_DOC = json_body_doc(required=[], properties={})


def _bad(message: str, *, code: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


def anthropic_invalid(message: str, code: str, param: str | None) -> ApiError:
    return _bad(message, code=code, param=param)


def messages_validate(body: dict[str, Any], *, count_tokens: bool = False) -> dict[str, Any]:
    """Check what the gateway itself relies on; the upstream checks the rest. Counting
    tokens needs no `max_tokens` and never streams."""
    body_check_conversation(body, invalid=anthropic_invalid, item="messages.{}")
    if count_tokens:
        return body
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad(
            "max_tokens: a positive integer is required.",
            code="missing_required_parameter" if max_tokens is None else "invalid_type",
            param="max_tokens",
        )
    return body


def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers that go upstream as they are; checked here, before any key is
    taken, because a value HTTP cannot carry would only fail when sent."""
    forwarded = {}
    for name in FORWARDED_HEADERS:
        value = headers.get(name)
        if not value:
            continue
        if not value.isascii() or not value.isprintable() or len(value) > _MAX_HEADER:
            raise _bad(
                f"{name}: the header must be printable ASCII of at most {_MAX_HEADER} characters.",
                code="invalid_header",
                param=name,
            )
        forwarded[name] = value
    return forwarded


def _created_at(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def models_page(routes: Iterable[tuple[str, int]], query: Mapping[str, str]) -> dict[str, Any]:
    """Anthropic's `GET /v1/models` page over (route name, created) pairs, in their order.

    Paged like Anthropic's (limit, after_id, before_id), so the SDK's auto-pagination works
    however many routes there are.
    """
    names = list(routes)
    try:
        limit = int(query.get("limit") or MODELS_PAGE_DEFAULT)
    except ValueError:
        raise _bad("limit: must be an integer.", code="invalid_type", param="limit") from None
    if not 1 <= limit <= MODELS_PAGE_MAX:
        raise _bad(
            f"limit: must be between 1 and {MODELS_PAGE_MAX}.", code="invalid_value", param="limit"
        )
    ids = [name for name, _ in names]
    after, before = query.get("after_id"), query.get("before_id")
    cursor = before or after
    if cursor and cursor not in ids:
        # A route removed between two pages: end the listing rather than start it over.
        window, more = [], False
    elif before:
        end = ids.index(before)
        window, more = names[max(0, end - limit) : end], end - limit > 0
    else:
        start = ids.index(after) + 1 if after else 0
        window, more = names[start : start + limit], start + limit < len(names)
    data = [
        {"type": "model", "id": name, "display_name": name, "created_at": _created_at(created)}
        for name, created in window
    ]
    return {
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


class AnthropicCountDialect(AnthropicDialect):
    """`POST /v1/messages/count_tokens`: passed through with the same key choice and failover,
    but not a model call. Nothing is generated or billed, so no CallRecord is written (it
    would skew call counts and latencies). Token counting has rate limits of its own at
    Anthropic, so neither its 429s nor its rate-limit headers say anything about the key's
    budget for messages: a 429 moves on to the next key and leaves the key as it was. Auth
    failures and 5xx count as on any call.
    """

    path = "/messages/count_tokens"
    records = False
    unserved = "only Anthropic deployments count tokens, and this route has none."

    def verdict(self, verdict: Verdict) -> Verdict:
        if verdict.health is Health.RATE_LIMITED:
            return replace(verdict, health=Health.CLIENT_ERROR)
        return verdict

    def headroom(self, headers: Any) -> Headroom | None:
        return None

    def usage(self, parsed: dict[str, Any]) -> Usage | None:
        return None

    def completion_text(self, parsed: dict[str, Any]) -> str:
        return ""


ANTHROPIC_COUNT_TOKENS = AnthropicCountDialect()
