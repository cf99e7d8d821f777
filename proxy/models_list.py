"""What `GET /v1/models` lists: the routes a token may use, and for a pass-through route
(a pattern such as `*` or `ollama/*`) the models its upstreams list, under the names a client
sends for them.

An upstream's list is fetched with the deployment's first key (none for a keyless provider),
kept for LISTING_TTL_SECONDS per provider, and bounded like any upstream answer: in time, in
bytes and in entries. An upstream that cannot be listed is left out (and logged) rather than
failing the whole list; its last good list is served meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from common.upstream import ResponseTooLarge, read_bounded, upstream_client, upstream_headers
from keys.routing import DeploymentInfo, RouteInfo, RoutingSnapshot, TokenInfo, star_match
from proxy.dialects import json_object

logger = logging.getLogger("llmrotate.proxy")

LISTING_TTL_SECONDS = 60.0
LISTING_TIMEOUT_SECONDS = 5.0
LISTING_MAX_BYTES = 4 * 1024 * 1024
LISTING_MAX_MODELS = 2000

# base_url -> (fetched at (monotonic), model ids)
_listings: dict[str, tuple[float, list[str]]] = {}


def model_object(name: str, created: int) -> dict[str, Any]:
    """One model in OpenAI's shape."""
    return {"id": name, "object": "model", "created": created, "owned_by": "llmrotate"}


async def model_ids(snapshot: RoutingSnapshot, client: TokenInfo) -> list[tuple[str, int]]:
    """(name, created) of every model the token may call, routes first, each name once."""
    out = [(r.name, r.created) for r in snapshot.routes.values() if client.allows_route(r.name)]
    seen = {name for name, _ in out}
    for pattern in snapshot.patterns:
        if not client.allows_route(pattern.name):
            continue
        for name in await _pattern_models(pattern):
            if name not in seen and name not in snapshot.routes:
                seen.add(name)
                out.append((name, pattern.created))
    return out


async def _pattern_models(route: RouteInfo) -> list[str]:
    """The client-side names of what a pattern route's upstreams list."""
    names = []
    for deployment in route.deployments:
        if "*" not in deployment.model or not deployment.keys:
            continue  # a fixed upstream model: the names it serves cannot be listed
        for upstream in await _listing(deployment):
            star = star_match(deployment.model, upstream)
            if star is not None:
                names.append(route.name.replace("*", star, 1))
    return names


async def _listing(deployment: DeploymentInfo) -> list[str]:
    base_url = deployment.provider.base_url
    cached = _listings.get(base_url)
    now = time.monotonic()
    if cached is not None and now - cached[0] < LISTING_TTL_SECONDS:
        return cached[1]
    ids = await _fetch(deployment)
    if ids is None:
        # The last good list meanwhile; tried again 5 s from now.
        ids = cached[1] if cached else []
        _listings[base_url] = (now - LISTING_TTL_SECONDS + 5.0, ids)
        return ids
    _listings[base_url] = (now, ids)
    return ids


async def _fetch(deployment: DeploymentInfo) -> list[str] | None:
    provider, key = deployment.provider, deployment.keys[0]
    client = upstream_client(provider.base_url)
    request = httpx.Request(
        "GET",
        f"{provider.base_url}/models",
        headers=upstream_headers(provider.kind, key.secret, stream=False),
    )
    why = ""
    try:
        # The whole listing, not each read: an upstream that trickles its answer is cut too.
        async with asyncio.timeout(LISTING_TIMEOUT_SECONDS):
            response = await client.send(request, stream=True)
            try:
                content = await read_bounded(response, LISTING_MAX_BYTES)
            finally:
                await response.aclose()
        if response.status_code != 200:
            why = f"HTTP {response.status_code}"
        elif (ids := _ids(json_object(content))) is not None:
            return ids
        else:
            why = "not a model list"
    except (TimeoutError, httpx.HTTPError, OSError, ResponseTooLarge) as exc:
        why = type(exc).__name__
    logger.warning("could not list the models of provider %s: %s", provider.name, why)
    return None


def _ids(payload: Any) -> list[str] | None:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    return [
        item["id"]
        for item in data[:LISTING_MAX_MODELS]
        if isinstance(item, dict) and isinstance(item.get("id"), str) and 0 < len(item["id"]) <= 200
    ]
