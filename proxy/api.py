"""The proxy endpoints: OpenAI's chat completions, embeddings, legacy completions and Responses
API, Anthropic's messages (and token counting), and the model list in whichever of the two
shapes the caller speaks. Every model call goes through the same engine (proxy.engine); what
differs per endpoint is its dialect (proxy.dialects, proxy.openai_apis, proxy.bridges).

Bodies are forwarded as the client sent them and checked by hand (proxy/validation.py says
why).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from ninja import Router

from common.errors import ApiError, anthropic_caller, forbidden
from common.logcontext import request_id_bind, request_id_new
from keys.auth import proxy_any_auth, proxy_auth
from keys.routing import RouteInfo, RoutingSnapshot, TokenInfo, route_lookup, routing_snapshot
from proxy.anthropic import (
    ANTHROPIC_COUNT_TOKENS,
    COUNT_TOKENS_BODY_DOC,
    MESSAGES_BODY_DOC,
    anthropic_invalid,
    forward_headers,
    messages_validate,
    models_page,
)
from proxy.bridges import CHAT, MESSAGES
from proxy.callers import caller_from
from proxy.calls import CallContext, now_wall
from proxy.capture import RequestCapture, capture_wanted
from proxy.dialects import Dialect
from proxy.engine import Failover
from proxy.limits import applicable
from proxy.models_list import model_ids, model_object
from proxy.openai_apis import (
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    bad_request,
    completions_validate,
    embeddings_validate,
    responses_validate,
    stream_flag_check,
)
from proxy.replacement import OPT_OUT_FIELD, replacement_assign
from proxy.validation import body_check_conversation, body_load, json_body_doc

router = Router(tags=["Proxy (OpenAI and Anthropic wire formats)"])


_STREAM = {"stream": {"type": "boolean"}, "stream_options": {"type": "object"}}
CHAT_BODY_DOC = json_body_doc(required=[], properties=_STREAM)
_TEXT_OR_TOKENS = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ]
}
EMBEDDINGS_BODY_DOC = json_body_doc(
    required=["input"],
    properties={
        "input": _TEXT_OR_TOKENS,
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "dimensions": {"type": "integer"},
    },
    conversation=False,
)
COMPLETIONS_BODY_DOC = json_body_doc(
    required=["prompt"], properties={"prompt": _TEXT_OR_TOKENS, **_STREAM}, conversation=False
)
RESPONSES_BODY_DOC = json_body_doc(
    required=["input"],
    properties={
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "instructions": {"type": "string"},
        "stream": {"type": "boolean"},
    },
    conversation=False,
)


def _parse_body(request: HttpRequest) -> dict[str, Any]:
    body = body_load(request, invalid=bad_request)
    body_check_conversation(body, invalid=bad_request)
    stream_flag_check(body)
    return body


@router.post(
    "/chat/completions",
    auth=proxy_auth,
    openapi_extra=CHAT_BODY_DOC,
    summary="Create a chat completion (OpenAI wire format, streaming or not)",
)
async def chat_completions(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    return await _openai_call(request, CHAT, _parse_body)


def _openai_endpoint(
    path: str,
    dialect: Dialect,
    validate: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    doc: dict[str, Any],
    summary: str,
) -> None:
    """Register one more OpenAI endpoint: its body checked by `validate` (400s, as OpenAI
    answers them), then the shared engine with its dialect."""

    async def view(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
        return await _openai_call(request, dialect, lambda r: validate(_load(r)))

    view.__name__ = dialect.operation  # the OpenAPI operation id
    router.post(path, auth=proxy_auth, openapi_extra=doc, summary=summary)(view)


_openai_endpoint(
    "/embeddings",
    EMBEDDINGS,
    embeddings_validate,
    doc=EMBEDDINGS_BODY_DOC,
    summary="Create embeddings (OpenAI wire format; batched inputs)",
)
_openai_endpoint(
    "/completions",
    COMPLETIONS,
    completions_validate,
    doc=COMPLETIONS_BODY_DOC,
    summary="Create a text completion (OpenAI's legacy completions, streaming or not)",
)
_openai_endpoint(
    "/responses",
    RESPONSES,
    responses_validate,
    doc=RESPONSES_BODY_DOC,
    summary="Create a model response (OpenAI's Responses API, streaming or not; stateless)",
)


@router.get(
    "/responses/{response_id}",
    auth=proxy_auth,
    summary="Not served: stored responses live at the provider, with one key (404)",
)
async def response_get(request: HttpRequest, response_id: str) -> HttpResponse:
    raise ApiError(
        404,
        "Stored responses are not served through this gateway: a response is stored by the "
        "provider under the key that created it, and the gateway rotates keys. Read the "
        "response from the answer to the request that created it.",
        type="invalid_request_error",
        code="stateful_response_not_supported",
        param="response_id",
    )


# OpenTelemetry's `gen_ai.operation.name` values; the Responses API has none of its own and
# is a chat turn by its conventions.
_TRACED_OPERATIONS = {
    "chat": "chat",
    "text_completion": "text_completion",
    "embeddings": "embeddings",
}


def _load(request: HttpRequest) -> dict[str, Any]:
    return body_load(request, invalid=bad_request)


async def _openai_call(
    request: HttpRequest, dialect: Dialect, parse: Callable[[HttpRequest], dict[str, Any]]
) -> HttpResponse | StreamingHttpResponse:
    t0 = time.perf_counter()
    started = now_wall()
    client: TokenInfo = request.auth  # type: ignore[attr-defined]
    body = parse(request)
    request.llmrotate_model = body["model"]  # type: ignore[attr-defined]
    route, snapshot = await _route(body["model"], client, dialect)
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    ctx = CallContext(
        request_id=request_id_new(),
        client=client,
        route=route,
        body=body,
        stream=stream,
        strip_usage=stream and not options.get("include_usage", False),
        started_wall=started,
        t0=t0,
        dialect=dialect,
        caller=caller_from(request.headers, body),
        body_bytes=len(request.body),
        limit_specs=applicable(snapshot, client.name, route.config_name),
    )
    return await _run(
        request, ctx, snapshot, operation=_TRACED_OPERATIONS.get(dialect.operation, "chat")
    )


async def _run(
    request: HttpRequest, ctx: CallContext, snapshot: RoutingSnapshot, *, operation: str
) -> HttpResponse | StreamingHttpResponse:
    """The engine's answer for a request whose route is found and whose context is built."""
    if ctx.dialect.records:
        ctx.route, ctx.replacement = replacement_assign(
            snapshot,
            ctx.route,
            client=ctx.client,
            caller=ctx.caller,
            body=ctx.body,
            headers=request.headers,
            request_id=ctx.request_id,
            now=time.time(),
        )
    else:
        ctx.body.pop(OPT_OUT_FIELD, None)  # ours: never forwarded
    request.llmrotate_recorded = True  # type: ignore[attr-defined]  # the engine records it
    # Not reset: a stream is relayed after the view returns, in this request's own task
    # (whose context ends with it), and its log lines carry the id too.
    request_id_bind(ctx.request_id)
    ctx.trace(request.headers, operation=operation)
    if capture_wanted(snapshot, ctx.client, ctx.route.config_name):
        ctx.capture = RequestCapture(
            request,
            request_id=ctx.request_id,
            t0=ctx.t0,
            started=ctx.started_wall.timestamp(),
            route=ctx.route.config_name,
            model=ctx.route.name,
            client=ctx.client.name,
            operation=ctx.dialect.operation,
            api=ctx.client_dialect,
            stream=ctx.stream,
        )
        # The site's handler records the client leg's answer as it is sent.
        request.llmrotate_capture = ctx.capture  # type: ignore[attr-defined]
    return await Failover(ctx).run()


