"""Reads for the limits' monitoring (`GET /api/limits`, the dashboard's Limits page): every
configured limit with what is used of it now, the upstream keys' own limits, and each client's
spend this day and month against its budget.

Two sources, on purpose. The meters come from the limiter's counters (keys.limits): what the
gateway enforces, reservations of requests still running included, reset at each window's end.
The spend comes from the rollups (the recorded cost of finished calls): what was really spent,
the same figures as /api/usage. Both read only counters and rollups, never raw call records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from django.conf import settings

from common.timeframes import TimeFrame
from keys.limits import (
    USD,
    USD_UNITS,
    Estimate,
    LimitSpec,
    Meter,
    get_limiter,
    key_meters,
    spec_lease,
    spec_meters,
)
from keys.routing import RoutingSnapshot, UpstreamKey, routing_snapshot_sync
from usage.filters import UsageFilters
from usage.selectors import usage_totals_by


@dataclass(frozen=True, slots=True)
class MeterUsage:
    """One limit in its current window. USD in dollars; `used`/`remaining` None when the
    limiter's store could not be read."""

    kind: str  # requests | tokens | usd
    period: str  # minute | day | month
    limit: float
    used: float | None
    remaining: float | None
    resets_at: datetime

    @property
    def share(self) -> float | None:
        """Used, as a percentage of the limit (0..100), for the dashboard's bars."""
        if self.used is None:
            return None
        if self.limit <= 0:
            return 100.0
        return min(100.0, self.used / self.limit * 100)


@dataclass(frozen=True, slots=True)
class ConcurrencyUsage:
    limit: int
    in_flight: int | None


@dataclass(frozen=True, slots=True)
class LimitUsage:
    id: int
    client: str | None
    route: str | None
    meters: tuple[MeterUsage, ...]
    concurrency: ConcurrencyUsage | None


@dataclass(frozen=True, slots=True)
class KeyLimitUsage:
    key_id: str
    provider: str
    meters: tuple[MeterUsage, ...]


@dataclass(frozen=True, slots=True)
class ClientSpend:
    client: str
    revoked: bool
    spend_day: float
    spend_month: float
    budget_day: float | None
    budget_month: float | None


@dataclass(frozen=True, slots=True)
class LimitsOverview:
    time_zone: str
    now: datetime
    limits: tuple[LimitUsage, ...] = ()
    keys: tuple[KeyLimitUsage, ...] = ()
    clients: tuple[ClientSpend, ...] = ()
    store_error: bool = False


def _dollars(amount: Decimal | None) -> float | None:
    return None if amount is None else float(amount)


def _meter_usage(meter: Meter, used: int | None) -> MeterUsage:
    scale = USD_UNITS if meter.kind == USD else 1
    return MeterUsage(
        kind=meter.kind,
        period=meter.period,
        limit=meter.limit / scale,
        used=None if used is None else used / scale,
        remaining=None if used is None else max(0, meter.limit - used) / scale,
        resets_at=datetime.fromtimestamp(meter.resets_at, UTC),
    )


def _limited_keys(snapshot: RoutingSnapshot) -> list[UpstreamKey]:
    """Keys the proxy can route to that carry a provider's limit (rpm or tpm), once each: a key
    no route reaches is never called, so no limit of it is enforced."""
    found: dict[str, UpstreamKey] = {}
    for route in snapshot.configured_routes():
        for deployment in route.deployments:
            for key in deployment.provider.keys:
                if key.rpm is not None or key.tpm is not None:
                    found.setdefault(key.key_id, key)
    return sorted(found.values(), key=lambda k: (k.provider, k.key_id))


def period_starts(now: datetime, zone: str) -> tuple[datetime, datetime]:
    """The start of the local day and of the local month that contain `now`, in UTC: the
    windows the budgets count in (keys.limits.window)."""
    local = now.astimezone(ZoneInfo(zone))
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.astimezone(UTC), day.replace(day=1).astimezone(UTC)


def client_spend(*, now: datetime, zone: str) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    """Recorded cost per client this local day and this local month, from the rollups. Hour
    and day rows answer whole hours; a zone off the whole hour reads its edge from minute
    rows (or, past their retention, from the hour it falls in)."""
    day_start, month_start = period_starts(now, zone)
    spent: list[dict[str, Decimal]] = []
    for since in (day_start, month_start):
        rows = usage_totals_by(
            group=("client",), frame=TimeFrame(since=since), filters=UsageFilters(), now=now
        )
        spent.append({key[0]: totals.cost_usd for key, totals in rows})
    return spent[0], spent[1]


def limits_overview(*, now: datetime | None = None) -> LimitsOverview:
    """Every client/route limit and upstream key limit with its current use, and every client
    token's spend this day and month with its budget (its own limit's, if it has one)."""
    moment = now or datetime.now(UTC)
    stamp = moment.timestamp()
    zone = settings.LLMROTATE_LIMITS_TIME_ZONE
    snapshot = routing_snapshot_sync()
    specs: list[LimitSpec] = sorted(
        snapshot.limits.values(), key=lambda s: (s.client == "", s.client, s.route, s.id)
    )
    limit_meters = [spec_meters(s, Estimate(), now=stamp, zone=zone) for s in specs]
    leases = [spec_lease(s) for s in specs]
    keys = _limited_keys(snapshot)
    keys_meters = [key_meters(k.key_id, rpm=k.rpm, tpm=k.tpm, tokens=0, now=stamp) for k in keys]

    all_meters = [m for group in (*limit_meters, *keys_meters) for m in group]
    lease_keys = [lease.key for lease in leases if lease is not None]
    reading = get_limiter().read([m.key for m in all_meters], lease_keys, now=stamp)
    used: dict[str, int] = {}
    inflight: dict[str, int] = {}
    if not reading.error:
        used = dict(zip((m.key for m in all_meters), reading.used, strict=True))
        inflight = dict(zip(lease_keys, reading.inflight, strict=True))

    def meters_of(group: Sequence[Meter]) -> tuple[MeterUsage, ...]:
        return tuple(_meter_usage(m, used.get(m.key)) for m in group)

    limits = tuple(
        LimitUsage(
            id=spec.id,
            client=spec.client or None,
            route=spec.route or None,
            meters=meters_of(group),
            concurrency=None
            if lease is None
            else ConcurrencyUsage(limit=lease.limit, in_flight=inflight.get(lease.key)),
        )
        for spec, group, lease in zip(specs, limit_meters, leases, strict=True)
    )
    key_usage = tuple(
        KeyLimitUsage(key_id=k.key_id, provider=k.provider, meters=meters_of(group))
        for k, group in zip(keys, keys_meters, strict=True)
    )

    day, month = client_spend(now=moment, zone=zone)
    # A client's budget is its own limit's (any route); a (client, route) pair's budget is a
    # limit of that route alone, shown with the limits.
    budgets = {s.client: s for s in specs if s.client and not s.route}
    clients = []
    tokens = {t.name: t.revoked for t in snapshot.tokens.values()}
    for name, revoked in sorted(tokens.items()):
        budget = budgets.get(name)
        clients.append(
            ClientSpend(
                client=name,
                revoked=revoked,
                spend_day=float(day.get(name, 0)),
                spend_month=float(month.get(name, 0)),
                budget_day=_dollars(budget.usd_per_day) if budget else None,
                budget_month=_dollars(budget.usd_per_month) if budget else None,
            )
        )
    return LimitsOverview(
        time_zone=zone,
        now=moment,
        limits=limits,
        keys=key_usage,
        clients=tuple(clients),
        store_error=reading.error,
    )
