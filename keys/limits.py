"""Limits and budgets: what a request may use, checked and reserved in one atomic step.

A request is admitted only if every limit that applies to it has room: the client token's, the
route's, the (client, route) pair's, and later, for each attempt, the upstream key's. What it
reserves (one request, its estimated tokens, its estimated cost, a concurrency slot) is taken
from all of them at once or from none; afterwards the estimate is settled from what the call
really used (`Limiter.settle`, from the recorder's thread) and the slot is given back.

The algorithm: **fixed windows aligned to the clock** (the minute, the local day, the local
calendar month) with reservations settled afterwards, and **leases** for concurrency. Chosen
over GCRA and sliding logs because:

- it is exact in the sense operators read: "100 per minute" admits 100 in a minute, across any
  number of processes (one shared counter), and the figures match the dashboard's per-minute
  and per-day rollups. GCRA admits a burst and then a refill rate, so 400 requests over two
  seconds get 103 through a "100 per minute" limit;
- budgets are calendar periods in a time zone; the same code does both;
- its state is one integer per limit and window. A sliding log keeps an entry per request (a
  daily limit of a million requests would be a million entries);
- settling is an addition to the window the reservation was made in, and a reservation held
  for a stream that runs past the minute still lands where it was counted.

The known cost: around a minute boundary up to twice a per-minute limit can pass within a
short time (the end of one window and the start of the next). The daily limits bound the total;
the providers' own per-minute limits behave the same way.

A concurrency slot is a lease with an expiry, not a counter: a process that dies holding one
(SIGKILL, no release) cannot leave the client blocked for good; its slot lapses after the
request deadline.

The two backends (in process, here; Redis, in keys.limits_redis) keep the same keys and apply
the same rule: every meter must satisfy `used + amount <= limit`, every lease set must have
fewer than `limit` live leases.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from functools import lru_cache
from zoneinfo import ZoneInfo

from django.dispatch import Signal

logger = logging.getLogger("llmrotate.limits")

# A budget reached a share of itself (keys.limits.budget_check); healthchecks.notify sends
# the webhooks. Keyword arguments: label, period, percent, budget_usd, spent_usd, resets_at.
budget_threshold_reached = Signal()

MINUTE, DAY, MONTH = "minute", "day", "month"
REQUESTS, TOKENS, USD = "requests", "tokens", "usd"
# Spend is counted in micro-dollars: integers add exactly, in Lua too (doubles hold 2**53).
USD_UNITS = 1_000_000
# A window's counter outlives its window this long, so that a settlement arriving late (a
# stream that ran past the minute, a recorder batch held back) still lands in it.
SETTLE_GRACE_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One configured Limit row: a client's, a route's, or a (client, route) pair's."""

    id: int
    client: str = ""  # the token's name; "" for any client
    route: str = ""  # the route's name; "" for any route
    requests_per_minute: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent: int | None = None
    usd_per_day: Decimal | None = None
    usd_per_month: Decimal | None = None

    @property
    def scope(self) -> str:
        # By id: renaming a client or a route keeps its counters.
        return f"l{self.id}"

    @property
    def label(self) -> str:
        if self.client and self.route:
            return f"client '{self.client}' on '{self.route}'"
        return f"client '{self.client}'" if self.client else f"route '{self.route}'"

    @property
    def has_budget(self) -> bool:
        return self.usd_per_day is not None or self.usd_per_month is not None


@dataclass(slots=True)  # not frozen: built per request (a frozen init is twice as slow)
class Meter:
    """One counter a reservation checks and adds to: a limit in one window."""

    key: str  # storage key: "<scope>:<kind>:<period>:<window>"
    kind: str  # requests | tokens | usd
    period: str  # minute | day | month
    limit: int  # in units: requests, tokens, micro-dollars
    amount: int  # what this request reserves
    resets_at: float  # unix time the window ends
    label: str  # whose limit, for errors and the API

    @property
    def expires_at(self) -> float:
        return self.resets_at + SETTLE_GRACE_SECONDS

    def settled(self, delta: int) -> Settlement:
        return Settlement(self, delta)


@dataclass(frozen=True, slots=True)
class Lease:
    """A set of concurrency slots: fewer than `limit` live leases admit one more."""

    key: str  # "<scope>:inflight"
    limit: int
    label: str


@dataclass(slots=True)  # not frozen: built per request (a frozen init is twice as slow)
class Settlement:
    """Add `delta` to a meter's counter (what a call used, minus what it reserved)."""

    meter: Meter
    delta: int

    @property
    def key(self) -> str:
        return self.meter.key


