"""The Health page's probe history over the selected time frame: per endpoint and probe kind,
the latency line, where probes failed and how many ran; and the newest results for the
timeline.

healthchecks.selectors offers the newest N results of an endpoint, both kinds mixed and
regardless of any frame. A ping's round trip and an HTTP probe's response time are different
measures on different scales, so one line through both says nothing true about either; and the
page's time frame should mean what it says. These reads move to healthchecks.selectors once it
has a selector for latencies per probe kind in a frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import CharField, Count, Expression, Q, Sum
from django.db.models.functions import Cast, Substr, Trunc

from healthchecks.models import Endpoint, HealthEvent, ProbeKind
from keys.crypto import base_url_masked
from usage.timeframes import TimeFrame

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
    kinds: dict[str, KindHistory] = field(default_factory=dict)
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


def _in_frame(frame: TimeFrame) -> Q:
    q = Q()
    if frame.since:
        q &= Q(created_at__gte=frame.since)
    if frame.until:
        q &= Q(created_at__lt=frame.until)
    return q


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


def probe_history(*, frame: TimeFrame, now: datetime, timeline: int) -> dict[str, ProbeHistory]:
    """Every endpoint's history in the frame, keyed like `endpoint_health_list()` keys its
    entries (the public URL). One grouped query for the lines, one per endpoint (by its
    (endpoint, created_at) index) for the newest `timeline` results."""
    unit = _unit(frame, now=now)
    rows = (
        HealthEvent.objects.filter(_in_frame(frame))
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
    out = {}
    for endpoint in Endpoint.objects.all():
        kinds = {
            kind: _lines(grouped[(endpoint.pk, kind)], _UNITS[unit])
            if (endpoint.pk, kind) in grouped
            else KindHistory()
            for kind in KINDS
        }
        events = endpoint.events.filter(_in_frame(frame)).order_by("-created_at", "-id")
        out[base_url_masked(endpoint.base_url)] = ProbeHistory(
            kinds=kinds, timeline=list(events[:timeline])
        )
    return out
