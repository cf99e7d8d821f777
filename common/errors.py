"""The gateway's API errors, OpenAI-shaped so that SDKs raise the right class: raised by any
layer (the proxy, authentication, the monitoring API), rendered by llmrotate_site.api (and,
before Django, by llmrotate_site.asgi), and described as an OpenAPI schema (ErrorOut).

On the Anthropic endpoints the same body also carries Anthropic's top-level `"type": "error"`:
`{"type": "error", "error": {"type", "message", "code", "param"}}` reads right to both SDKs.

Status codes (docs/errors.md lists every code with an example):
400 invalid JSON or a foreign Host · 401 missing/invalid/revoked/expired token ·
403 scope or route not allowed · 404 unknown model or path · 413 body too large ·
422 missing or mistyped fields ·
429 a limit reached, or too many rejected tokens from the caller's address ·
502 upstream failed after failover · 503 no key available (with Retry-After) · 504 upstream timeout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from django.http import HttpResponse
from ninja import Field, Schema


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.headers: dict[str, str] = {}
        # The error's type in Anthropic's envelope, where its names differ from OpenAI's (a
        # 429 is "rate_limit_error" there, "requests" or "tokens" at OpenAI).
        self.anthropic_type = type

    def with_headers(self, headers: dict[str, str]) -> ApiError:
        self.headers.update(headers)
        return self

    def with_anthropic_type(self, type: str) -> ApiError:
        self.anthropic_type = type
        return self

    def body(self, *, anthropic: bool = False) -> dict[str, object]:
        error = {
            "message": self.message,
            "type": self.anthropic_type if anthropic else self.type,
            "code": self.code,
            "param": self.param,
        }
        if anthropic:
            # Anthropic's envelope adds a top-level type; OpenAI clients read `error` alike.
            return {"type": "error", "error": error}
        return {"error": error}

    def response(self, *, anthropic: bool = False) -> HttpResponse:
        response = HttpResponse(
            json.dumps(self.body(anthropic=anthropic)),
            status=self.status,
            content_type="application/json",
        )
        for name, value in self.extra_headers().items():
            response[name] = value
        return response

    def extra_headers(self) -> dict[str, str]:
        """The headers the error's response carries besides its content type."""
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        headers.update(self.headers)
        return headers


def anthropic_caller(path: str, headers: Mapping[str, str]) -> bool:
    """Whether the gateway's own errors go in Anthropic's envelope: on an Anthropic-only
    endpoint, or for a caller that speaks Anthropic's API (the anthropic SDK always sends
    `anthropic-version`, and its key in `x-api-key`). Decided once, where errors are rendered
    (llmrotate_site.api), for every error of the request."""
    return (
        path.startswith("/v1/messages") or "anthropic-version" in headers or "x-api-key" in headers
    )


def invalid_body(message: str, *, code: str, param: str | None = None) -> ApiError:
    """A body the gateway cannot read or pass on (not JSON, too deep, not encodable): 400 on
    both endpoints, as an invalid JSON body is at OpenAI and Anthropic alike."""
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


def invalid_request(message: str, *, code: str, param: str | None = None) -> ApiError:
    return ApiError(422, message, type="invalid_request_error", code=code, param=param)


def unauthenticated(message: str, *, code: str = "invalid_api_key") -> ApiError:
    return ApiError(401, message, type="authentication_error", code=code)


def missing_token(*, anthropic: bool) -> ApiError:
    where = "'Authorization: Bearer <token>'"
    if anthropic:
        where = f"'x-api-key: <token>' or {where}"
    return unauthenticated(f"Missing client token: send {where}.", code="missing_api_key")


def forbidden(message: str, *, code: str) -> ApiError:
    return ApiError(403, message, type="permission_error", code=code)


# The envelope as an OpenAPI schema: what ApiError.body() builds. Operations list these in
# their `response=` so that the OpenAPI document says what a 401, 403, 404 or 422 holds.


class ErrorDetailOut(Schema):
    message: str = Field(description="What went wrong and, for a bad parameter, what is accepted.")
    type: str = Field(description="invalid_request_error, authentication_error, …")
    code: str = Field(description="A stable code: invalid_parameter, missing_api_key, …")
    param: str | None = Field(description="The parameter at fault, if one is.")


class ErrorOut(Schema):
    error: ErrorDetailOut


# What an operation behind monitor_auth may answer besides its own responses; and one that
# takes parameters, besides.
AUTH_ERRORS: dict[int, type[Schema]] = {401: ErrorOut, 403: ErrorOut}
QUERY_ERRORS: dict[int, type[Schema]] = {**AUTH_ERRORS, 422: ErrorOut}