@dataclass(slots=True)  # not frozen: built per request (a frozen init is twice as slow)
class Decision:
    """The answer of `Limiter.reserve`.

    `used` holds each meter's value after this request (admitted) or before it (refused);
    `inflight` each lease set's live count, the same way. `blocked` is the meter or lease set
    that had no room; `error` says the store could not be asked (Redis away), in which case
    nothing was reserved and the caller applies its fail-open or fail-closed setting.
    """

    allowed: bool
    meters: tuple[Meter, ...] = ()
    used: tuple[int, ...] = ()
    leases: tuple[Lease, ...] = ()
    inflight: tuple[int, ...] = ()
    blocked: Meter | Lease | None = None
    error: bool = False

    def retry_after(self, now: float) -> float:
        """Seconds until the blocking limit may have room again."""
        if isinstance(self.blocked, Meter):
            return max(0.001, self.blocked.resets_at - now)
        # A concurrency slot frees when a call ends: nobody knows when; ask again soon.
        return 1.0


def blocked_index(
    meters: Sequence[Meter], used: Sequence[int], leases: Sequence[Lease], inflight: Sequence[int]
) -> int:
    """The rule both backends apply (the Redis one in Lua): the index of the first meter, then
    lease set, without room, or -1. Meters come first in the index space, then leases."""
    for i, meter in enumerate(meters):
        if used[i] + meter.amount > meter.limit:
            return i
    for j, lease in enumerate(leases):
        if inflight[j] >= lease.limit:
            return len(meters) + j
    return -1


def decision(
    meters: Sequence[Meter],
    used: Sequence[int],
    leases: Sequence[Lease],
    inflight: Sequence[int],
    blocked: int,
) -> Decision:
    """A Decision from a backend's raw answer (`used`, `inflight` as explained there)."""
    if blocked < 0:
        return Decision(True, tuple(meters), tuple(used), tuple(leases), tuple(inflight))
    what: Meter | Lease = (
        meters[blocked] if blocked < len(meters) else leases[blocked - len(meters)]
    )
    return Decision(False, tuple(meters), tuple(used), tuple(leases), tuple(inflight), blocked=what)


@dataclass(slots=True)
class Reservation:
    """What an admitted request (or attempt) holds: its meters' amounts until settled, and its
    concurrency slots until released."""

    decision: Decision
    lease_keys: tuple[str, ...] = ()
    lease_id: str = ""
    _released: bool = False

    def release(self) -> None:
        """Give the concurrency slots back (the request is over). Idempotent; from sync code on
        the event loop."""
        if self._released or not self.lease_keys:
            return
        self._released = True
        get_limiter().release_soon(self.lease_keys, self.lease_id)

    def settlements(self, *, tokens: int, usd: int | None, final: bool) -> list[Settlement]:
        """One record's share of the settlement: the tokens and micro-dollars it used, added;
        and with the request's final record, the estimate reserved up front, taken back. A
        request's records add up to exactly what it used (a failed-over attempt used nothing,
        or what it did use: a stream cut midway). `usd` None: the cost is not known (recording
        is off), and the reservation stands in for it."""
        out: list[Settlement] = []
        for meter in self.decision.meters:
            if meter.kind == TOKENS:
                used = tokens
            elif meter.kind == USD and usd is not None:
                used = usd
            else:
                continue
            delta = used - (meter.amount if final else 0)
            if delta:
                out.append(meter.settled(delta))
        return out


# --- windows -------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=64)
def _calendar_window(period: str, minute: int, zone: str) -> tuple[str, float]:
    """The day or month that contains the minute `minute` (unix minutes) in `zone`: its id and
    the unix time it ends. Every time zone offset in use is a whole number of minutes, so a
    minute never straddles two local days, and this is computed once per minute."""
    tz = _zone(zone)
    local = datetime.fromtimestamp(minute * 60, tz)
    if period == DAY:
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        # Through naive arithmetic and back: a day with a DST change is 23 or 25 hours long.
        end = (start.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=tz)
        return start.date().isoformat(), end.timestamp()
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    end = datetime(year, month, 1, tzinfo=tz)
    return f"{local.year:04d}-{local.month:02d}", end.timestamp()


