"""Reads: the endpoint health shown by /internal/health, the ninja API, the admin and the
dashboard's Health page, and the probe history behind that page's latency lines.

Endpoints are told apart by their row (or, before the worker has created it, their provider's
base URL), never by the URL as shown: masking hides what may be all that differs between two
(`https://a:x@host/v1` and `https://b:y@host/v1`). A URL is masked only where it is shown.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import CharField, Count, Expression, Q, Sum
from django.db.models.functions import Cast, Substr, Trunc

from common.redaction import base_url_masked
from common.timeframes import TimeFrame
from common.timestamps import datetime_from_epoch
from healthchecks import breaker
from healthchecks.breaker import BreakerState, BreakerStatus
from healthchecks.breaker_store import get_breaker_store
from healthchecks.models import (
    Endpoint,
    HealthEvent,
    ProbeKind,
    ProbeStatus,
    probe_kind_switched_on,
)
from keys.models import Provider


@dataclass(frozen=True)
class EndpointHealth:
    endpoint: str  # the base URL as fit to show (common.redaction.base_url_masked)
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


@dataclass(frozen=True)
class EndpointEntry:
    """One endpoint as listed: `health` is what is shown; `endpoint_id` (None until the
    worker has created the endpoint's row) is how it is told apart and found again."""

    endpoint_id: int | None
    health: EndpointHealth


def _when(epoch: float) -> datetime | None:
    return datetime_from_epoch(epoch)


def breaker_state_of(*, endpoint: str, now: float | None = None) -> BreakerState:
    now = time.time() if now is None else now
    return breaker.effective(get_breaker_store().get(endpoint), now=now)


def probe_last_success() -> list[tuple[str, str, float]]:
    """(endpoint as fit to show, probe kind, epoch seconds) of the last successful probe of
    each kind, for the endpoints probed at least once successfully."""
    out = []
    rows = Endpoint.objects.values_list("base_url", "last_ping_ok_at", "last_http_ok_at")
    for url, ping_at, http_at in rows.order_by("base_url"):
        for kind, at in ((ProbeKind.PING, ping_at), (ProbeKind.HTTP, http_at)):
            if at is not None:
                out.append((base_url_masked(url), kind.value, at.timestamp()))
    return out


def _listed_urls() -> dict[str, list[str]]:
    """The endpoints listed (those of enabled providers): base URL -> provider names."""
    providers: dict[str, list[str]] = {}
    for name, url in Provider.objects.filter(enabled=True).values_list("name", "base_url"):
        providers.setdefault(url.rstrip("/"), []).append(name)
    return providers


def endpoint_health_list() -> list[EndpointEntry]:
    """Every enabled provider's endpoint, probed or not, with its breaker."""
    now = time.time()
    providers = _listed_urls()
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
        shown = EndpointHealth(
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
        out.append(EndpointEntry(endpoint_id=row.pk if row else None, health=shown))
    return out


def _report_keys(entries: list[EndpointEntry]) -> list[str]:
    """Each entry's key in the report: its shown URL, unless masking makes that the same for
    several; then each of them is `<shown URL>#<endpoint id>` (`#new-<n>` while the worker has
    not created the endpoint yet)."""
    shown = Counter(entry.health.endpoint for entry in entries)
    new: Counter[str] = Counter()
    keys = []
    for entry in entries:
        url = entry.health.endpoint
        if shown[url] == 1:
            keys.append(url)
        elif entry.endpoint_id is not None:
            keys.append(f"{url}#{entry.endpoint_id}")
        else:
            new[url] += 1
            keys.append(f"{url}#new-{new[url]}")
    return keys


# The key of the summary inside `endpoint_health`, beside the endpoints (keyed by URL, which
# always has a scheme, so no endpoint can take it).
SUMMARY_KEY = "summary"


def endpoint_health_report() -> dict[str, Any]:
    """{"endpoint_health": {"summary": {...}, shown URL: {...}, ...}, "summary": {...}}.

    The summary is in both places: at the top as it always was, and inside `endpoint_health`
    with LLM Interactive Proxy's names as well (`jq '.endpoint_health.summary'` works)."""
    entries = endpoint_health_list()
    healthy = sum(1 for entry in entries if entry.health.healthy)
    keys = _report_keys(entries)
    summary = {"total": len(entries), "healthy": healthy, "unhealthy": len(entries) - healthy}
    lip_names = {
        "total_endpoints": summary["total"],
        "healthy_endpoints": summary["healthy"],
        "unhealthy_endpoints": summary["unhealthy"],
    }
    endpoints = {key: asdict(entry.health) for key, entry in zip(keys, entries, strict=True)}
    return {
        "endpoint_health": {SUMMARY_KEY: summary | lip_names, **endpoints},
        "summary": summary,
    }


def _in_frame(frame: TimeFrame) -> Q:
    q = Q()
    if frame.since:
        q &= Q(created_at__gte=frame.since)
    if frame.until:
        q &= Q(created_at__lt=frame.until)
    return q


def health_events_recent(
    *, endpoint: Endpoint, limit: int = 20, frame: TimeFrame | None = None
) -> list[HealthEvent]:
    """The newest probe results, both kinds mixed; within `frame` if given. By the
    (endpoint, created_at) index."""
    events = endpoint.events.all() if frame is None else endpoint.events.filter(_in_frame(frame))
    return list(events.order_by("-created_at", "-id")[:limit])


# --- probe history -----------------------------------------------------------------------------
# A ping's round trip and an HTTP probe's response time are different measures on different
# scales: one line through both says nothing true about either, so each kind has its own.

POINTS = 60  # at most, per line: enough for a sparkline's shape, few enough to read
KINDS = (ProbeKind.HTTP.value, ProbeKind.PING.value)  # the order the page shows them in
_UNITS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}
# SQLite stores a datetime as 'YYYY-MM-DD HH:MM:SS[.ffffff]' (UTC): a prefix is its bucket.
_SQLITE_PREFIX = {"minute": 16, "hour": 13, "day": 10}


@dataclass
class KindHistory:
    """One probe kind of one endpoint over the frame."""

    points: list[tuple[float, float]] = field(default_factory=list)  # (0..1, mean ms of ok)
    failures: list[float] = field(default_factory=list)  # where (0..1) at least one failed
    probes: int = 0
    failed: int = 0

    @property
    def low(self) -> float | None:
        return min((v for _, v in self.points), default=None)

    @property
    def high(self) -> float | None:
        return max((v for _, v in self.points), default=None)


@dataclass
class ProbeHistory:
    kinds: dict[str, KindHistory] = field(
        default_factory=lambda: {kind: KindHistory() for kind in KINDS}
    )
    timeline: list[HealthEvent] = field(default_factory=list)  # newest first

    @property
    def probes(self) -> int:
        return sum(k.probes for k in self.kinds.values())

    @property
    def failed(self) -> int:
        return sum(k.failed for k in self.kinds.values())


def _unit(frame: TimeFrame, *, now: datetime) -> str:
    """The database's bucket: fine enough for POINTS bins over the frame, coarse enough that
    a week of probes every 30 s is a few hundred rows, not tens of thousands."""
    retention = timedelta(days=settings.LLMROTATE_HEALTH_EVENT_RETENTION_DAYS)
    span = (frame.until or now) - (frame.since or now - retention)
    if span <= timedelta(days=1):
        return "minute"
    return "hour" if span <= timedelta(days=60) else "day"


def _bucket(unit: str) -> Expression:
    if connection.vendor == "sqlite":
        # Django's Trunc runs a Python function per row on SQLite, five times slower than
        # this over a week of probes (measured: 0.7 s against 0.15 s for 120k results).
        return Substr(Cast("created_at", CharField()), 1, _SQLITE_PREFIX[unit])
    return Trunc("created_at", unit, tzinfo=UTC)


def _start(bucket: Any) -> datetime:
    if isinstance(bucket, str):
        return datetime.fromisoformat(bucket).replace(tzinfo=UTC)
    return bucket.astimezone(UTC)


def _lines(rows: list[dict[str, Any]], unit: timedelta) -> KindHistory:
    """Database buckets (oldest first) merged into at most POINTS bins over the span they
    cover, so that the line runs from the first probe in the frame to the last."""
    first, last = _start(rows[0]["bucket"]), _start(rows[-1]["bucket"]) + unit
    bins = max(1, min(POINTS, round((last - first) / unit)))
    width = (last - first) / bins
    sums: dict[int, list[float]] = {}
    failed_bins: set[int] = set()
    history = KindHistory()
    for row in rows:
        index = min(bins - 1, int((_start(row["bucket"]) - first) / width))
        if row["samples"]:
            acc = sums.setdefault(index, [0.0, 0])
            acc[0] += row["latency_sum"]
            acc[1] += row["samples"]
        if row["failed"]:
            failed_bins.add(index)
        history.probes += row["probes"]
        history.failed += row["failed"]
    span = max(bins - 1, 1)
    history.points = [(i / span, total / n) for i, (total, n) in sorted(sums.items())]
    history.failures = [i / span for i in sorted(failed_bins)]
    return history


def health_history(*, frame: TimeFrame, now: datetime, timeline: int) -> dict[int, ProbeHistory]:
    """The probe history in `frame` of every endpoint `endpoint_health_list()` lists, by
    endpoint id: per probe kind, the latency line, where probes failed and how many ran; and
    the newest `timeline` results. One grouped query for the lines, one per endpoint for the
    results."""
    endpoints = list(Endpoint.objects.filter(base_url__in=list(_listed_urls())))
    unit = _unit(frame, now=now)
    rows = (
        HealthEvent.objects.filter(_in_frame(frame), endpoint_id__in=[e.pk for e in endpoints])
        .annotate(bucket=_bucket(unit))
        .values("endpoint_id", "kind", "bucket")
        .annotate(
            # Failed probes have no meaningful latency (a timeout, a refused connection):
            # the line is of the ones that answered; failures are marked on it instead.
            latency_sum=Sum("latency_ms", filter=Q(ok=True)),
            samples=Count("latency_ms", filter=Q(ok=True)),
            probes=Count("id"),
            failed=Count("id", filter=Q(ok=False)),
        )
        .order_by("endpoint_id", "kind", "bucket")
    )
    grouped: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["endpoint_id"], row["kind"]), []).append(dict(row))
    return {
        endpoint.pk: ProbeHistory(
            kinds={
                kind: _lines(grouped[(endpoint.pk, kind)], _UNITS[unit])
                if (endpoint.pk, kind) in grouped
                else KindHistory()
                for kind in KINDS
            },
            timeline=health_events_recent(endpoint=endpoint, limit=timeline, frame=frame),
        )
        for endpoint in endpoints
    }


