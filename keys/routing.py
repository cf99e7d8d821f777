"""The routing snapshot: routes, deployments, usable keys and client tokens, cached per process.

The proxy needs all of this on every request. Reading it from the database each time would put
several queries (and, on SQLite, a lock wait) on the hot path, so each process keeps an immutable
snapshot and reloads it when it is older than LLMROTATE_CONFIG_CACHE_SECONDS. Writes made through
keys.services invalidate the local copy at once; other processes catch up within the TTL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.conf import settings

from keys.health import KeyPolicy
from llmrotate_site.db import outside_request
from proxy.errors import ProxyError

logger = logging.getLogger("llmrotate.keys")


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    key_id: str
    provider: str
    secret: str
    masked: str
    priority: int
    weight: int
    models: frozenset[str]

    def __repr__(self) -> str:
        # Keeps the secret out of tracebacks, debuggers and accidental logging.
        return f"UpstreamKey({self.key_id!r}, {self.masked!r})"


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    name: str
    kind: str
    base_url: str
    policy: KeyPolicy
    keys: tuple[UpstreamKey, ...]


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    position: int
    provider: ProviderInfo
    model: str
    keys: tuple[UpstreamKey, ...]


@dataclass(frozen=True, slots=True)
class RouteInfo:
    name: str
    strategy: str
    created: int
    deployments: tuple[DeploymentInfo, ...]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    token_hash: str
    routes: frozenset[str]
    scopes: frozenset[str]
    revoked: bool

    def allows_route(self, route: str) -> bool:
        return "*" in self.routes or route in self.routes


@dataclass(slots=True)
class RoutingSnapshot:
    routes: dict[str, RouteInfo] = field(default_factory=dict)
    tokens: dict[str, TokenInfo] = field(default_factory=dict)
    # key_id -> why its secret could not be used (never the secret itself).
    unusable_keys: dict[str, str] = field(default_factory=dict)
    loaded_at: float = 0.0


def routing_load() -> RoutingSnapshot:
    """Read the whole routing configuration. Synchronous: it queries the database."""
    from keys.crypto import SecretError, mask_secret
    from keys.models import ApiKey, ClientToken, Provider, Route
    from keys.services import api_key_resolve_secret
    from llmrotate_site.logging import register_secret

    snapshot = RoutingSnapshot(loaded_at=time.monotonic())
    providers: dict[int, ProviderInfo] = {}
    keys_by_provider: dict[int, list[UpstreamKey]] = {}
    for key in ApiKey.objects.filter(enabled=True, provider__enabled=True).order_by("key_id"):
        try:
            secret = api_key_resolve_secret(api_key=key)
        except SecretError as exc:
            # A key we cannot decrypt is unusable, not silently skipped: say so loudly, once
            # per load, and keep serving with the others.
            snapshot.unusable_keys[key.key_id] = str(exc)
            logger.error("upstream key %s is unusable: %s", key.key_id, exc)
            continue
        register_secret(secret)
        keys_by_provider.setdefault(key.provider_id, []).append(
            UpstreamKey(
                key_id=key.key_id,
                provider="",
                secret=secret,
                masked=mask_secret(secret),
                priority=key.priority,
                weight=key.weight,
                models=frozenset(key.allowed_models or ()),
            )
        )
    for provider in Provider.objects.filter(enabled=True):
        policy = KeyPolicy(
            cooldown_seconds=provider.cooldown_seconds,
            quarantine_seconds=provider.quarantine_seconds,
            exhausted_seconds=provider.exhausted_seconds,
        )
        keys = tuple(
            dataclasses.replace(k, provider=provider.name)
            for k in keys_by_provider.get(provider.pk, ())
        )
        providers[provider.pk] = ProviderInfo(
            name=provider.name,
            kind=provider.kind,
            base_url=provider.base_url.rstrip("/"),
            policy=policy,
            keys=keys,
        )
    for route in Route.objects.filter(enabled=True).prefetch_related("deployments"):
        deployments = []
        for dep in route.deployments.all():
            info = providers.get(dep.provider_id)
            if info is None:
                continue
            serving = tuple(k for k in info.keys if not k.models or dep.model in k.models)
            deployments.append(
                DeploymentInfo(position=dep.position, provider=info, model=dep.model, keys=serving)
            )
        snapshot.routes[route.name] = RouteInfo(
            name=route.name,
            strategy=route.strategy,
            created=int(route.created_at.timestamp()),
            deployments=tuple(deployments),
        )
    for token in ClientToken.objects.all():
        snapshot.tokens[token.prefix] = TokenInfo(
            id=token.pk,
            name=token.name,
            token_hash=token.token_hash,
            routes=frozenset(token.routes or ()),
            scopes=frozenset(token.scopes or ()),
            revoked=token.revoked_at is not None,
        )
    return snapshot


_snapshot: RoutingSnapshot | None = None
_lock: asyncio.Lock | None = None
_lock_loop: asyncio.AbstractEventLoop | None = None
_refresh: asyncio.Task[None] | None = None


def invalidate_routing_cache() -> None:
    """Drop this process's cached routes, keys and tokens so the next request reloads them."""
    global _snapshot
    _snapshot = None