def window(period: str, now: float, zone: str) -> tuple[str, float]:
    """The window of `period` that contains `now`: its id and when it ends (unix time)."""
    minute = int(now // 60)
    if period == MINUTE:
        return f"m{minute}", (minute + 1) * 60.0
    return _calendar_window(period, minute, zone)


def usd_units(amount: Decimal | float) -> int:
    """Dollars as the integer micro-dollars the counters hold; rounded up, so that a budget is
    never undercounted."""
    return int((Decimal(amount) * USD_UNITS).to_integral_value(rounding=ROUND_CEILING))


# --- meters for a request ------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built per request (a frozen init is twice as slow)
class Estimate:
    """What a request is expected to use, reserved before it runs."""

    tokens: int = 0
    usd: int = 0  # micro-dollars


def spec_meters(spec: LimitSpec, estimate: Estimate, *, now: float, zone: str) -> list[Meter]:
    """The meters of one client limit for a request of `estimate`."""
    out: list[Meter] = []
    for kind, period, limit, amount in (
        (REQUESTS, MINUTE, spec.requests_per_minute, 1),
        (REQUESTS, DAY, spec.requests_per_day, 1),
        (TOKENS, MINUTE, spec.tokens_per_minute, estimate.tokens),
        (TOKENS, DAY, spec.tokens_per_day, estimate.tokens),
        (USD, DAY, None if spec.usd_per_day is None else usd_units(spec.usd_per_day), estimate.usd),
        (
            USD,
            MONTH,
            None if spec.usd_per_month is None else usd_units(spec.usd_per_month),
            estimate.usd,
        ),
    ):
        if limit is None:
            continue
        wid, resets_at = window(period, now, zone)
        out.append(
            Meter(
                key=f"{spec.scope}:{kind}:{period}:{wid}",
                kind=kind,
                period=period,
                limit=int(limit),
                amount=amount,
                resets_at=resets_at,
                label=spec.label,
            )
        )
    return out


def spec_lease(spec: LimitSpec) -> Lease | None:
    if spec.max_concurrent is None:
        return None
    return Lease(key=f"{spec.scope}:inflight", limit=spec.max_concurrent, label=spec.label)


def key_meters(
    key_id: str, *, rpm: int | None, tpm: int | None, tokens: int, now: float
) -> list[Meter]:
    """The meters of an upstream key's own limits (the provider's, per minute)."""
    out: list[Meter] = []
    wid, resets_at = window(MINUTE, now, "UTC")
    for kind, limit, amount in ((REQUESTS, rpm, 1), (TOKENS, tpm, tokens)):
        if limit is not None:
            out.append(
                Meter(
                    key=f"k:{key_id}:{kind}:{MINUTE}:{wid}",
                    kind=kind,
                    period=MINUTE,
                    limit=limit,
                    amount=amount,
                    resets_at=resets_at,
                    label=f"upstream key '{key_id}'",
                )
            )
    return out


# --- the interface and the in-process backend ------------------------------------------------


class Limiter:
    """Check-and-reserve, release and settle; and reads for the API. Async on the hot path,
    sync for the recorder's thread and the monitoring API."""

    async def reserve(
        self, meters: Sequence[Meter], leases: Sequence[Lease], *, lease_id: str, lease_until: float
    ) -> Decision:
        raise NotImplementedError

    async def release(self, lease_keys: Sequence[str], lease_id: str) -> None:
        raise NotImplementedError

    def release_soon(self, lease_keys: Sequence[str], lease_id: str) -> None:
        """`release` from synchronous code on the event loop (a request's end)."""
        from common.background import spawn

        spawn(self.release(lease_keys, lease_id))

    def settle(self, settlements: Sequence[Settlement]) -> list[int | None]:
        """Apply the deltas; each counter's new value, None where its window is gone (or the
        store could not be reached)."""
        raise NotImplementedError

    def mark_once(self, key: str, *, expires_at: float) -> bool:
        """True the first time `key` is marked until `expires_at`, in every process."""
        raise NotImplementedError

    def read(self, keys: Sequence[str], lease_keys: Sequence[str], *, now: float) -> Reading:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Reading:
    """Counter values (0 where absent) and live lease counts, or `error` if unreadable."""

    used: tuple[int, ...] = ()
    inflight: tuple[int, ...] = ()
    error: bool = False


@dataclass(slots=True)
class MemoryLimiter(Limiter):
    """The embedded backend: this process's counters. Guarded by a lock (not the event loop
    alone): the recorder's thread settles, the monitoring API reads."""

    _counters: dict[str, list[float]] = field(default_factory=dict)  # key -> [value, expires]
    _leases: dict[str, dict[str, float]] = field(default_factory=dict)  # key -> {id: until}
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_sweep: float = 0.0

    async def reserve(
        self, meters: Sequence[Meter], leases: Sequence[Lease], *, lease_id: str, lease_until: float
    ) -> Decision:
        now = time.time()
        with self._lock:
            self._sweep(now)
            used = [self._value(m.key, now) for m in meters]
            inflight = [self._live(lease.key, now) for lease in leases]
            blocked = blocked_index(meters, used, leases, inflight)
            if blocked < 0:
                for i, m in enumerate(meters):
                    entry = self._counters.setdefault(m.key, [0, m.expires_at])
                    entry[0] += m.amount
                    used[i] = int(entry[0])
                for j, lease in enumerate(leases):
                    self._leases.setdefault(lease.key, {})[lease_id] = lease_until
                    inflight[j] += 1
        return decision(meters, used, leases, inflight, blocked)

    async def release(self, lease_keys: Sequence[str], lease_id: str) -> None:
        self.release_soon(lease_keys, lease_id)

    def release_soon(self, lease_keys: Sequence[str], lease_id: str) -> None:
        # At once: no I/O here, and a task per request would cost more than the release.
        with self._lock:
            for key in lease_keys:
                held = self._leases.get(key)
                if held is not None:
                    held.pop(lease_id, None)

    def settle(self, settlements: Sequence[Settlement]) -> list[int | None]:
        out: list[int | None] = []
        with self._lock:
            for s in settlements:
                entry = self._counters.get(s.key)
                if entry is None:  # a window already gone keeps nothing to settle
                    out.append(None)
                    continue
                entry[0] = max(0, entry[0] + s.delta)
                out.append(int(entry[0]))
        return out

    def mark_once(self, key: str, *, expires_at: float) -> bool:
        now = time.time()
        with self._lock:
            entry = self._counters.get(key)
            if entry is not None and entry[1] > now:
                return False
            self._counters[key] = [1, expires_at]
            return True

    def read(self, keys: Sequence[str], lease_keys: Sequence[str], *, now: float) -> Reading:
        with self._lock:
            return Reading(
                tuple(self._value(k, now) for k in keys),
                tuple(self._live(k, now) for k in lease_keys),
            )

    def clear(self) -> None:
        with self._lock:
            self._counters.clear()
            self._leases.clear()

    def _value(self, key: str, now: float) -> int:
        entry = self._counters.get(key)
        if entry is None or entry[1] <= now:
            return 0
        return int(entry[0])

    def _live(self, key: str, now: float) -> int:
        held = self._leases.get(key)
        if not held:
            return 0
        for lease_id in [i for i, until in held.items() if until <= now]:
            del held[lease_id]
        return len(held)

    def _sweep(self, now: float) -> None:
        # Old windows go once a minute, in one pass, rather than a check on every read.
        if now < self._next_sweep:
            return
        self._next_sweep = now + 60
        for key in [k for k, (_, expires) in self._counters.items() if expires <= now]:
            del self._counters[key]


# --- settling, and budget alerts ------------------------------------------------------------


def limits_settle(settlements: Sequence[Settlement]) -> None:
    """Settle (from the recorder's thread), then raise the budget alerts the new spend calls
    for (LLMROTATE_BUDGET_ALERT_PERCENTS of a USD limit, once per budget, window and share)."""
    if not settlements:
        return
    limiter = get_limiter()
    values = limiter.settle(settlements)
    for settlement, value in zip(settlements, values, strict=True):
        if settlement.meter.kind == USD and value is not None:
            budget_check(limiter, settlement.meter, value)


def budget_check(limiter: Limiter, meter: Meter, spent: int, *, refused: bool = False) -> None:
    """The alerts `spent` calls for; `refused`: a request found no room left in the budget,
    which is then as good as spent (what remains is less than a request needs)."""
    from django.conf import settings

    reached = meter.limit if refused else spent
    for percent in sorted(settings.LLMROTATE_BUDGET_ALERT_PERCENTS):
        if meter.limit <= 0 or reached * 100 < meter.limit * percent:
            break
        if limiter.mark_once(f"{meter.key}:alert:{percent}", expires_at=meter.expires_at):
            budget_threshold_reached.send(
                sender=Limiter,
                label=meter.label,
                period=meter.period,
                percent=percent,
                budget_usd=meter.limit / USD_UNITS,
                spent_usd=spent / USD_UNITS,
                resets_at=meter.resets_at,
            )


# --- the process's limiter -------------------------------------------------------------------

_limiter: Limiter | None = None
_limiter_lock = threading.Lock()


def get_limiter() -> Limiter:
    """The process-wide limiter: Redis when `settings.REDIS_URL` is set, else in process."""
    global _limiter
    if _limiter is None:
        with _limiter_lock:
            if _limiter is None:
                from django.conf import settings

                url = getattr(settings, "REDIS_URL", "")
                if url:
                    from keys.limits_redis import RedisLimiter

                    _limiter = RedisLimiter(
                        url,
                        prefix=getattr(settings, "LLMROTATE_REDIS_PREFIX", "llmrotate:") + "lim:",
                        timeout=settings.LLMROTATE_LIMITS_REDIS_TIMEOUT_SECONDS,
                    )
                else:
                    _limiter = MemoryLimiter()
    return _limiter


def reset_limiter() -> None:
    """Forget the singleton (tests, or after changing settings)."""
    global _limiter
    with _limiter_lock:
        old, _limiter = _limiter, None
    close = getattr(old, "close", None)
    if close is not None:
        close()
