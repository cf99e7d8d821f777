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

from common.background import spawn
from common.db import outside_request, run_outside_request
from common.redaction import mask_secret
from keys.crypto import SecretError
from keys.health import KeyPolicy
from keys.limits import LimitSpec
from keys.models import (
    LIMIT_FIELDS,
    ApiKey,
    CaptureRule,
    ClientToken,
    Limit,
    Provider,
    ReplacementRule,
    Route,
)
from keys.replacement import ReplacementSpec
from keys.secrets import api_key_resolve_secret

logger = logging.getLogger("llmrotate.keys")


class RoutingUnavailable(Exception):
    """No routing configuration to serve: the database cannot be read and this process has no
    cached copy (it just started, or a local write invalidated it). Whoever answers the
    request turns it into a 503 `config_unavailable` with this Retry-After."""

    def __init__(self, *, retry_after: float) -> None:
        super().__init__("the routing configuration cannot be read (database unavailable)")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    key_id: str
    provider: str
    secret: str
    masked: str
    priority: int
    weight: int
    models: frozenset[str]
    # The provider's own limits for this key (None: not known), enforced by the gateway.
    rpm: int | None = None
    tpm: int | None = None

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
    # Resolved from a pattern route: the model as configured (`*`), `model` being the name sent.
    pattern_model: str = ""
    # The replacement rule that put this deployment in front of the route's own (keys.replacement).
    replacement: str = ""


@dataclass(frozen=True, slots=True)
class RouteInfo:
    name: str
    strategy: str
    created: int
    deployments: tuple[DeploymentInfo, ...]
    # For a request matched by a pattern route: the pattern (the route's configured name, which
    # limits and token scopes refer to); `name` is then the model the client sent.
    pattern: str = ""

    @property
    def config_name(self) -> str:
        """The name the configuration knows this route by (limits, token scopes)."""
        return self.pattern or self.name

    def matches(self, model: str) -> str | None:
        """For a pattern route: what its `*` matches in `model` (None: no match)."""
        return star_match(self.name, model)

    def resolved(self, model: str, star: str) -> RouteInfo:
        """This pattern route serving `model`: each deployment's `*` becomes `star`, and only
        the keys allowed that model serve it."""
        deployments = []
        for dep in self.deployments:
            upstream = dep.model.replace("*", star)
            keys = tuple(k for k in dep.keys if not k.models or upstream in k.models)
            deployments.append(
                dataclasses.replace(dep, model=upstream, keys=keys, pattern_model=dep.model)
            )
        return dataclasses.replace(
            self, name=model, pattern=self.name, deployments=tuple(deployments)
        )


def star_match(pattern: str, name: str) -> str | None:
    """What the `*` of `pattern` matches in `name` (None: `name` does not match it)."""
    prefix, _, suffix = pattern.partition("*")
    if len(name) < len(prefix) + len(suffix):
        return None
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    return name[len(prefix) : len(name) - len(suffix)]


def keyless_key(provider: str) -> UpstreamKey:
    """The one "key" of a provider that takes none (a local server): calls go without a
    credential, and the key state store tracks the endpoint's health under this id. The colon
    is allowed in key ids, but `:keyless` is refused as one (keys.models), so it is never a
    real key's."""
    return UpstreamKey(
        key_id=f"{provider}:keyless",
        provider=provider,
        secret="",
        masked="(no key)",
        priority=0,
        weight=1,
        models=frozenset(),
    )


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    token_hash: str
    routes: frozenset[str]
    scopes: frozenset[str]
    revoked: bool
    never_replace: bool = False
    # Unix time from which the token is refused; None: never.
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def allows_route(self, route: str) -> bool:
        return "*" in self.routes or route in self.routes


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    client: str  # a client token's name, "" for any
    route: str  # a route's configured name, "" for any
    rate: float
    until: float | None  # Unix time; None: no end


