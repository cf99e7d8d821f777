"""A realistic gateway for the dashboard to show: usage.seeding's providers, keys, routes and
clients as configuration, its synthetic traffic through the production write path, keys in
every state, and endpoints with a history of probe results.

Every URL is on 127.0.0.1: nothing here may reach the network, even by accident (the embedded
gateway re-validates quarantined keys against their provider's base URL).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.utils import timezone

from healthchecks.models import Endpoint, HealthEvent, ProbeKind, ProbeStatus
from healthchecks.probes import ProbeResult
from healthchecks.services import endpoints_sync, probe_record
from keys.config_io import config_import
from keys.health import CallResult, KeyPolicy, Outcome
from keys.models import ApiKey
from keys.ratelimits import Headroom
from keys.services import api_key_health_action
from keys.state_store import get_key_state_store
from usage.seeding import CLIENTS, PROVIDERS, ROUTES, usage_seed

# The providers' base URLs, all loopback; "openai" is replaced by the fake upstream's URL so
# that live traffic through the proxy works.
BASE_URLS = {
    "openai": "http://127.0.0.1:9/v1",
    "azure-eu": "http://127.0.0.1:8443/openai/v1",
    "anthropic": "http://127.0.0.1:8444/v1",
    "vllm-local": "http://127.0.0.1:8000/v1",
}


def key_secret(key_id: str) -> str:
    """A secret that looks like a real provider key, so that a leak would be unmistakable."""
    return f"sk-dash-{hashlib.sha256(key_id.encode()).hexdigest()[:32]}"


SECRETS = {key_id: key_secret(key_id) for _, keys in PROVIDERS.values() for key_id in keys}


@dataclass
class SeededGateway:
    secrets: dict[str, str]  # key id -> upstream secret
    tokens: dict[str, str]  # client name -> client token


def gateway_config(*, upstream_url: str) -> dict[str, Any]:
    urls = {**BASE_URLS, "openai": upstream_url}
    return {
        "providers": {
            name: {"kind": kind, "base_url": urls[name]} for name, (kind, _) in PROVIDERS.items()
        },
        # Each provider's first key is its preferred one (tried first while healthy), so a
        # fault scripted for it is always a request's first attempt.
        "keys": [
            {
                "id": key_id,
                "provider": provider,
                "secret": f"literal://{SECRETS[key_id]}",
                "priority": 0 if key_id == keys[0] else 1,
            }
            for provider, (_, keys) in PROVIDERS.items()
            for key_id in keys
        ],
        "routes": {
            route: {
                "strategy": "health_aware",
                "deployments": [{"provider": p, "model": m} for p, m in chain],
            }
            for route, chain in ROUTES.items()
        },
        "clients": [{"name": c.name, "routes": ["*"], "scopes": ["proxy"]} for c in CLIENTS],
    }


def _key_states() -> None:
    """A pool in every state: cooling down, quarantined, exhausted, disabled, and busy keys
    with rate-limit headroom."""
    store = get_key_state_store()
    policy = KeyPolicy(jitter_ratio=0)
    now = time.time()

    async def record(key_id: str, outcome: Outcome, **kwargs: Any) -> None:
        await store.record(key_id, CallResult(outcome, now=now, policy=policy, **kwargs))

    async def apply() -> None:
        for i, key_id in enumerate(SECRETS):
            headroom = Headroom(remaining_requests=4800 - 350 * i, remaining_tokens=790_000 - i)
            await record(key_id, Outcome.SUCCESS, headroom=headroom)
        await record("openai-2", Outcome.RATE_LIMITED, retry_after=95, error_type="rate_limit")
        await record("anthropic-3", Outcome.AUTH_FAILED, error_type="invalid_api_key")
        await record("azure-eu-2", Outcome.QUOTA_EXHAUSTED, error_type="insufficient_quota")

    # In a thread of its own: the browser tests' thread already has Playwright's loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, apply()).result()
    api_key_health_action(api_key=ApiKey.objects.get(key_id="vllm-2"), action="disable")


def _probe_history() -> None:
    """Thirty minutes of probe results per endpoint, the anthropic one failing lately."""
    endpoints_sync()
    start = timezone.now() - timedelta(minutes=30)
    for n, endpoint in enumerate(Endpoint.objects.order_by("base_url")):
        failing = "8444" in endpoint.base_url
        for i in range(24):
            kind = ProbeKind.HTTP if i % 2 else ProbeKind.PING
            ok = not (failing and i >= 20)
            latency = 40 + 12 * n + (i * 7 + n * 13) % 23 if ok else None
            result = ProbeResult(
                status=ProbeStatus.OK if ok else ProbeStatus.FAILED,
                latency_ms=latency,
                status_code=(200 if ok else 503) if kind == ProbeKind.HTTP else None,
                error="" if ok else "HTTP 503 Service Unavailable",
            )
            probe_record(endpoint=endpoint, kind=kind, result=result)
        # probe_record stamps "now"; spread the history over the half hour it stands for.
        events = list(HealthEvent.objects.filter(endpoint=endpoint).order_by("id"))
        for i, event in enumerate(events):
            event.created_at = start + timedelta(seconds=75 * i)
        HealthEvent.objects.bulk_update(events, ["created_at"])


def dashboard_seed(*, upstream_url: str, records: int = 3000, days: float = 2) -> SeededGateway:
    report = config_import(data=gateway_config(upstream_url=upstream_url))
    if records:
        usage_seed(records=records, days=days, end=timezone.now(), batch_size=2000)
    _key_states()
    _probe_history()
    return SeededGateway(secrets=dict(SECRETS), tokens=dict(report.generated_tokens))
