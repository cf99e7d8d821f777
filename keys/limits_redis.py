"""The limiter shared by every process through Redis: each check-and-reserve is one Lua script,
so no two processes can both take the last unit of a limit (keys.limits has the algorithm).

Redis away (or too slow: each call on the request path is cut at
LLMROTATE_LIMITS_REDIS_TIMEOUT_SECONDS, retries and pool waits included) is a
Decision with `error` set; the proxy then admits (fail open, the default) or refuses (fail
closed) as configured. After a failure the limiter does not ask Redis again for a couple of
seconds, so an outage costs one timeout, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from redis.exceptions import NoScriptError, RedisError

from common import metrics
from common.background import spawn
from common.redis_clients import Outage, RedisClients
from keys.limits import Decision, Lease, Limiter, Meter, Reading, Settlement, decision

logger = logging.getLogger("llmrotate.limits")

# A lease given back waits at most this long for this process's next reservation to carry it;
# then it goes on its own. Other processes see the slot free this much later at worst.
_RELEASE_DELAY_SECONDS = 0.005
# Releases kept for a retry while Redis is away; past this many the oldest lapse on their own.
_RELEASES_MAX = 10_000

# KEYS: the meters' counters, the lease sets, then lease sets to give a lease back to.
# ARGV: number of meters, number of lease sets, now (ms), lease id, lease expiry (ms), then per
# meter: limit, amount, expiry (unix s); per lease set: limit; per lease given back: its id.
# Returns: the index (1-based) of what had no room or 0, then each meter's value (after, if
# admitted), then each lease set's live count (likewise). The rule is keys.limits.blocked_index.
# The leases given back are this process's, released since its last call (release_soon): they
# ride along instead of costing a round trip each, and go first, so their slots count as free.
_RESERVE_LUA = """
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local given = n + m
local ids = 5 + 3 * n + m
for i = given + 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[ids + i - given]) end
local out = {0}
local blocked = 0
for i = 1, n do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  out[i + 1] = v
  local b = 6 + (i - 1) * 3
  if blocked == 0 and v + tonumber(ARGV[b + 1]) > tonumber(ARGV[b]) then blocked = i end
end
for j = 1, m do
  local k = KEYS[n + j]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local c = redis.call('ZCARD', k)
  out[n + j + 1] = c
  if blocked == 0 and c >= tonumber(ARGV[5 + 3 * n + j]) then blocked = n + j end
end
out[1] = blocked
if blocked == 0 then
  for i = 1, n do
    local b = 6 + (i - 1) * 3
    out[i + 1] = redis.call('INCRBY', KEYS[i], ARGV[b + 1])
    redis.call('EXPIREAT', KEYS[i], ARGV[b + 2])
  end
  for j = 1, m do
    local k = KEYS[n + j]
    redis.call('ZADD', k, ARGV[5], ARGV[4])
    redis.call('PEXPIREAT', k, ARGV[5])
    out[n + j + 1] = out[n + j + 1] + 1
  end
end
return out
"""

# KEYS: counters; ARGV: a delta per counter. A window that expired keeps nothing to settle
# (and must not be recreated without an expiry); none goes below zero.
_SETTLE_LUA = """
local out = {}
for i = 1, #KEYS do
  out[i] = -1
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local v = redis.call('INCRBY', KEYS[i], ARGV[i])
    if v < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
      v = 0
    end
    out[i] = v
  end
end
return out
"""

# KEYS: lease sets; ARGV: the lease id to remove from each.
_RELEASE_LUA = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i]) end
return 0
"""

