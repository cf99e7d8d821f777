"""Model replacement experiments on the request path: which rule a request is eligible for,
whether it opted out, and the draw (keys.replacement). docs/replacement.md is the reference.

A request belongs to at most one experiment: the first rule of its route whose conditions it
meets. Its arm is then `opt_out_header` (the client asked not to be replaced), `opt_out_token`
(its token is never replaced), `replaced` or `control` (the draw). A replaced request walks the
target's deployments first and the route's own after them, so a failing target falls back to
them through the same failover as any other request.

Routes without rules cost one dict lookup here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import ApiError
from keys.replacement import ReplacementSpec, replacement_draw, session_replaced
from keys.routing import RouteInfo, RoutingSnapshot, TokenInfo
from proxy.callers import Caller
from usage.models import Arm

OPT_OUT_HEADER = "x-llmrotate-no-replace"
OPT_OUT_FIELD = "llmrotate_no_replace"
# The response header that says a replacement happened, and which rule made it.
REPLACED_HEADER = "x-llmrotate-replacement"
# Set too when the target failed and the route's own deployment answered.
REPLACED_FALLBACK_HEADER = "x-llmrotate-replacement-fallback"
_YES = frozenset({"1", "true", "yes"})
_NO = frozenset({"0", "false", "no", ""})
_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})


@dataclass(frozen=True, slots=True)
class Assignment:
    rule: str
    arm: str
    # This request began its session's replacement (per-session rules), or is a replaced
    # request of a session (per-request rules): the turn distribution counts it.
    start: bool = False


def opt_out(headers: Mapping[str, str], body: dict[str, Any]) -> bool:
    """Whether the client asked not to be replaced. The body field is removed either way: it
    is ours, and an upstream may refuse a field it does not know."""
    field = body.pop(OPT_OUT_FIELD, None)
    if field is not None and not isinstance(field, bool):
        raise ApiError(
            400,
            f"'{OPT_OUT_FIELD}' must be true or false.",
            type="invalid_request_error",
            code="invalid_type",
            param=OPT_OUT_FIELD,
        )
    value = (headers.get(OPT_OUT_HEADER) or "").strip().lower()
    if value not in _YES and value not in _NO:
        raise ApiError(
            400,
            f"The {OPT_OUT_HEADER} header must be 1 (do not replace) or 0.",
            type="invalid_request_error",
            code="invalid_header",
            param=OPT_OUT_HEADER,
        )
    return bool(field) or value in _YES


def _has_tools(body: dict[str, Any]) -> bool:
    return bool(body.get("tools") or body.get("functions"))


def _has_images(body: dict[str, Any]) -> bool:
    """An image part anywhere in the conversation, tool results' content included (Anthropic
    nests images there). The body's depth was bounded when it was parsed."""
    messages = body.get("messages")
    if messages is None:
        messages = body.get("input")
    pending = [messages] if isinstance(messages, list) else []
    while pending:
        for item in pending.pop():
            if not isinstance(item, dict):
                continue
            if item.get("type") in _IMAGE_PARTS:
                return True
            content = item.get("content")
            if isinstance(content, list):
                pending.append(content)
    return False


def _eligible(spec: ReplacementSpec, client: str, caller: Caller, body: dict[str, Any]) -> bool:
    if spec.clients and client not in spec.clients:
        return False
    if spec.min_turn and caller.turn < spec.min_turn:
        return False
    if spec.without_tools and _has_tools(body):
        return False
    return not (spec.without_images and _has_images(body))


def _draw(spec: ReplacementSpec, caller: Caller, request_id: str) -> tuple[bool, bool]:
    """(replaced, starts the session's replacement)."""
    if spec.per_session and caller.session_id and caller.turn:
        return session_replaced(
            spec.seed,
            caller.session_id,
            caller.turn,
            probability=spec.probability,
            min_turn=spec.min_turn,
            sticky=spec.sticky_turns,
        )
    # Per request, or a request without a session or turn to stick to: each draws alone.
    replaced = replacement_draw(spec.seed, request_id) < spec.probability
    return replaced, replaced and bool(caller.session_id)


def replacement_assign(
    snapshot: RoutingSnapshot,
    route: RouteInfo,
    *,
    client: TokenInfo,
    caller: Caller,
    body: dict[str, Any],
    headers: Mapping[str, str],
    request_id: str,
    now: float,
) -> tuple[RouteInfo, Assignment | None]:
    """The route the request takes (the target's deployments in front when replaced) and its
    experiment, if any."""
    # Checked on every request, so that a malformed opt-out is refused wherever it is sent,
    # not only where an experiment happens to run; the body field is never forwarded.
    opted_out = opt_out(headers, body)
    rules = snapshot.replacements.get(route.config_name)
    if not rules:
        return route, None
    for spec in rules:
        # A rule whose target has no usable deployment (disabled, no keys) is not running.
        if (
            not spec.deployments
            or not spec.active(now)
            or not _eligible(spec, client.name, caller, body)
        ):
            continue
        if opted_out:
            return route, Assignment(spec.name, Arm.OPT_OUT_HEADER)
        if client.never_replace:
            return route, Assignment(spec.name, Arm.OPT_OUT_TOKEN)
        replaced, start = _draw(spec, caller, request_id)
        if not replaced:
            return route, Assignment(spec.name, Arm.CONTROL)
        replaced_route = dataclasses.replace(
            route, deployments=(*spec.deployments, *route.deployments)
        )
        return replaced_route, Assignment(spec.name, Arm.REPLACED, start=start)
    return route, None
