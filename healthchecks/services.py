"""Writes of the health checks: endpoints, probe results, breaker transitions, retention.

Probes run in the Celery worker: every few seconds beat runs `probes_dispatch`, which sends a
`probe_run` task for each probe that is due, so that each endpoint keeps its own intervals with
a single schedule entry.

The switches (LLMROTATE_HEALTH_CHECKS, and LLMROTATE_PING_PROBES / LLMROTATE_HTTP_PROBES for each
kind) turn a kind off everywhere, as each endpoint's own `ping_enabled` / `http_enabled` turns
it off there: none is sent, and the endpoint's health rests on the kinds still on. The
dispatcher keeps running with every probe off: it still follows the providers and announces
breakers that half-open, since live traffic still drives them (healthchecks.gate).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TypeVar
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from common.redaction import base_url_masked
from common.upstream import upstream_headers
from healthchecks import breaker
from healthchecks.breaker import BreakerState, BreakerStatus
from healthchecks.breaker_store import Transition, get_breaker_store
from healthchecks.breakers import breaker_announce, breaker_policy
from healthchecks.models import (
    Endpoint,
    HealthEvent,
    ProbeKind,
    ProbeStatus,
    probe_kind_switched_on,
)
from healthchecks.notify import health_change_notify
from healthchecks.probes import ProbeResult, http_probe, ping_probe
from keys.crypto import SecretError
from keys.models import ApiKey, Provider
from keys.secrets import api_key_resolve_secret

logger = logging.getLogger("llmrotate.health")
T = TypeVar("T")

# An echo reply on any sane network comes back well within this; waiting longer only holds a
# worker thread.
PING_TIMEOUT_SECONDS = 2.0
_PRUNE_BATCH = 5000


def breaker_apply(*, endpoint: str, fn: Transition[T], now: float) -> tuple[BreakerState, T]:
    """Run one transition in the shared store and announce every status it passed through."""
    before, after, extra = get_breaker_store().update(endpoint, fn)
    breaker_announce(endpoint=endpoint, before=before, after=after, now=now)
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


def probes_switched_off_forget(*, now: datetime | None = None) -> int:
    """Clear what the probes of each kind switched off had said, so that an endpoint is not
    shown down (or degraded) for good by results nobody will update; returns how many
    endpoints changed. Their status reads `disabled` until the kind is on and probes again.

    Idempotent and cheap: only endpoints not cleared yet are touched. Health changes made
    here are not announced: a setting changed, not the endpoint."""
    now = now or timezone.now()
    kinds = {ProbeKind.PING: "ping", ProbeKind.HTTP: "http"}
    off = [prefix for kind, prefix in kinds.items() if not probe_kind_switched_on(kind)]
    for prefix in kinds.values():
        if prefix not in off:  # on again: "not probed yet" until its first probe answers
            cleared = Endpoint.objects.filter(**{f"{prefix}_status": ProbeStatus.DISABLED})
            # Read first: this runs every beat tick, and on SQLite even an UPDATE that
            # changes nothing takes the write lock the recorder needs.
            if cleared.exists():
                cleared.update(**{f"{prefix}_status": ProbeStatus.UNKNOWN})
    if not off:
        return 0
    stale = Q()
    for prefix in off:
        stale |= ~Q(**{f"{prefix}_status": ProbeStatus.DISABLED})
    changed = 0
    with transaction.atomic():
        # Locked: a probe of the other kind may be recording its result on the same row.
        for ep in Endpoint.objects.select_for_update().filter(stale):
            was = ep.health
            for prefix in off:
                setattr(ep, f"{prefix}_status", ProbeStatus.DISABLED)
                setattr(ep, f"{prefix}_failures", 0)
            if not (ep.ping_on or ep.http_on):
                ep.is_up = None  # nothing probes it any more: unknown, as before any probe
            elif ep.is_up is not None:
                ep.is_up = not _probes_down(ep)
            if ep.health != was:
                ep.last_change_at = now
            ep.save()
            changed += 1
    return changed


def probes_dispatch(*, send: Callable[[int, str], None]) -> int:
    """Send every probe that is due; returns how many. Runs on each beat tick."""
    endpoints_sync()
    breakers_advance(now=time.time())
    probes_switched_off_forget()
    if not (probe_kind_switched_on(ProbeKind.PING) or probe_kind_switched_on(ProbeKind.HTTP)):
        return 0
    now = timezone.now()
    sent = 0
    active = Endpoint.objects.filter(enabled=True, base_url__in=_provider_urls(enabled_only=True))
    for endpoint in active:
        for kind, enabled, interval, field in (
            (ProbeKind.PING, endpoint.ping_on, endpoint.ping_interval_seconds, "next_ping_at"),
            (ProbeKind.HTTP, endpoint.http_on, endpoint.http_interval_seconds, "next_http_at"),
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
    keys = ApiKey.objects.filter(
        enabled=True, provider__enabled=True, provider__base_url__in=[base_url, base_url + "/"]
    ).select_related("provider")
    for key in keys.order_by("priority", "key_id"):
        try:
            secret = api_key_resolve_secret(api_key=key)
        except SecretError:
            continue
        return upstream_headers(key.provider.kind, secret, stream=False)
    return {}


def _probe_claim_trial(*, endpoint: Endpoint, hold_seconds: float) -> bool | None:
    """Before a probe that decides a half-open breaker is sent: claim its one trial.

    True: claimed, the probe is the trial. False: not half-open, the probe goes as usual.
    None: a live request holds the trial, so the probe is not sent (its answer decides)."""
    now = time.time()
    # Nearly always the breaker is closed: a plain read then, and the locking transaction
    # (a row lock, or a Redis WATCH) only for the rare probe that may become the trial.
    # A breaker that half-opens after this read lets the probe go as an ordinary one, which
    # decides nothing (`breaker.probe_result`): no second trial either way.
    stored = breaker.effective(get_breaker_store().get(endpoint.base_url), now=now)
    if stored.status != BreakerStatus.HALF_OPEN:
        return False
    policy = breaker_policy()
    # The slot is held for at least the probe's own timeout.
    hold = replace(policy, trial_timeout_seconds=max(policy.trial_timeout_seconds, hold_seconds))

    def claim(state: BreakerState) -> tuple[BreakerState, bool | None]:
        current = breaker.effective(state, now=now)
        if current.status != BreakerStatus.HALF_OPEN:
            return current, False
        after, claimed = breaker.claim_trial(current, now=now, policy=hold)
        return after, True if claimed else None

    return breaker_apply(endpoint=endpoint.base_url, fn=claim, now=now)[1]


def endpoint_probe(*, endpoint_id: int, kind: str) -> ProbeResult | None:
    """Run one probe and record it. None when the endpoint no longer exists, when its kind
    was switched off after it was queued, or when it is half-open and a live trial request is
    in flight (that request decides; no second trial)."""
    endpoint = Endpoint.objects.filter(pk=endpoint_id).first()
    if endpoint is None or not probe_kind_switched_on(kind):
        return None
    trial = False
    # A ping reaching the host says nothing about the HTTP service that tripped the breaker,
    # so only the HTTP probe (when there is one) may be the half-open trial.
    if kind == ProbeKind.HTTP or not endpoint.http_on:
        timeout = endpoint.http_timeout_seconds if kind == ProbeKind.HTTP else PING_TIMEOUT_SECONDS
        claimed = _probe_claim_trial(endpoint=endpoint, hold_seconds=timeout * 2)
        if claimed is None:
            logger.debug(
                "%s probe of %s skipped: a trial request is in flight",
                kind,
                base_url_masked(endpoint.base_url),
            )
            return None
        trial = claimed
    try:
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
        probe_record(endpoint=endpoint, kind=kind, result=result, trial=trial)
    except BaseException:
        if trial:  # free the slot now rather than after its timeout
            now = time.time()
            breaker_apply(
                endpoint=endpoint.base_url,
                fn=lambda s: (breaker.release_trial(s, now=now), None),
                now=now,
            )
        raise
    return result


def _probes_down(ep: Endpoint) -> bool:
    """Do the probes say the endpoint is down (which opens its breaker)?

    Many providers filter ICMP (Azure, APIs behind Cloudflare): pings that get no reply say
    nothing while the HTTP probe gets answers. So they count only while the HTTP probe fails
    too, or when there is no HTTP probe; otherwise they only make the endpoint `degraded`.
    A kind switched off (here or by the settings) counts as absent.
    """
    return ep.http_down or (ep.ping_down and (not ep.http_on or ep.http_failures > 0))


def _probe_reason(ep: Endpoint, *, kind: str, result: ProbeResult) -> str:
    if result.ok:
        return f"{kind} probe ok"
    failures, threshold = (
        (ep.ping_failures, ep.ping_failure_threshold)
        if kind == ProbeKind.PING
        else (ep.http_failures, ep.http_failure_threshold)
    )
    if failures < threshold:
        reason = f"{kind} probe failed ({result.error})"
    else:
        reason = f"{kind} probe failed {failures} times in a row ({result.error})"
    if kind == ProbeKind.HTTP and _probes_down(ep) and failures < threshold:
        reason += f", and ping failed {ep.ping_failures} times in a row"
    elif kind == ProbeKind.PING and failures >= threshold and ep.http_on:
        reason += (
            ", and the HTTP probe fails too"
            if ep.http_failures
            else "; health rests on the HTTP probe"
        )
    return reason


def probe_record(
    *, endpoint: Endpoint, kind: str, result: ProbeResult, trial: bool = False
) -> Endpoint:
    """Store a probe result, feed the breaker, and announce the endpoint's health changing
    (down, degraded, up). `trial`: the probe claimed the half-open trial before it was sent."""
    at = timezone.now()
    prefix = "ping" if kind == ProbeKind.PING else "http"
    with transaction.atomic():
        # Locked: the ping and HTTP probes of one endpoint may finish at the same moment.
        ep = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
        was = ep.health
        setattr(ep, f"{prefix}_status", result.status)
        if result.counts:
            failures = 0 if result.ok else getattr(ep, f"{prefix}_failures") + 1
            setattr(ep, f"{prefix}_failures", failures)
            if result.latency_ms is not None:
                ep.last_latency_ms = result.latency_ms
            ep.last_checked_at = at
            if result.ok:
                setattr(ep, f"last_{prefix}_ok_at", at)
            ep.is_up = not _probes_down(ep)
        if ep.health != was:
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
    now = time.time()
    if not result.counts:
        if trial:  # an unavailable ping says nothing: the next trial decides
            breaker_apply(
                endpoint=ep.base_url,
                fn=lambda s: (breaker.release_trial(s, now=now), None),
                now=now,
            )
        return ep
    reason = _probe_reason(ep, kind=kind, result=result)
    tripping = not ep.is_up
    breaker_apply(
        endpoint=ep.base_url,
        fn=lambda s: (
            breaker.probe_result(
                s,
                ok=result.ok,
                tripping=tripping,
                trial=trial,
                now=now,
                policy=breaker_policy(),
                reason=reason,
            ),
            None,
        ),
        now=now,
    )
    # First contact that finds the endpoint up is not news; everything else is.
    health = ep.health
    if health != was and not (was == "unknown" and health == "up"):
        health_change_notify(
            endpoint=ep.base_url,
            event=f"endpoint.{health}",
            previous=was,
            current=health,
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