@dataclass(slots=True)
class RoutingSnapshot:
    routes: dict[str, RouteInfo] = field(default_factory=dict)
    # Pass-through routes (names with a `*`), most specific first: see route_lookup.
    patterns: list[RouteInfo] = field(default_factory=list)
    tokens: dict[str, TokenInfo] = field(default_factory=dict)
    # key_id -> why its secret could not be used (never the secret itself).
    unusable_keys: dict[str, str] = field(default_factory=dict)
    # Client limits by (client name, route name), "" for any (keys.limits).
    limits: dict[tuple[str, str], LimitSpec] = field(default_factory=dict)
    # Enabled wire-capture rules (keys.models.CaptureRule); usually none.
    capture: tuple[CaptureSpec, ...] = ()
    # Enabled replacement rules by route (configured) name, in order (keys.replacement).
    replacements: dict[str, tuple[ReplacementSpec, ...]] = field(default_factory=dict)
    loaded_at: float = 0.0

    def capture_rate(self, client: str, route: str, *, now: float) -> float:
        """The share of this client's requests on this route to capture: the highest of the
        rules that match and have not expired (0 without any)."""
        rate = 0.0
        for spec in self.capture:
            if (
                spec.client in ("", client)
                and spec.route in ("", route)
                and (spec.until is None or now < spec.until)
            ):
                rate = max(rate, spec.rate)
        return rate

    def configured_routes(self) -> list[RouteInfo]:
        """Every route as configured: the exact ones, then the patterns (unresolved)."""
        return [*self.routes.values(), *self.patterns]


def routing_load() -> RoutingSnapshot:
    """Read the whole routing configuration. Synchronous: it queries the database."""
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
        keys_by_provider.setdefault(key.provider_id, []).append(
            UpstreamKey(
                key_id=key.key_id,
                provider="",
                secret=secret,
                masked=mask_secret(secret),
                priority=key.priority,
                weight=key.weight,
                models=frozenset(key.allowed_models or ()),
                rpm=key.requests_per_minute,
                tpm=key.tokens_per_minute,
            )
        )
    for provider in Provider.objects.filter(enabled=True):
        policy = KeyPolicy(
            cooldown_seconds=provider.cooldown_seconds,
            quarantine_seconds=provider.quarantine_seconds,
            exhausted_seconds=provider.exhausted_seconds,
            max_wait_seconds=settings.LLMROTATE_MAX_UPSTREAM_WAIT_SECONDS,
        )
        keys = tuple(
            dataclasses.replace(k, provider=provider.name)
            for k in keys_by_provider.get(provider.pk, ())
        )
        if not keys and not provider.requires_key:
            keys = (keyless_key(provider.name),)
        providers[provider.pk] = ProviderInfo(
            name=provider.name,
            kind=provider.kind,
            base_url=provider.base_url.rstrip("/"),
            policy=policy,
            keys=keys,
        )
    deployments_by_route: dict[int, tuple[DeploymentInfo, ...]] = {}
    for route in Route.objects.filter(enabled=True).prefetch_related("deployments"):
        deployments = []
        for dep in route.deployments.all():
            info = providers.get(dep.provider_id)
            if info is None:
                continue
            # A pattern deployment's model is known per request (RouteInfo.resolved).
            serving = tuple(
                k for k in info.keys if not k.models or dep.model in k.models or "*" in dep.model
            )
            deployments.append(
                DeploymentInfo(position=dep.position, provider=info, model=dep.model, keys=serving)
            )
        deployments_by_route[route.pk] = tuple(deployments)
        info_route = RouteInfo(
            name=route.name,
            strategy=route.strategy,
            created=int(route.created_at.timestamp()),
            deployments=tuple(deployments),
        )
        if "*" in route.name:
            snapshot.patterns.append(info_route)
        else:
            snapshot.routes[route.name] = info_route
    snapshot.patterns.sort(key=_specificity)
    for token in ClientToken.objects.all():
        snapshot.tokens[token.prefix] = TokenInfo(
            id=token.pk,
            name=token.name,
            token_hash=token.token_hash,
            routes=frozenset(token.routes or ()),
            scopes=frozenset(token.scopes or ()),
            revoked=token.revoked_at is not None,
            never_replace=token.never_replace,
            expires_at=token.expires_at.timestamp() if token.expires_at else None,
        )
    for limit in Limit.objects.select_related("client", "route"):
        spec = LimitSpec(
            id=limit.pk,
            client=limit.client.name if limit.client else "",
            route=limit.route.name if limit.route else "",
            **{name: getattr(limit, name) for name in LIMIT_FIELDS},
        )
        snapshot.limits[(spec.client, spec.route)] = spec
    snapshot.capture = tuple(
        CaptureSpec(
            client=rule.client.name if rule.client else "",
            route=rule.route.name if rule.route else "",
            rate=rule.sample_rate,
            until=rule.until.timestamp() if rule.until else None,
        )
        for rule in CaptureRule.objects.filter(enabled=True, sample_rate__gt=0).select_related(
            "client", "route"
        )
    )
    snapshot.replacements = _replacements_load(providers, deployments_by_route)
    return snapshot


