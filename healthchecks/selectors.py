"""Reads: the endpoint health shown by /internal/health, the ninja API and the admin."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from healthchecks import breaker
from healthchecks.breaker import BreakerState, BreakerStatus
from healthchecks.breaker_store import get_breaker_store
from healthchecks.models import Endpoint, HealthEvent, ProbeStatus
from keys.crypto import base_url_masked
from keys.models import Provider


@dataclass(frozen=True)
class EndpointHealth:
    endpoint: str  # the base URL without credentials or query string
    providers: list[str]
    healthy: bool  # in routing: breaker closed and not down (a degraded endpoint is healthy)
    health: str  # unknown, up, degraded (pings fail, HTTP answers) or down
    ping_status: str
    http_status: str
    last_latency_ms: float | None
    consecutive_failures: dict[str, int]
    breaker_state: str
    breaker_reopens_at: datetime | None  # when an open breaker turns half-open
    last_change: datetime | None  # the later of the last up/down change and breaker change
    last_checked: datetime | None


def _when(epoch: float) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def breaker_state_of(*, endpoint: str, now: float | None = None) -> BreakerState:
    now = time.time() if now is None else now
    return breaker.effective(get_breaker_store().get(endpoint), now=now)


def endpoint_health_list() -> list[EndpointHealth]:
    """Every enabled provider's endpoint, probed or not, with its breaker."""
    now = time.time()
    providers: dict[str, list[str]] = {}
    for name, url in Provider.objects.filter(enabled=True).values_list("name", "base_url"):
        providers.setdefault(url.rstrip("/"), []).append(name)
    rows = {e.base_url: e for e in Endpoint.objects.filter(base_url__in=list(providers))}
    breakers = get_breaker_store().load_all()
    out = []
    for url in sorted(providers):
        row = rows.get(url)
        state = breaker.effective(breakers.get(url, BreakerState()), now=now)
        ping = http = ProbeStatus.UNKNOWN.value
        failures = {"ping": 0, "http": 0}
        last_change = _when(state.changed_at)
        health = row.health if row is not None else "unknown"
        if row is not None:
            ping = row.ping_status if row.ping_enabled else ProbeStatus.DISABLED.value
            http = row.http_status if row.http_enabled else ProbeStatus.DISABLED.value
            failures = {"ping": row.ping_failures, "http": row.http_failures}
            if row.last_change_at and (last_change is None or row.last_change_at > last_change):
                last_change = row.last_change_at
        out.append(
            EndpointHealth(
                endpoint=base_url_masked(url),
                providers=sorted(providers[url]),
                healthy=state.status == BreakerStatus.CLOSED
                and (row is None or row.is_up is not False),
                health=health,
                ping_status=ping,
                http_status=http,
                last_latency_ms=row.last_latency_ms if row else None,
                consecutive_failures=failures,
                breaker_state=state.status.value,
                breaker_reopens_at=_when(state.open_until)
                if state.status == BreakerStatus.OPEN
                else None,
                last_change=last_change,
                last_checked=row.last_checked_at if row else None,
            )
        )
    return out


def endpoint_health_report() -> dict[str, Any]:
    """{"endpoint_health": {url: {...}}, "summary": {"total", "healthy", "unhealthy"}}."""
    items = endpoint_health_list()
    healthy = sum(1 for item in items if item.healthy)
    return {
        "endpoint_health": {item.endpoint: asdict(item) for item in items},
        "summary": {"total": len(items), "healthy": healthy, "unhealthy": len(items) - healthy},
    }


def health_events_recent(*, endpoint: Endpoint, limit: int = 20) -> list[HealthEvent]:
    return list(endpoint.events.order_by("-created_at", "-id")[:limit])
