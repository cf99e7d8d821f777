"""The one NinjaAPI: each app mounts its router here; every error body is OpenAI-shaped."""

from __future__ import annotations

import logging

from django.core.exceptions import DisallowedHost
from django.http import Http404, HttpRequest, HttpResponse
from django.views import defaults
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from common.errors import ApiError, anthropic_caller, missing_token
from common.redaction import redact
from healthchecks.api import router as healthchecks_router
from keys.api import router as keys_router
from keys.routing import RoutingUnavailable, TokenInfo
from llmrotate_site.metrics import router as metrics_router
from proxy.api import router as proxy_router
from proxy.calls import refusal_record
from usage.api import router as usage_router
from usage.lip_api import router as lip_usage_router
from usage.replacement_api import lip_router as lip_replacement_router
from usage.replacement_api import router as replacement_router

logger = logging.getLogger("llmrotate.api")

api = NinjaAPI(
    title="llmrotate",
    version="1",
    description="OpenAI-compatible gateway with key rotation, failover and usage monitoring.",
    urls_namespace="api",
    docs_url="/api/docs",
    openapi_url="/api/openapi.json",
)


@api.exception_handler(ApiError)
def _proxy_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return _render(request, exc)


def _render(request: HttpRequest, exc: ApiError) -> HttpResponse:
    if request.method == "POST" and not getattr(request, "llmrotate_recorded", False):
        # Refused before the engine (which records the rest): auth, scope, route, body.
        auth = getattr(request, "auth", None)
        refusal_record(
            path=request.path,
            status=exc.status,
            code=exc.code,
            client=auth.name if isinstance(auth, TokenInfo) else "",
            model=getattr(request, "llmrotate_model", ""),
        )
    # Every error of a request from an Anthropic client, whichever layer raised it, in the
    # envelope the anthropic SDK reads.
    return exc.response(anthropic=anthropic_caller(request.path, request.headers))


def routing_unavailable(exc: RoutingUnavailable) -> ApiError:
    return ApiError(
        503,
        "The gateway cannot read its configuration right now (database unavailable).",
        type="service_unavailable",
        code="config_unavailable",
        retry_after=exc.retry_after,
    )


@api.exception_handler(RoutingUnavailable)
def _routing_unavailable(request: HttpRequest, exc: RoutingUnavailable) -> HttpResponse:
    return _render(request, routing_unavailable(exc))


@api.exception_handler(AuthenticationError)
def _auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return _render(
        request, missing_token(anthropic=anthropic_caller(request.path, request.headers))
    )


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    first = exc.errors[0] if exc.errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
    message = first.get("msg", "Invalid request.")
    error = ApiError(
        422,
        f"{where}: {message}" if where else message,
        type="invalid_request_error",
        code="invalid_parameter",
        param=where or None,
    )
    return _render(request, error)


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return _render(
        request,
        ApiError(
            exc.status_code, str(exc), type="invalid_request_error", code=f"http_{exc.status_code}"
        ),
    )


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return _render(request, _not_found_error("Not found."))


def _not_found_error(message: str) -> ApiError:
    return ApiError(
        404, message, type="invalid_request_error", code="not_found"
    ).with_anthropic_type("not_found_error")


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    # The log line goes through the redacting filter; the client gets no internals.
    logger.exception("unhandled error on %s %s", request.method, request.path)
    return _render(
        request,
        ApiError(
            500,
            "Internal gateway error; see the gateway log.",
            type="server_error",
            code="internal_error",
        ),
    )


# Before the proxy's /v1/: LLM Interactive Proxy's monitoring paths live under it.
api.add_router("/v1/usage/", lip_usage_router)
api.add_router("/v1/replacement/", lip_replacement_router)
api.add_router("/v1/", proxy_router)
api.add_router("/api/health/", healthchecks_router)
api.add_router("/api/", keys_router)
api.add_router("/api/", usage_router)
api.add_router("/api/replacement/", replacement_router)
api.add_router("", metrics_router)


# Django's own 404 and 400 (urls.py's handler404 and handler400): an unknown path, or a request
# refused before any view (a Host outside ALLOWED_HOSTS). On the API's paths an SDK reads the
# answer, so it is JSON in the caller's envelope, as every other error there; elsewhere (the
# dashboard, the admin) it is Django's page.
API_PREFIXES = ("/v1/", "/api/", "/metrics")


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not request.path.startswith(API_PREFIXES):
        return defaults.page_not_found(request, exception)
    # Worded as OpenAI words it. The path is the caller's own: masked, then cut (cut first, a
    # secret across the cut would be left too short to be recognised, and shown in part).
    path = redact(request.path)[:200]
    error = _not_found_error(f"Invalid URL ({request.method} {path})")
    return error.response(anthropic=anthropic_caller(request.path, request.headers))


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not request.path.startswith(API_PREFIXES):
        return defaults.bad_request(request, exception)
    if isinstance(exception, DisallowedHost):
        error = ApiError(
            400,
            "The Host header names a host this gateway does not serve.",
            type="invalid_request_error",
            code="invalid_host",
        )
    else:
        error = ApiError(400, "Bad request.", type="invalid_request_error", code="bad_request")
    return error.response(anthropic=anthropic_caller(request.path, request.headers))