def _age(snapshot: RoutingSnapshot) -> float:
    return time.monotonic() - snapshot.loaded_at


def _fresh(snapshot: RoutingSnapshot | None) -> bool:
    return snapshot is not None and _age(snapshot) < settings.LLMROTATE_CONFIG_CACHE_SECONDS


async def routing_snapshot() -> RoutingSnapshot:
    global _lock, _lock_loop
    snapshot = _snapshot
    ttl = settings.LLMROTATE_CONFIG_CACHE_SECONDS
    if snapshot is not None and _age(snapshot) < 2 * ttl:
        # Stale while revalidating, for one more TTL: under steady traffic no request waits
        # for the reload every TTL, which would stall every request in flight at that moment
        # behind a database query.
        if _age(snapshot) >= ttl:
            _refresh_in_background()
        return snapshot
    loop = asyncio.get_running_loop()
    if _lock is None or _lock_loop is not loop:
        _lock, _lock_loop = asyncio.Lock(), loop
    # No snapshot (first request, or invalidated by a local write), or one older than two TTLs
    # (a process that sat idle: its revocations and key changes are too old to serve): load it
    # now, once, however many requests are waiting for it.
    async with _lock:
        if _snapshot is None or _age(_snapshot) >= 2 * ttl:
            result = await _load_async()
            if isinstance(result, Exception) and _snapshot is None:
                raise _unavailable(result)
            # With the database down, _reloaded keeps serving the old snapshot.
            _install(result, stale=_snapshot)
        assert _snapshot is not None
        return _snapshot


def _unavailable(cause: Exception) -> ProxyError:
    # Nothing cached to fall back on (a process that just started, or a local write that
    # invalidated the cache): the request cannot be routed until the database answers.
    logger.warning("cannot load the routing configuration: %s", cause)
    return ProxyError(
        503,
        "The gateway cannot read its configuration right now (database unavailable).",
        type="service_unavailable",
        code="config_unavailable",
        retry_after=settings.LLMROTATE_CONFIG_CACHE_SECONDS,
    )


def _refresh_in_background() -> None:
    global _refresh
    loop = asyncio.get_running_loop()
    if _refresh is not None and not _refresh.done() and _refresh.get_loop() is loop:
        return
    _refresh = loop.create_task(_refresh_from(_snapshot))


async def _refresh_from(stale: RoutingSnapshot | None) -> None:
    result = await _load_async()
    # A local write invalidated the snapshot while this load ran: the load may predate the
    # write, so drop it and let the next request load afresh.
    if _snapshot is stale:
        _install(result, stale=stale)


def _install(result: RoutingSnapshot | Exception, *, stale: RoutingSnapshot | None) -> None:
    global _snapshot
    _snapshot = _reloaded(result, stale)


async def _load_async() -> RoutingSnapshot | Exception:
    try:
        return await sync_to_async(outside_request(routing_load), thread_sensitive=True)()
    except Exception as exc:  # the database may be down; see _reloaded
        return exc


def _reloaded(
    result: RoutingSnapshot | Exception, stale: RoutingSnapshot | None
) -> RoutingSnapshot:
    if isinstance(result, RoutingSnapshot):
        return result
    if stale is None:
        raise result
    # The database is unreachable: keep routing with the last known configuration rather than
    # failing every request, and try again after another TTL.
    logger.warning("cannot reload routing configuration, serving the cached one: %s", result)
    stale.loaded_at = time.monotonic()
    return stale


def routing_snapshot_sync() -> RoutingSnapshot:
    global _snapshot
    if not _fresh(_snapshot):
        try:
            loaded: RoutingSnapshot | Exception = routing_load()
        except Exception as exc:
            loaded = exc
        _snapshot = _reloaded(loaded, _snapshot)
        return _snapshot
    assert _snapshot is not None
    return _snapshot
