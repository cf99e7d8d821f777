"""The proxy endpoints: OpenAI's `POST /v1/chat/completions`, Anthropic's `POST /v1/messages`,
and `GET /v1/models` in whichever of the two shapes the caller speaks.

Bodies are forwarded as the client sent them and checked by hand (proxy/validation.py says
why).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from ninja import Router

from common.errors import ApiError, anthropic_caller, forbidden, invalid_request
from common.logcontext import request_id_bind
from keys.auth import proxy_any_auth, proxy_auth
from keys.limits import LimitSpec
from keys.routing import RouteInfo, TokenInfo, routing_snapshot
from proxy.anthropic import (
    ANTHROPIC_COUNT_TOKENS,
    COUNT_TOKENS_BODY_DOC,
    MESSAGES_BODY_DOC,
    anthropic_invalid,
    forward_headers,
    messages_validate,
    models_page,
)
from proxy.callers import caller_from
from proxy.calls import CallContext, now_wall
from proxy.dialects import ANTHROPIC, Dialect
from proxy.engine import Failover
from proxy.limits import applicable
from proxy.validation import body_check_conversation, body_load, json_body_doc

router = Router(tags=["Proxy (OpenAI and Anthropic wire formats)"])


CHAT_BODY_DOC = json_body_doc(
    required=[], properties={"stream": {"type": "boolean"}, "stream_options": {"type": "object"}}
)


def _invalid(message: str, code: str, param: str | None) -> ApiError:
    return invalid_request(message, code=code, param=param)


def _parse_body(request: HttpRequest) -> dict[str, Any]:
    body = body_load(request, invalid=_invalid)
    body_check_conversation(body, invalid=_invalid)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_request(
            "'stream_options' must be an object.", code="invalid_type", param="stream_options"
        )
    return body


@router.post(
    "/chat/completions",
    auth=proxy_auth,
    openapi_extra=CHAT_BODY_DOC,
    summary="Create a chat completion (OpenAI wire format, streaming or not)",
)
async def chat_completions(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    t0 = time.perf_counter()
    started = now_wall()
    client: TokenInfo = request.auth  # type: ignore[attr-defined]
    body = _parse_body(request)
    request.llmrotate_model = body["model"]  # type: ignore[attr-defined]
    route, specs = await _route(body["model"], client)
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    ctx = CallContext(
        request_id=uuid.uuid4().hex,
        client=client,
        route=route,
        body=body,
        stream=stream,
        strip_usage=stream and not options.get("include_usage", False),
        started_wall=started,
        t0=t0,
        caller=caller_from(request.headers, body),
        body_bytes=len(request.body),
        limit_specs=specs,
    )
    request.llmrotate_recorded = True  # type: ignore[attr-defined]  # the engine records it
    # Not reset: a stream is relayed after the view returns, in this request's own task
    # (whose context ends with it), and its log lines carry the id too.
    request_id_bind(ctx.request_id)
    ctx.trace(request.headers)
    return await Failover(ctx).run()


async def _route(model: str, client: TokenInfo) -> tuple[RouteInfo, list[LimitSpec]]:
    """The route for `model`, if the client may use it, and the limits that apply."""
    snapshot = await routing_snapshot()
    route = snapshot.routes.get(model)
    if route is None:
        raise ApiError(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    if not client.allows_route(route.name):
        raise forbidden(
            f"This client token may not use the model '{route.name}'.", code="route_not_allowed"
        )
    return route, applicable(snapshot, client.name, route.name)


@router.post(
    "/messages",
    auth=proxy_any_auth,
    openapi_extra=MESSAGES_BODY_DOC,
    summary="Create a message (Anthropic Messages wire format, streaming or not)",
)
async def messages(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    return await _anthropic_call(request, ANTHROPIC)


@router.post(
    "/messages/count_tokens",
    auth=proxy_any_auth,
    openapi_extra=COUNT_TOKENS_BODY_DOC,
    summary="Count a message's input tokens (Anthropic; passed through, not recorded)",
)
async def count_tokens(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    return await _anthropic_call(request, ANTHROPIC_COUNT_TOKENS)


async def _anthropic_call(
    request: HttpRequest, dialect: Dialect
) -> HttpResponse | StreamingHttpResponse:
    t0 = time.perf_counter()
    started = now_wall()
    client: TokenInfo = request.auth  # type: ignore[attr-defined]
    counting = dialect is ANTHROPIC_COUNT_TOKENS
    body = messages_validate(body_load(request, invalid=anthropic_invalid), count_tokens=counting)
    request.llmrotate_model = body["model"]  # type: ignore[attr-defined]
    route, specs = await _route(body["model"], client)
    if not ANTHROPIC.deployments(route):
        raise ApiError(
            400,
            f"The model '{route.name}' has no deployment on an Anthropic provider, and only"
            " those speak the Messages API; use /v1/chat/completions for it.",
            type="invalid_request_error",
            code="dialect_not_supported",
            param="model",
        )
    stream = not counting and bool(body.get("stream", False))
    ctx = CallContext(
        request_id=uuid.uuid4().hex,
        client=client,
        route=route,
        body=body,
        stream=stream,
        strip_usage=False,  # Anthropic always reports usage, in events of their own
        started_wall=started,
        t0=t0,
        dialect=dialect,
        forward_headers=forward_headers(request.headers),
        caller=caller_from(request.headers, body),
        body_bytes=len(request.body),
        limit_specs=specs,
    )
    request.llmrotate_recorded = True  # type: ignore[attr-defined]  # the engine records it
    request_id_bind(ctx.request_id)  # not reset, as in chat_completions
    ctx.trace(request.headers, operation="count_tokens" if counting else "chat")
    return await Failover(ctx).run()


@router.get(
    "/models",
    auth=proxy_any_auth,
    summary="List the models (routes) this token may use, in OpenAI's or Anthropic's shape",
)
async def list_models(request: HttpRequest) -> JsonResponse:
    client: TokenInfo = request.auth  # type: ignore[attr-defined]
    snapshot = await routing_snapshot()
    routes = [r for r in snapshot.routes.values() if client.allows_route(r.name)]
    if anthropic_caller(request.path, request.headers):
        # Only what /v1/messages can answer: routes with a deployment on an Anthropic provider.
        served = (r for r in routes if ANTHROPIC.deployments(r))
        return JsonResponse(models_page(((r.name, r.created) for r in served), request.GET))
    data = [
        {"id": route.name, "object": "model", "created": route.created, "owned_by": "llmrotate"}
        for route in routes
    ]
    return JsonResponse({"object": "list", "data": data})
