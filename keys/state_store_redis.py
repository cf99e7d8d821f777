"""The key state store shared by every process through Redis, falling back to one process's.

The interface and the in-process backend are in keys.state_store_base; keys.state_store picks
the store for this process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from common.redis_clients import Outage, RedisClients
from keys.health import (
    CallResult,
    KeyPolicy,
    KeyState,
    KeyStatus,
    ManualAction,
    Outcome,
    apply_manual,
    apply_outcome,
    apply_recheck,
    effective_state,
)
from keys.state_store_base import (
    _AVAILABLE,
    KeyStateStore,
    MemoryKeyStateStore,
    Snapshot,
    Transition,
    WatchedTransition,
    recheck_reason,
)

log = logging.getLogger("llmrotate.keys")

T = TypeVar("T")

# A probe slot outlives a crashed process only this long, so a key cannot stay stuck in
# "probing, trial in flight" forever.
PROBE_SLOT_TTL_SECONDS = 300
# Fields a success or client error may touch without changing the key's health. When nothing
# else changes, the hot path skips the optimistic transaction (and its retries under load).
_FAST_FIELDS = frozenset(
    {
        "total_successes",
        "last_used_at",
        "remaining_requests",
        "remaining_tokens",
        "limit_requests",
        "limit_tokens",
        "headroom_at",
    }
)
_MAX_TRANSACTION_ATTEMPTS = 1000
# Connection errors and timeouts above all, but also a Redis that answers with an error (out
# of memory, read-only replica after a failover): the proxy keeps serving either way.
_REDIS_DOWN = RedisError


# Calls in flight are counted per process (a field of the key's `inflight` hash each), and a
# process's fields count only while it is alive: a worker killed outright (SIGKILL, OOM) never
# releases its calls, and a single counter would keep them in flight forever. Alive means it
# read or acquired through the store within PROCESS_ALIVE_SECONDS (its score in the `procs`
# sorted set): a worker serving traffic does so on every request. (One whose only traffic is a
# stream longer than that drops out of the others' counts until its next request.)
PROCESS_ALIVE_SECONDS = 30.0
_HEARTBEAT_SECONDS = 5.0

# Decrement this process's count, never below zero (a release after `clear()` or a double
# release must not leave a negative count that makes the key look idle forever), and free the
# probe slot.
_RELEASE_LUA = """
local v = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if v <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('DEL', KEYS[2])
return 0
"""


class RedisKeyStateStore(KeyStateStore):
    """State shared by every process through Redis: one hash per key, counters beside it.

    Transitions run the pure functions inside WATCH/MULTI transactions, retried on conflict, so
    two processes recording at once never lose an update and timers only move forward.

    Redis being down must not take the proxy down with it: each call that cannot reach Redis
    falls back to an in-process store (fail open, per process) and logs a warning now and then.
    """

    def __init__(self, url: str, *, prefix: str = "llmrotate:", timeout: float = 0.5) -> None:
        self.prefix = prefix
        self._url = url
        self._clients = RedisClients(url, timeout=timeout)
        self._sync = self._clients.sync
        self._fallback = MemoryKeyStateStore()
        # After a failed call, straight to the fallback for a while (common.redis_clients).
        self._outage_watch = Outage(url)
        self._process: tuple[int, str] = (0, "")
        self._heartbeat_at = float("-inf")

    @property
    def _me(self) -> str:
        """This process's field in the in-flight hashes; a forked child gets its own."""
        pid = os.getpid()
        if self._process[0] != pid:
            self._process = (pid, f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}")
            self._heartbeat_at = float("-inf")
        return self._process[1]

    def _heartbeat(self, pipe: Any) -> None:
        """Queue this process's heartbeat on `pipe` when it is due (and forget the processes
        that have been silent for long); most calls queue nothing."""
        me, moment = self._me, time.time()
        if moment - self._heartbeat_at < _HEARTBEAT_SECONDS:
            return
        self._heartbeat_at = moment
        pipe.zadd(self._procs, {me: moment})
        pipe.zremrangebyscore(self._procs, "-inf", moment - 10 * PROCESS_ALIVE_SECONDS)

    def _queue_reads(self, pipe: Any, key_ids: Sequence[str]) -> None:
        pipe.zrangebyscore(self._procs, time.time() - PROCESS_ALIVE_SECONDS, "+inf")
        for k in key_ids:
            pipe.hgetall(self._hkey(k))
            pipe.hgetall(self._ikey(k))

    # ---- async (hot path)

    async def snapshot(self, key_ids: Sequence[str], *, now: float) -> Snapshot:
        async def op() -> Snapshot:
            async with self._aclient().pipeline(transaction=False) as pipe:
                self._queue_reads(pipe, key_ids)
                self._heartbeat(pipe)  # after the reads: _unpack reads results by position
                return self._unpack(key_ids, await pipe.execute(), now=now)

        return await self._guard_async(op, lambda: self._fallback.snapshot(key_ids, now=now))

    async def record(self, key_id: str, result: CallResult) -> KeyState:
        fn = WatchedTransition(lambda state: apply_outcome(state, result))

        async def op() -> KeyState:
            client, hkey = self._aclient(), self._hkey(key_id)
            if result.outcome in (Outcome.SUCCESS, Outcome.CLIENT_ERROR):
                before = effective_state(
                    KeyState.from_dict(await client.hgetall(hkey)), now=result.now
                )
                after = fn(before)
                changed = _changed(before, after)
                if changed <= _FAST_FIELDS:
                    # Not watched: a transition another process commits meanwhile is kept,
                    # because this only increments a counter and sets fields it doesn't touch.
                    # (At worst a concurrent failure's counter is not reset by this success.)
                    async with client.pipeline(transaction=True) as pipe:
                        _queue_fast(pipe, hkey, before, after, changed)
                        await pipe.execute()
                    return after
            async with client.pipeline(transaction=True) as pipe:
                for _ in range(_MAX_TRANSACTION_ATTEMPTS):
                    try:
                        await pipe.watch(hkey)
                        new = fn(KeyState.from_dict(await pipe.hgetall(hkey)))
                        pipe.multi()
                        pipe.hset(hkey, mapping=new.to_dict())  # type: ignore[arg-type]
                        await pipe.execute()
                        return new
                    except WatchError:
                        await asyncio.sleep(0)  # someone else won; read again and re-apply
            raise RuntimeError(f"key state of {key_id} kept changing; gave up recording")

        async def fallback() -> KeyState:
            return self._fallback.apply(key_id, fn)

        new = await self._guard_async(op, fallback)
        fn.report(key_id, result.outcome.value)
        return new

    async def acquire(self, key_id: str, *, now: float) -> bool:
        async def op() -> bool:
            client = self._aclient()
            raw = await client.hgetall(self._hkey(key_id))
            state = effective_state(KeyState.from_dict(raw), now=now)
            if state.status not in _AVAILABLE:
                return False
            # Half-open: SET NX makes exactly one caller, in any process, the trial.
            if state.status == KeyStatus.PROBING and not await client.set(
                self._pkey(key_id), "1", nx=True, ex=PROBE_SLOT_TTL_SECONDS
            ):
                return False
            async with client.pipeline(transaction=False) as pipe:
                pipe.hincrby(self._ikey(key_id), self._me, 1)
                self._heartbeat(pipe)
                await pipe.execute()
            return True

        return await self._guard_async(op, lambda: self._fallback.acquire(key_id, now=now))

    async def release(self, key_id: str) -> None:
        # The probe slot is freed by any release of the key. A call that was acquired before
        # the key went probing could free it early, but exhaustion lasts long enough (an hour
        # by default) that such a call is long over.
        async def op() -> None:
            keys = (self._ikey(key_id), self._pkey(key_id))
            await self._aclient().eval(_RELEASE_LUA, 2, *keys, self._me)

        await self._guard_async(op, lambda: self._fallback.release(key_id))

    async def next_rr(self, name: str) -> int:
        async def op() -> int:
            return int(await self._aclient().incr(f"{self.prefix}rr:{name}"))

        return await self._guard_async(op, lambda: self._fallback.next_rr(name))

    # ---- sync

    def get_many(self, key_ids: Sequence[str], *, now: float) -> Snapshot:
        def op() -> Snapshot:
            pipe = self._sync.pipeline(transaction=False)
            self._queue_reads(pipe, key_ids)
            return self._unpack(key_ids, pipe.execute(), now=now)

        return self._guard(op, lambda: self._fallback.get_many(key_ids, now=now))

    def manual(self, key_id: str, action: ManualAction, *, now: float) -> KeyState:
        if action == "reset":
            # As in the memory store (forget_inflight): the count and the probe slot go.
            def forget() -> None:
                self._sync.delete(self._ikey(key_id), self._pkey(key_id))

            self._guard(forget, lambda: self._fallback.forget_inflight(key_id))
        return self._transact(
            key_id, f"manual_{action}", lambda s: apply_manual(s, action, now=now)
        )

    def recheck(self, key_id: str, *, ok: bool, now: float, policy: KeyPolicy) -> KeyState:
        return self._transact(
            key_id, recheck_reason(ok), lambda s: apply_recheck(s, ok=ok, now=now, policy=policy)
        )

    def clear(self) -> None:
        """Delete this store's keys (only those under its prefix; never the whole database)."""
        self._fallback.clear()

        def op() -> None:
            batch = list(self._sync.scan_iter(match=f"{self.prefix}*", count=500))
            for i in range(0, len(batch), 500):
                self._sync.delete(*batch[i : i + 500])

        self._guard(op, lambda: None)

    def close(self) -> None:
        """Close the sync client and forget the async ones (see `aclose`)."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close the running loop's client (at shutdown; tests, whose loops are short-lived)."""
        await self._clients.aclose()

    # ---- internals

    def _hkey(self, key_id: str) -> str:
        return f"{self.prefix}key:{key_id}"

    def _ikey(self, key_id: str) -> str:
        # Not `inflight:`, where earlier versions kept one counter (a string) per key: a hash
        # under that name would fail every command on it (WRONGTYPE) after an upgrade, and
        # during a rolling one the old workers' too.
        return f"{self.prefix}inflight-by-process:{key_id}"

    def _pkey(self, key_id: str) -> str:
        return f"{self.prefix}probe:{key_id}"

    @property
    def _procs(self) -> str:
        return f"{self.prefix}procs"

    def _aclient(self) -> aioredis.Redis:
        return self._clients.aclient()

    def _unpack(self, key_ids: Sequence[str], results: list[Any], *, now: float) -> Snapshot:
        out: Snapshot = {}
        alive = set(results[0])
        for i, k in enumerate(key_ids):
            raw, inflight = results[1 + 2 * i], results[2 + 2 * i]
            state = KeyState.from_dict(raw if isinstance(raw, dict) else {})
            # A process's own count is there before its first heartbeat is written.
            calls = sum(
                int(n) for p, n in (inflight or {}).items() if p in alive or p == self._process[1]
            )
            out[k] = (effective_state(state, now=now), max(0, calls))
        return out

    def _transact(self, key_id: str, reason: str, transition: Transition) -> KeyState:
        fn = WatchedTransition(transition)

        def op() -> KeyState:
            hkey = self._hkey(key_id)
            with self._sync.pipeline(transaction=True) as pipe:
                for _ in range(_MAX_TRANSACTION_ATTEMPTS):
                    try:
                        pipe.watch(hkey)
                        new = fn(KeyState.from_dict(pipe.hgetall(hkey)))
                        pipe.multi()
                        pipe.hset(hkey, mapping=new.to_dict())  # type: ignore[arg-type]
                        pipe.execute()
                        return new
                    except WatchError:
                        continue
            raise RuntimeError(f"key state of {key_id} kept changing; gave up updating")

        new = self._guard(op, lambda: self._fallback.apply(key_id, fn))
        fn.report(key_id, reason)
        return new

    def _guard(self, op: Callable[[], T], fallback: Callable[[], T]) -> T:
        if self._outage_watch.down:
            return fallback()
        try:
            return op()
        except _REDIS_DOWN as exc:
            self._outage(exc)
            return fallback()

    async def _guard_async(
        self, op: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]
    ) -> T:
        if self._outage_watch.down:
            return await fallback()
        try:
            return await op()
        except _REDIS_DOWN as exc:
            self._outage(exc)
            return await fallback()

    def _outage(self, exc: Exception) -> None:
        if self._outage_watch.failed():
            log.warning(
                "Redis at %s is unavailable (%s); key state falls back to this process until it"
                " is back",
                self._outage_watch.where,
                type(exc).__name__,
            )


def _changed(before: KeyState, after: KeyState) -> frozenset[str]:
    a, b = before.to_dict(), after.to_dict()
    return frozenset(k for k in b if a.get(k) != b[k])


def _queue_fast(
    pipe: Any, hkey: str, before: KeyState, after: KeyState, changed: frozenset[str]
) -> None:
    if "total_successes" in changed:
        pipe.hincrby(hkey, "total_successes", after.total_successes - before.total_successes)
    values = after.to_dict()
    mapping = {f: values[f] for f in changed - {"total_successes"}}
    if mapping:
        pipe.hset(hkey, mapping=mapping)