async def _route(
    model: str, client: TokenInfo, dialect: Dialect
) -> tuple[RouteInfo, RoutingSnapshot]:
    """The route for `model`, if the client may use it and it can serve this endpoint, and the
    snapshot it was found in (limits and capture rules)."""
    snapshot = await routing_snapshot()
    route = route_lookup(snapshot, model)
    if route is None:
        raise model_not_found(model)
    if not client.allows_route(route.config_name):
        raise forbidden(
            f"This client token may not use the model '{route.name}'.", code="route_not_allowed"
        )
    if not dialect.deployments(route):
        raise ApiError(
            400,
            f"The model '{route.name}' has no deployment that can serve {dialect.path[1:]}: "
            + dialect.unserved,
            type="invalid_request_error",
            code="dialect_not_supported",
            param="model",
        )
    return route, snapshot


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


@router.post(
    "/messages",
    auth=proxy_any_auth,
    openapi_extra=MESSAGES_BODY_DOC,
    summary="Create a message (Anthropic Messages wire format, streaming or not)",
)
async def messages(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    return await _anthropic_call(request, MESSAGES)


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
    route, snapshot = await _route(body["model"], client, dialect)
    stream = not counting and bool(body.get("stream", False))
    ctx = CallContext(
        request_id=request_id_new(),
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
        limit_specs=applicable(snapshot, client.name, route.config_name),
    )
    return await _run(request, ctx, snapshot, operation="count_tokens" if counting else "chat")


@router.get(
    "/models",
    auth=proxy_any_auth,
    summary="List the models this token may use, in OpenAI's or Anthropic's shape (pattern "
    "routes list what their upstreams list)",
)
async def list_models(request: HttpRequest) -> JsonResponse:
    client: TokenInfo = request.auth  # type: ignore[attr-defined]
    ids = await model_ids(await routing_snapshot(), client)
    if anthropic_caller(request.path, request.headers):
        return JsonResponse(models_page(ids, request.GET))
    return JsonResponse({"object": "list", "data": [model_object(*pair) for pair in ids]})


@router.get(
    "/models/{path:model}",
    auth=proxy_any_auth,
    summary="One model this token may use, in OpenAI's or Anthropic's shape",
)
async def get_model(request: HttpRequest, model: str) -> JsonResponse:
    client: TokenInfo = request.auth  # type: ignore[attr-defined]
    route = route_lookup(await routing_snapshot(), model)
    if route is None or not client.allows_route(route.config_name):
        raise model_not_found(model)
    if anthropic_caller(request.path, request.headers):
        return JsonResponse(models_page([(route.name, route.created)], {})["data"][0])
    return JsonResponse(model_object(route.name, route.created))
