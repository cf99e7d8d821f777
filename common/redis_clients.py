"""Redis clients for the hot path: a sync one, and an asyncio one per event loop.

An asyncio client is bound to the loop it first ran on (its connections belong to it), and
tests and the serve command run several loops in one process; so each loop gets its own.
Timeouts are short and there is a single retry (for a pooled connection that went stale): on
the hot path a slow Redis is as bad as a dead one, and every user has a fallback.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

_ASYNC_POOL_SIZE = 64
_POOL_WAIT_SECONDS = 1.0
# After a failed call, Redis is left alone this long: an outage costs one timeout, not one per
# request. And it is said in the log at most this often.
OUTAGE_SKIP_SECONDS = 2.0
OUTAGE_LOG_EVERY_SECONDS = 30.0


class Outage:
    """Whether a Redis user should skip Redis for now, after a failed call."""

    def __init__(self, url: str) -> None:
        where = urlsplit(url)  # host and port only: the URL may carry a password
        self.where = f"{where.hostname}:{where.port or 6379}"
        self._down_until = float("-inf")
        self._logged_at = float("-inf")

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def failed(self) -> bool:
        """Note a failed call; True when the caller should say so in the log now."""
        moment = time.monotonic()
        self._down_until = moment + OUTAGE_SKIP_SECONDS
        if moment - self._logged_at < OUTAGE_LOG_EVERY_SECONDS:
            return False
        self._logged_at = moment
        return True


# One retry, for a pooled connection the server closed meanwhile. Not on a timeout: the
# command may have run, and the limiter's scripts (a reservation, a settlement) must not run
# twice.
_RETRIED = (redis.exceptions.ConnectionError,)


class RedisClients:
    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self._timeout = timeout
        self.sync = redis.Redis.from_url(url, **self._kwargs(Retry(NoBackoff(), 1, _RETRIED)))
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def aclient(self) -> aioredis.Redis:
        """The running loop's client."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._async.get(loop)
            if client is None:
                # A blocking pool: past its size, calls queue briefly for a connection instead
                # of failing (the default pool raises at 100 concurrent calls, which a busy
                # proxy reaches and which is not an outage).
                pool = aioredis.BlockingConnectionPool.from_url(
                    self.url,
                    max_connections=_ASYNC_POOL_SIZE,
                    timeout=min(_POOL_WAIT_SECONDS, max(self._timeout, 0.001) * 2),
                    **self._kwargs(AsyncRetry(NoBackoff(), 1, _RETRIED)),
                )
                client = self._async[loop] = aioredis.Redis.from_pool(pool)
            return client

    def close(self) -> None:
        """Close the sync client and forget the async ones (see `aclose`)."""
        self.sync.close()
        with self._lock:
            self._async.clear()

    async def aclose(self) -> None:
        """Close the running loop's client (at shutdown; tests, whose loops are short-lived)."""
        with self._lock:
            client = self._async.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def _kwargs(self, retry: object) -> dict[str, Any]:
        return {
            "decode_responses": True,
            "socket_connect_timeout": self._timeout,
            "socket_timeout": self._timeout,
            "retry": retry,
        }
