"""Writes of the health checks: endpoints, probe results, breaker transitions, retention.

Probes run in the Celery worker: every few seconds beat runs `probes_dispatch`, which sends a
`probe_run` task for each probe that is due, so that each endpoint keeps its own intervals with
a single schedule entry.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from healthchecks import breaker
from healthchecks.breaker import BreakerPolicy, BreakerState, BreakerStatus
from healthchecks.breaker_store import Transition, get_breaker_store
from healthchecks.models import Endpoint, HealthEvent, ProbeKind
from healthchecks.notify import health_change_notify
from healthchecks.probes import ProbeResult, http_probe, ping_probe
from keys.models import ApiKey, Provider

logger = logging.getLogger("llmrotate.health")
T = TypeVar("T")

# An echo reply on any sane network comes back well within this; waiting longer only holds a
# worker thread.
PING_TIMEOUT_SECONDS = 2.0
_PRUNE_BATCH = 5000


def breaker_policy() -> BreakerPolicy:
    return BreakerPolicy(
        open_seconds=settings.LLMROTATE_BREAKER_OPEN_SECONDS,
        max_open_seconds=settings.LLMROTATE_BREAKER_MAX_OPEN_SECONDS,
        window_seconds=settings.LLMROTATE_BREAKER_WINDOW_SECONDS,
        min_calls=settings.LLMROTATE_BREAKER_MIN_CALLS,
        failure_rate=settings.LLMROTATE_BREAKER_FAILURE_RATE,
    )


def breaker_apply(*, endpoint: str, fn: Transition[T], now: float) -> tuple[BreakerState, T]:
    """Run one transition in the shared store and announce every status it passed through."""
    before, after, extra = get_breaker_store().update(endpoint, fn)
    steps = breaker.transitions(before, after, now=now)
    lapsed = breaker.effective(before, now=now)
    for previous, current in itertools.pairwise(steps):
        if current == BreakerStatus.HALF_OPEN and before.status == BreakerStatus.OPEN:
            # Half-open happened when the open period ran out, not when someone noticed: so
            # dated, the notifications sort in the order things happened.
            reason, at = "the open period is over", min(now, lapsed.changed_at)
        else:
            reason, at = after.reason, now
        health_change_notify(
            endpoint=endpoint,
            event=f"breaker.{current}",
            previous=previous,
            current=current,
            reason=reason,
            now=at,
        )
    return after, extra


def breaker_reset(*, endpoint: str) -> BreakerState:
    """An operator closes the breaker (admin action); the backoff starts from scratch."""
    now = time.time()
    after, _ = breaker_apply(
        endpoint=endpoint,
        fn=lambda s: (breaker.close(s, now=now, reason="reset by an operator"), None),
        now=now,
    )
    return after


def breakers_advance(*, now: float) -> int:
    """Turn breakers whose open period is over into half-open ones, so that the change is
    announced (the proxy and the probes already treat them as half-open lazily)."""
    moved = 0
    for endpoint, state in get_breaker_store().load_all().items():
        if state.status == BreakerStatus.OPEN and state.open_until <= now:
            breaker_apply(
                endpoint=endpoint, fn=lambda s: (breaker.effective(s, now=now), None), now=now
            )
            moved += 1
    return moved


def _provider_urls(*, enabled_only: bool) -> set[str]:
    providers = Provider.objects.filter(enabled=True) if enabled_only else Provider.objects.all()
    return {url.rstrip("/") for url in providers.values_list("base_url", flat=True)}


def endpoints_sync() -> None:
    """One Endpoint per provider base URL: create the missing, delete those no provider uses."""
    urls = _provider_urls(enabled_only=False)
    missing = urls - set(Endpoint.objects.values_list("base_url", flat=True))
    for url in sorted(missing):
        Endpoint.objects.get_or_create(
            base_url=url,
            defaults={
                "ping_interval_seconds": settings.LLMROTATE_PING_INTERVAL_SECONDS,
                "ping_failure_threshold": settings.LLMROTATE_PING_FAILURE_THRESHOLD,
                "http_interval_seconds": settings.LLMROTATE_HTTP_PROBE_INTERVAL_SECONDS,
                "http_failure_threshold": settings.LLMROTATE_HTTP_PROBE_FAILURE_THRESHOLD,
                "http_timeout_seconds": settings.LLMROTATE_HTTP_PROBE_TIMEOUT_SECONDS,
            },
        )
    Endpoint.objects.exclude(base_url__in=urls).delete()


def probes_dispatch(*, send: Callable[[int, str], None]) -> int:
    """Send every probe that is due; returns how many. Runs on each beat tick."""
    endpoints_sync()
    breakers_advance(now=time.time())
    now = timezone.now()
    sent = 0
    active = Endpoint.objects.filter(enabled=True, base_url__in=_provider_urls(enabled_only=True))
    for endpoint in active:
        for kind, enabled, interval, field in (
            (ProbeKind.PING, endpoint.ping_enabled, endpoint.ping_interval_seconds, "next_ping_at"),
            (ProbeKind.HTTP, endpoint.http_enabled, endpoint.http_interval_seconds, "next_http_at"),
        ):
            due = getattr(endpoint, field)
            if not enabled or (due is not None and due > now):
                continue
            # Claimed with a conditional UPDATE: two overlapping ticks never send it twice.
            claimed = Endpoint.objects.filter(pk=endpoint.pk, **{field: due}).update(
                **{field: now + timedelta(seconds=interval)}
            )
            if claimed:
                send(endpoint.pk, kind.value)
                sent += 1
    return sent


def _probe_headers(base_url: str) -> dict[str, str]:
    """Authentication with one of the endpoint's keys (the first usable by priority)."""
    from keys.crypto import SecretError
    from keys.services import api_key_resolve_secret
    from llmrotate_site.logging import register_secret
    from proxy.engine import upstream_headers

    keys = ApiKey.objects.filter(
        enabled=True, provider__enabled=True, provider__base_url__in=[base_url, base_url + "/"]
    ).select_related("provider")
    for key in keys.order_by("priority", "key_id"):
        try:
            secret = api_key_resolve_secret(api_key=key)
        except SecretError:
            continue
        register_secret(secret)  # masked in any log line, should a library print it
        return upstream_headers(key.provider.kind, secret, stream=False)
    return {}