@dataclass(frozen=True)
class ProbeFreshness:
    """Are the probes running? `state`: `ok`, `stale` (no result for longer than the probed
    endpoints' intervals allow: the Celery worker or beat is not running) or `off` (nothing
    to probe, or probes switched off)."""

    state: str
    last_result_age_seconds: float | None = None
    stale_after_seconds: float | None = None


def probes_freshness(*, now: datetime | None = None) -> ProbeFreshness:
    """The newest probe result against what the intervals promise.

    Probes are sent by beat and run on the worker: when either stops, results stop coming and
    routing goes on from the last known health. An endpoint not yet probed counts from its
    creation, and a provider the worker has not made an endpoint for yet from the provider's,
    so a gateway that never had a worker is found out too.
    """
    from django.utils import timezone

    now = now or timezone.now()
    pinging = probe_kind_switched_on(ProbeKind.PING)
    http = probe_kind_switched_on(ProbeKind.HTTP)
    providers = Provider.objects.filter(enabled=True)
    if not (pinging or http) or not providers.exists():
        return ProbeFreshness("off")
    # As probes_dispatch does: the endpoints of enabled providers only; and pings where this
    # host cannot ping (ICMP unavailable) leave no result to go by.
    urls = [url.rstrip("/") for url in providers.values_list("base_url", flat=True)]
    rows = list(Endpoint.objects.filter(enabled=True, base_url__in=urls))

    def pinged(ep: Endpoint) -> bool:
        return ep.ping_on and ep.ping_status != ProbeStatus.UNAVAILABLE

    endpoints = [ep for ep in rows if pinged(ep) or ep.http_on]
    if rows and not endpoints:
        return ProbeFreshness("off")  # every endpoint's probes switched off in the admin
    if endpoints:
        intervals = [ep.ping_interval_seconds for ep in endpoints if pinged(ep)]
        intervals += [ep.http_interval_seconds for ep in endpoints if ep.http_on]
        since = [ep.last_checked_at or ep.created_at for ep in endpoints]
    else:
        intervals = [settings.LLMROTATE_PING_INTERVAL_SECONDS] if pinging else []
        intervals += [settings.LLMROTATE_HTTP_PROBE_INTERVAL_SECONDS] if http else []
        since = [providers.order_by("created_at").values_list("created_at", flat=True)[0]]
    # Three missed intervals of the most frequent probe, and two beat ticks for the dispatch.
    shortest = min(intervals)
    stale_after = 3 * shortest + 2 * settings.LLMROTATE_PROBE_TICK_SECONDS
    age = max(0.0, (now - max(since)).total_seconds())
    return ProbeFreshness("stale" if age > stale_after else "ok", round(age, 1), stale_after)