# Replacement deployments get positions of their own, so that round-robin over a target's
# keys never shares its counter with a deployment of the route (Failover._ordered_keys).
_REPLACEMENT_POSITION = 100_000


def _replacements_load(
    providers: dict[int, ProviderInfo], deployments_by_route: dict[int, tuple[DeploymentInfo, ...]]
) -> dict[str, tuple[ReplacementSpec, ...]]:
    """The enabled rules of enabled routes, each with its target's deployments in front."""
    out: dict[str, list[ReplacementSpec]] = {}
    rules = ReplacementRule.objects.filter(enabled=True, route__enabled=True).select_related(
        "route", "target_route", "target_provider"
    )
    for rule in rules.order_by("route__name", "position", "name"):
        if rule.target_route_id is not None:
            own = deployments_by_route.get(rule.target_route_id, ())
        else:
            info = providers.get(rule.target_provider_id or 0)
            own = ()
            if info is not None:
                keys = tuple(k for k in info.keys if not k.models or rule.target_model in k.models)
                own = (
                    DeploymentInfo(position=0, provider=info, model=rule.target_model, keys=keys),
                )
        # A target deployment without a key for its model cannot answer: a rule whose target
        # has none left does not run (proxy.replacement), rather than "replace" every request
        # with a fallback to the route itself.
        targets = tuple(
            dataclasses.replace(dep, position=_REPLACEMENT_POSITION + i, replacement=rule.name)
            for i, dep in enumerate(d for d in own if d.keys)
        )
        out.setdefault(rule.route.name, []).append(
            ReplacementSpec(
                name=rule.name,
                seed=rule.seed or rule.name,
                probability=rule.probability,
                per_session=rule.stickiness == ReplacementRule.Stickiness.PER_SESSION,
                sticky_turns=rule.sticky_turns,
                min_turn=rule.min_turn,
                clients=frozenset(rule.clients or ()),
                without_tools=rule.without_tools,
                without_images=rule.without_images,
                active_from=rule.active_from.timestamp() if rule.active_from else None,
                active_until=rule.active_until.timestamp() if rule.active_until else None,
                target=rule.target_label,
                deployments=targets,
            )
        )
    return {route: tuple(specs) for route, specs in out.items()}


def _specificity(route: RouteInfo) -> tuple[int, str]:
    # The longest literal part wins ('ollama/llama*' before 'ollama/*' before '*'); the name
    # breaks ties so that the order never depends on the database's.
    return (-len(route.name.replace("*", "")), route.name)


def route_lookup(snapshot: RoutingSnapshot, model: str) -> RouteInfo | None:
    """The route serving `model`: the exact route of that name, or else the most specific
    pattern that matches it, resolved for it."""
    route = snapshot.routes.get(model)
    if route is not None or not snapshot.patterns:
        return route
    for pattern in snapshot.patterns:
        star = pattern.matches(model)
        if star is not None:
            return pattern.resolved(model, star)
    return None


_snapshot: RoutingSnapshot | None = None
_lock: asyncio.Lock | None = None
_lock_loop: asyncio.AbstractEventLoop | None = None
_refresh: asyncio.Task[None] | None = None
# Set while reloads fail (the database is unreachable): when the first failure was seen, and
# when to try again. The last good snapshot keeps being served meanwhile, but is never made to
# look fresh, so the first reload that works applies every change (revocations included).
_failing_since: float | None = None
_retry_at = 0.0
_failure_logged_at = float("-inf")
# How soon a failed reload is tried again, and how often a lasting failure is logged again.
RETRY_SECONDS = 1.0
_LOG_EVERY_SECONDS = 30.0


def invalidate_routing_cache() -> None:
    """Drop this process's cached routes, keys and tokens so the next request reloads them."""
    global _snapshot, _failing_since, _retry_at
    _snapshot = None
    _failing_since, _retry_at = None, 0.0


def _age(snapshot: RoutingSnapshot) -> float:
    return time.monotonic() - snapshot.loaded_at


def _fresh(snapshot: RoutingSnapshot | None) -> bool:
    return snapshot is not None and _age(snapshot) < settings.LLMROTATE_CONFIG_CACHE_SECONDS


