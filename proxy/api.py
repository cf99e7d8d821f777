"""The OpenAI-compatible endpoints: `POST /v1/chat/completions` and `GET /v1/models`.

The request body is forwarded as the client sent it (only `model`, and `stream_options` for
streams, are rewritten), so fields this gateway does not know about still reach the upstream.
That is why the body is validated by hand rather than with a ninja schema: a schema would drop
or reshape unknown fields.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from ninja import Router

from keys.auth import proxy_auth
from keys.routing import TokenInfo, routing_snapshot
from proxy.calls import CallContext, now_wall
from proxy.engine import Failover
from proxy.errors import ProxyError, forbidden, invalid_request

router = Router(tags=["OpenAI-compatible proxy"])


CHAT_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "messages"],
                    "additionalProperties": True,
                    "properties": {
                        "model": {"type": "string", "description": "A route name."},
                        "messages": {"type": "array", "minItems": 1, "items": {"type": "object"}},
                        "stream": {"type": "boolean"},
                        "stream_options": {"type": "object"},
                    },
                }
            }
        },
    }
}


def _parse_body(request: HttpRequest) -> dict[str, Any]:
    raw = request.body
    if len(raw) > settings.LLMROTATE_MAX_REQUEST_BYTES:
        raise ProxyError(
            413,
            f"Request body is larger than {settings.LLMROTATE_MAX_REQUEST_BYTES} bytes.",
            type="invalid_request_error",
            code="request_too_large",
        )
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ProxyError(
            400,
            f"The request body is not valid JSON: {exc}.",
            type="invalid_request_error",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request(
            "'model' is required and must be a non-empty string.",
            code="missing_required_parameter" if model is None else "invalid_type",
            param="model",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request(
            "'messages' is required and must be a non-empty array.",
            code="missing_required_parameter" if messages is None else "invalid_type",
            param="messages",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid_request(
                f"messages[{i}] must be an object with a string 'role'.",
                code="invalid_type",
                param=f"messages[{i}]",
            )
    if not isinstance(body.get("stream", False), bool):
        raise invalid_request("'stream' must be a boolean.", code="invalid_type", param="stream")
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
    snapshot = await routing_snapshot()
    route = snapshot.routes.get(body["model"])
    if route is None:
        raise ProxyError(
            404,
            f"The model '{body['model']}' does not exist or you do not have access to it.",
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    if not client.allows_route(route.name):
        raise forbidden(
            f"This client token may not use the model '{route.name}'.", code="route_not_allowed"
        )
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
    )
    return await Failover(ctx).run()


@router.get("/models", auth=proxy_auth, summary="List the models (routes) this token may use")
async def list_models(request: HttpRequest) -> JsonResponse:
    client: TokenInfo = request.auth  # type: ignore[attr-defined]
    snapshot = await routing_snapshot()
    data = [
        {"id": route.name, "object": "model", "created": route.created, "owned_by": "llmrotate"}
        for route in snapshot.routes.values()
        if client.allows_route(route.name)
    ]
    return JsonResponse({"object": "list", "data": data})
