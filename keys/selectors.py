"""Reads of keys, their live health, and the sanitized configuration, for the monitoring API
and the dashboard. Plain data out; nothing secret: a key appears as its id and `secret_hint`
(masked when the secret was set), a client token only as its masked prefix."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings

from common.redaction import base_url_masked
from common.timestamps import datetime_from_epoch
from keys.health import KeyStatus, is_available
from keys.models import ApiKey, ClientToken, Provider, Route
from keys.routing import routing_snapshot_sync
from keys.state_store import get_key_state_store
from keys.strategies import DEFAULT_STRATEGY


@dataclass(slots=True)
class KeyHealth:
    key_id: str
    provider: str
    secret_hint: str
    enabled: bool
    health: str
    available: bool
    cooldown_until: datetime | None
    quarantine_until: datetime | None
    exhausted_until: datetime | None
    consecutive_failures: int
    total_successes: int
    total_failures: int
    last_used_at: datetime | None
    last_error_type: str | None
    remaining_requests: int | None
    remaining_tokens: int | None
    headroom_at: datetime | None
    in_flight: int


@dataclass(slots=True)
class ProviderHealth:
    provider: str
    total: int = 0
    available: int = 0
    states: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in KeyStatus})


@dataclass(slots=True)
class PoolHealth:
    status: str  # ok | degraded | down
    total_keys: int
    available_keys: int
    providers: list[ProviderHealth]


def _moment(epoch: float | None) -> datetime | None:
    # The state store keeps epoch seconds, 0 meaning "no timer".
    return datetime_from_epoch(epoch)


def keys_health(*, now: float | None = None) -> list[KeyHealth]:
    """Every configured key with its live state, by provider then key id. A key disabled in
    the configuration reports `disabled` whatever the state store says; one whose secret
    cannot be read is not `available` and its last error is `secret_unavailable`."""
    now = time.time() if now is None else now
    keys = list(ApiKey.objects.select_related("provider").order_by("provider__name", "key_id"))
    states = get_key_state_store().get_many([k.key_id for k in keys], now=now)
    # A key whose secret cannot be read (an unset env:// variable, a missing file, a wrong
    # encryption key) is left out of routing, whatever its health says.
    unusable = routing_snapshot_sync().unusable_keys
    result = []
    for key in keys:
        state, in_flight = states[key.key_id]
        enabled = key.enabled and key.provider.enabled
        health = state.status.value if enabled else KeyStatus.DISABLED.value
        usable = key.key_id not in unusable
        result.append(
            KeyHealth(
                key_id=key.key_id,
                provider=key.provider.name,
                secret_hint=key.secret_hint,
                enabled=enabled,
                health=health,
                available=enabled and usable and is_available(state, now=now),
                cooldown_until=_moment(state.cooldown_until),
                quarantine_until=_moment(state.quarantine_until),
                exhausted_until=_moment(state.exhausted_until),
                consecutive_failures=state.consecutive_failures,
                total_successes=state.total_successes,
                total_failures=state.total_failures,
                last_used_at=_moment(state.last_used_at),
                last_error_type=state.last_error_type if usable else "secret_unavailable",
                remaining_requests=state.remaining_requests,
                remaining_tokens=state.remaining_tokens,
                headroom_at=_moment(state.headroom_at),
                in_flight=in_flight,
            )
        )
    return result


def pool_health(*, now: float | None = None) -> PoolHealth:
    """Key counts per provider and state. `ok`: every key available; `degraded`: some are
    not; `down`: none is (or there are no keys)."""
    providers: dict[str, ProviderHealth] = {
        name: ProviderHealth(provider=name)
        for name in Provider.objects.order_by("name").values_list("name", flat=True)
    }
    keys = keys_health(now=now)
    for key in keys:
        entry = providers.setdefault(key.provider, ProviderHealth(provider=key.provider))
        entry.total += 1
        entry.available += key.available
        entry.states[key.health] = entry.states.get(key.health, 0) + 1
    available = sum(k.available for k in keys)
    if keys and available == len(keys):
        status = "ok"
    elif available:
        status = "degraded"
    else:
        status = "down"
    return PoolHealth(
        status=status,
        total_keys=len(keys),
        available_keys=available,
        providers=list(providers.values()),
    )


def _secret_source(key: ApiKey) -> str:
    if key.secret_ref:
        return key.secret_ref.split("://", 1)[0]  # env | file; the reference itself stays out
    return "encrypted" if key.secret_encrypted else "none"


def config_sanitized() -> dict[str, object]:
    """The running configuration without secrets: strategy, providers, routes with their
    fallback chains, keys (masked), clients (masked) and the main settings."""
    keys = ApiKey.objects.select_related("provider").order_by("provider__name", "key_id")
    routes = Route.objects.order_by("name").prefetch_related("deployments__provider")
    return {
        "strategy": DEFAULT_STRATEGY,
        "providers": [
            {
                "name": p.name,
                "kind": p.kind,
                "base_url": base_url_masked(p.base_url),
                "enabled": p.enabled,
                "cooldown_seconds": p.cooldown_seconds,
                "quarantine_seconds": p.quarantine_seconds,
                "exhausted_seconds": p.exhausted_seconds,
            }
            for p in Provider.objects.order_by("name")
        ],
        "routes": [
            {
                "name": r.name,
                "strategy": r.strategy,
                "enabled": r.enabled,
                "fallback_chain": [
                    {"provider": d.provider.name, "model": d.model} for d in r.deployments.all()
                ],
            }
            for r in routes
        ],
        "keys": [
            {
                "key_id": k.key_id,
                "provider": k.provider.name,
                "secret_hint": k.secret_hint,
                "secret_source": _secret_source(k),
                "enabled": k.enabled,
                "priority": k.priority,
                "weight": k.weight,
                "models": list(k.allowed_models or []),
            }
            for k in keys
        ],
        "clients": [
            {
                "name": c.name,
                "token": c.masked,
                "scopes": list(c.scopes or []),
                "routes": list(c.routes or []),
                "revoked": c.revoked_at is not None,
            }
            for c in ClientToken.objects.order_by("name")
        ],
        "settings": {
            "max_attempts": settings.LLMROTATE_MAX_ATTEMPTS,
            "request_deadline_seconds": settings.LLMROTATE_REQUEST_DEADLINE_SECONDS,
            "state_store": "redis" if settings.REDIS_URL else "memory",
            "usage_retention_days": settings.LLMROTATE_USAGE_RETENTION_DAYS,
        },
    }