async def routing_snapshot() -> RoutingSnapshot:
    """The routing configuration, at most LLMROTATE_CONFIG_CACHE_SECONDS old under traffic.

    A snapshot older than that is served while a reload runs in the background (stale while
    revalidating), up to twice that age: under steady traffic no request waits for the
    database. An older one (a process that sat idle) is reloaded before answering. While the
    database cannot be read, the last snapshot is served and the reload retried every
    RETRY_SECONDS in the background.
    """
    global _lock, _lock_loop
    snapshot = _snapshot
    ttl = settings.LLMROTATE_CONFIG_CACHE_SECONDS
    if snapshot is not None:
        age = _age(snapshot)
        if age < ttl:
            return snapshot
        if age < 2 * ttl or _failing_since is not None:
            _refresh_in_background()
            return snapshot
    loop = asyncio.get_running_loop()
    if _lock is None or _lock_loop is not loop:
        _lock, _lock_loop = asyncio.Lock(), loop
    # No snapshot (first request, or invalidated by a local write), or one too old to serve:
    # load it now, once, however many requests are waiting for it.
    async with _lock:
        current = _snapshot
        if current is None or _age(current) >= 2 * ttl:
            result = await _load_async()
            if isinstance(result, Exception):
                if _snapshot is None:
                    raise RoutingUnavailable(
                        retry_after=settings.LLMROTATE_CONFIG_CACHE_SECONDS
                    ) from result
                # The database went away: keep serving what we have (see above).
                return _snapshot
            _install(result)
        assert _snapshot is not None
        return _snapshot


def _refresh_in_background() -> None:
    global _refresh
    if time.monotonic() < _retry_at:
        return
    loop = asyncio.get_running_loop()
    if _refresh is not None and not _refresh.done() and _refresh.get_loop() is loop:
        return
    _refresh = spawn(_refresh_from(_snapshot))


async def _refresh_from(stale: RoutingSnapshot | None) -> None:
    result = await _load_async(background=True)
    # A local write invalidated the snapshot while this load ran: the load may predate the
    # write, so drop it and let the next request load afresh.
    if isinstance(result, RoutingSnapshot) and _snapshot is stale:
        _install(result)


def _install(result: RoutingSnapshot) -> None:
    global _snapshot
    _snapshot = result


async def _load_async(*, background: bool = False) -> RoutingSnapshot | Exception:
    # A request waiting for the load runs it the Django way, on the request's own thread (in a
    # test, that thread's transaction is the one holding the test's rows). A background reload
    # may outlive the request that started it, and that thread with it, so it runs on the
    # gateway's database thread instead (common.db).
    try:
        if background:
            result: RoutingSnapshot | Exception = await run_outside_request(routing_load)
        else:
            result = await sync_to_async(outside_request(routing_load), thread_sensitive=True)()
    except Exception as exc:  # the database may be down; the caller serves the last snapshot
        result = exc
    _note(result)
    return result


def _note(result: RoutingSnapshot | Exception) -> None:
    """Track reload failures: schedule the retry, and say so loudly (but not on every retry)."""
    global _failing_since, _retry_at, _failure_logged_at
    now = time.monotonic()
    if isinstance(result, RoutingSnapshot):
        if _failing_since is not None:
            logger.warning(
                "routing configuration reloaded again after %.0f s of failures",
                now - _failing_since,
            )
        _failing_since, _retry_at = None, 0.0
        return
    first = _failing_since is None
    if first:
        _failing_since = now
    _retry_at = now + min(RETRY_SECONDS, settings.LLMROTATE_CONFIG_CACHE_SECONDS)
    if first or now - _failure_logged_at >= _LOG_EVERY_SECONDS:
        _failure_logged_at = now
        served = _snapshot
        logger.error(
            "cannot reload the routing configuration (%s: %s); %s, retrying every %.0f s",
            type(result).__name__,
            str(result).splitlines()[0][:200] if str(result) else "",
            f"serving the one loaded {_age(served):.0f} s ago (revocations and key changes "
            "since then are not applied)"
            if served is not None
            else "no configuration to serve: requests get 503 config_unavailable",
            RETRY_SECONDS,
        )


def routing_snapshot_sync() -> RoutingSnapshot:
    """The snapshot for synchronous callers (admin, monitoring, tasks): reloaded when older
    than the TTL; with the database down, the last one."""
    global _snapshot
    if _fresh(_snapshot):
        assert _snapshot is not None
        return _snapshot
    try:
        loaded: RoutingSnapshot | Exception = routing_load()
    except Exception as exc:
        loaded = exc
    _note(loaded)
    if isinstance(loaded, RoutingSnapshot):
        _snapshot = loaded
    elif _snapshot is None:
        raise loaded
    return _snapshot