# KEYS: counters, then lease sets; ARGV: number of counters, now (ms).
_READ_LUA = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do out[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
for j = n + 1, #KEYS do
  out[j] = redis.call('ZCOUNT', KEYS[j], '(' .. ARGV[2], '+inf')
end
return out
"""


class RedisLimiter(Limiter):
    def __init__(self, url: str, *, prefix: str = "llmrotate:lim:", timeout: float = 0.1) -> None:
        self.prefix = prefix
        self._url = url
        self._timeout = timeout
        self._clients = RedisClients(url, timeout=timeout)
        self._reserve = self._clients.sync.register_script(_RESERVE_LUA)
        self._settle = self._clients.sync.register_script(_SETTLE_LUA)
        self._read = self._clients.sync.register_script(_READ_LUA)
        self._outage_watch = Outage(url)
        # (lease set, lease id) given back and not yet sent to Redis (release_soon).
        self._releases: list[tuple[str, str]] = []
        self._release_timer: asyncio.TimerHandle | None = None

    async def reserve(
        self, meters: Sequence[Meter], leases: Sequence[Lease], *, lease_id: str, lease_until: float
    ) -> Decision:
        if self._outage_watch.down:
            return Decision(False, error=True)
        now = time.time()
        given, self._releases = self._releases, []
        keys = [self.prefix + m.key for m in meters] + [self.prefix + lease.key for lease in leases]
        keys += [key for key, _ in given]
        args: list[int | str] = [
            len(meters),
            len(leases),
            int(now * 1000),
            lease_id,
            int(lease_until * 1000),
        ]
        for m in meters:
            args += [m.limit, m.amount, int(m.expires_at)]
        args += [lease.limit for lease in leases]
        args += [gone for _, gone in given]
        try:
            # One bound for the whole call, whatever the client's own retries and pool waits
            # add up to: a Redis that accepts connections and never answers costs this much.
            async with asyncio.timeout(self._timeout):
                client = self._clients.aclient()
                try:
                    raw = await client.evalsha(self._reserve.sha, len(keys), *keys, *args)
                except NoScriptError:  # a Redis restarted (or flushed) since: load it again
                    raw = await client.eval(_RESERVE_LUA, len(keys), *keys, *args)
        except (RedisError, TimeoutError) as exc:
            self._outage(exc)
            self._keep(given)
            return Decision(False, error=True)
        values = [int(v) for v in raw]
        n = len(meters)
        return decision(meters, values[1 : n + 1], leases, values[n + 1 :], values[0] - 1)

    async def release(self, lease_keys: Sequence[str], lease_id: str) -> None:
        await self._send_releases([(self.prefix + key, lease_id) for key in lease_keys])

    def release_soon(self, lease_keys: Sequence[str], lease_id: str) -> None:
        """Queue the release for this process's next reservation to carry (the common case
        under traffic: one round trip instead of two per request), or for a timer to send
        within _RELEASE_DELAY_SECONDS when no reservation comes."""
        self._releases += [(self.prefix + key, lease_id) for key in lease_keys]
        if self._release_timer is None:
            loop = asyncio.get_running_loop()
            self._release_timer = loop.call_later(_RELEASE_DELAY_SECONDS, self._release_due)

    def _release_due(self) -> None:
        self._release_timer = None
        given, self._releases = self._releases, []
        if given:
            spawn(self._send_releases(given))

    async def _send_releases(self, given: list[tuple[str, str]]) -> None:
        if not given:
            return
        try:
            async with asyncio.timeout(self._timeout):
                client = self._clients.aclient()
                keys, ids = [key for key, _ in given], [gone for _, gone in given]
                if len(keys) == 1:  # the usual case, and a script costs more than a call
                    await client.zrem(keys[0], ids[0])
                else:
                    await client.eval(_RELEASE_LUA, len(keys), *keys, *ids)
        except (RedisError, TimeoutError) as exc:
            self._outage(exc)
            self._keep(given)

    def _keep(self, given: list[tuple[str, str]]) -> None:
        """Releases that did not reach Redis: sent again with the next call. Too many (a long
        outage) and the oldest are left to lapse at their expiry."""
        self._releases = (given + self._releases)[-_RELEASES_MAX:]

    def settle(self, settlements: Sequence[Settlement]) -> list[int | None]:
        if not settlements:
            return []
        try:
            raw = self._settle(
                keys=[self.prefix + s.key for s in settlements],
                args=[s.delta for s in settlements],
            )
        except RedisError as exc:
            # The reservation stands in for what was used: the limit errs on the safe side.
            self._outage(exc)
            return [None] * len(settlements)
        return [None if int(v) < 0 else int(v) for v in raw]

    def mark_once(self, key: str, *, expires_at: float) -> bool:
        try:
            return bool(
                self._clients.sync.set(self.prefix + key, 1, nx=True, exat=int(expires_at) + 1)
            )
        except RedisError as exc:
            self._outage(exc)
            return False

    def read(self, keys: Sequence[str], lease_keys: Sequence[str], *, now: float) -> Reading:
        if not keys and not lease_keys:
            return Reading()
        try:
            raw = self._read(
                keys=[self.prefix + k for k in (*keys, *lease_keys)],
                args=[len(keys), int(now * 1000)],
            )
        except RedisError as exc:
            self._outage(exc)
            return Reading(error=True)
        values = [int(v) for v in raw]
        return Reading(tuple(values[: len(keys)]), tuple(values[len(keys) :]))

    def clear(self) -> None:
        """Delete this limiter's keys (only those under its prefix)."""
        client = self._clients.sync
        batch = list(client.scan_iter(match=f"{self.prefix}*", count=500))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])

    def close(self) -> None:
        self._clients.close()

    async def aclose(self) -> None:
        await self._clients.aclose()

    def _outage(self, exc: Exception) -> None:
        metrics.LIMITER_ERRORS.inc(type(exc).__name__[:40])
        if self._outage_watch.failed():
            logger.error(
                "Redis at %s is unavailable to the limiter (%s); limits fail %s until it is back",
                self._outage_watch.where,
                type(exc).__name__,
                "open" if _fail_open() else "closed",
            )


def _fail_open() -> bool:
    from django.conf import settings

    return bool(settings.LLMROTATE_LIMITS_FAIL_OPEN)