def endpoint_probe(*, endpoint_id: int, kind: str) -> ProbeResult | None:
    """Run one probe and record it. None when the endpoint no longer exists."""
    endpoint = Endpoint.objects.filter(pk=endpoint_id).first()
    if endpoint is None:
        return None
    if kind == ProbeKind.PING:
        result = ping_probe(
            host=urlsplit(endpoint.base_url).hostname or "",
            timeout=PING_TIMEOUT_SECONDS,
            # Root gets a raw socket; everyone else asks for the kernel's unprivileged one.
            privileged=not hasattr(os, "geteuid") or os.geteuid() == 0,
        )
    else:
        result = http_probe(
            url=endpoint.probe_url,
            headers=_probe_headers(endpoint.base_url),
            timeout=endpoint.http_timeout_seconds,
            expected=endpoint.http_expected_status,
        )
    probe_record(endpoint=endpoint, kind=kind, result=result)
    return result


def _is_up(endpoint: Endpoint) -> bool:
    return not (
        (endpoint.ping_enabled and endpoint.ping_failures >= endpoint.ping_failure_threshold)
        or (endpoint.http_enabled and endpoint.http_failures >= endpoint.http_failure_threshold)
    )


def probe_record(*, endpoint: Endpoint, kind: str, result: ProbeResult) -> Endpoint:
    """Store a probe result, feed the breaker, and announce the endpoint going down or up."""
    at = timezone.now()
    prefix = "ping" if kind == ProbeKind.PING else "http"
    with transaction.atomic():
        # Locked: the ping and HTTP probes of one endpoint may finish at the same moment.
        ep = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
        was_up = ep.is_up
        setattr(ep, f"{prefix}_status", result.status)
        if result.counts:
            failures = 0 if result.ok else getattr(ep, f"{prefix}_failures") + 1
            setattr(ep, f"{prefix}_failures", failures)
            if result.latency_ms is not None:
                ep.last_latency_ms = result.latency_ms
            ep.last_checked_at = at
            ep.is_up = _is_up(ep)
        if ep.is_up != was_up:
            ep.last_change_at = at
        ep.save()
        HealthEvent.objects.create(
            endpoint=ep,
            kind=kind,
            ok=result.ok,
            status=result.status,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error[:500],
            created_at=at,
        )
    if not result.counts:
        return ep
    failures = getattr(ep, f"{prefix}_failures")
    threshold = getattr(ep, f"{prefix}_failure_threshold")
    reason = f"{kind} probe ok" if result.ok else f"{kind} probe failed ({result.error})"
    if failures >= threshold:
        reason = f"{kind} probe failed {failures} times in a row ({result.error})"
    now = time.time()
    breaker_apply(
        endpoint=ep.base_url,
        fn=lambda s: (
            breaker.probe_result(
                s,
                ok=result.ok,
                tripping=failures >= threshold,
                # A ping reaching the host says nothing about the HTTP service that tripped
                # the breaker, so only the HTTP probe (when there is one) may close it.
                decides_trial=kind == ProbeKind.HTTP or not ep.http_enabled,
                now=now,
                policy=breaker_policy(),
                reason=reason,
            ),
            None,
        ),
        now=now,
    )
    # First contact that finds the endpoint up is not news; everything else is.
    if ep.is_up != was_up and not (was_up is None and ep.is_up):
        health_change_notify(
            endpoint=ep.base_url,
            event="endpoint.up" if ep.is_up else "endpoint.down",
            previous={True: "up", False: "down", None: "unknown"}[was_up],
            current="up" if ep.is_up else "down",
            reason=reason,
            now=now,
        )
    return ep


def health_events_prune(*, older_than: timedelta | None = None) -> int:
    """Delete probe results older than the retention period, in batches; returns how many."""
    if older_than is None:
        older_than = timedelta(days=settings.LLMROTATE_HEALTH_EVENT_RETENTION_DAYS)
    cutoff = timezone.now() - older_than
    deleted = 0
    while True:
        # Batches keep each transaction (and SQLite's write lock) short.
        ids = list(
            HealthEvent.objects.filter(created_at__lt=cutoff).values_list("pk", flat=True)[
                :_PRUNE_BATCH
            ]
        )
        if not ids:
            return deleted
        deleted += HealthEvent.objects.filter(pk__in=ids).delete()[0]
