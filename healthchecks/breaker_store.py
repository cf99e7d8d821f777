"""Where breaker state lives: shared by the web process(es) and the Celery worker.

Embedded mode has no Redis, and the worker is a separate process, so breaker state is a
database row per endpoint there (`BreakerRecord`, updated in a row-locking transaction). With
`REDIS_URL` it is one Redis key per endpoint, updated in WATCH/MULTI transactions. Both run the
pure transitions of healthchecks.breaker, and neither is touched by a proxy request directly:
the web process reads them through `healthchecks.gate`, off the request path.

The memory store is for tests of code that needs a store but not sharing.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

import redis
from django.db import transaction
from redis.exceptions import WatchError

from common.redaction import base_url_masked
from healthchecks.breaker import BreakerState

T = TypeVar("T")
# fn(stored state) -> (new state, anything the caller wants back)
Transition = Callable[[BreakerState], tuple[BreakerState, T]]
_MAX_TRANSACTION_ATTEMPTS = 100


class BreakerStore(ABC):
    @abstractmethod
    def load_all(self) -> dict[str, BreakerState]: ...

    @abstractmethod
    def update(self, endpoint: str, fn: Transition[T]) -> tuple[BreakerState, BreakerState, T]:
        """Atomically apply `fn`; returns (stored before, stored after, fn's extra result)."""

    @abstractmethod
    def clear(self) -> None: ...

    def get(self, endpoint: str) -> BreakerState:
        """One endpoint's stored state (not `effective`: an open one may be due to half-open)."""
        return self.load_all().get(endpoint, BreakerState())


class MemoryBreakerStore(BreakerStore):
    def __init__(self) -> None:
        self._states: dict[str, BreakerState] = {}
        self._lock = threading.Lock()

    def load_all(self) -> dict[str, BreakerState]:
        with self._lock:
            return dict(self._states)

    def update(self, endpoint: str, fn: Transition[T]) -> tuple[BreakerState, BreakerState, T]:
        with self._lock:
            before = self._states.get(endpoint, BreakerState())
            after, extra = fn(before)
            self._states[endpoint] = after
            return before, after, extra

    def clear(self) -> None:
        with self._lock:
            self._states.clear()


class DatabaseBreakerStore(BreakerStore):
    def load_all(self) -> dict[str, BreakerState]:
        from healthchecks.models import BreakerRecord

        return {
            endpoint: BreakerState.from_json(raw)
            for endpoint, raw in BreakerRecord.objects.values_list("endpoint", "state")
        }

    def get(self, endpoint: str) -> BreakerState:
        from healthchecks.models import BreakerRecord

        rows = BreakerRecord.objects.filter(endpoint=endpoint).values_list("state", flat=True)
        return BreakerState.from_json(rows.first())

    def update(self, endpoint: str, fn: Transition[T]) -> tuple[BreakerState, BreakerState, T]:
        from healthchecks.models import BreakerRecord

        # select_for_update locks the row on Postgres; on SQLite the IMMEDIATE transaction mode
        # (settings) makes the whole transaction exclusive. Either way two processes applying a
        # transition at once run one after the other, each on the other's result.
        with transaction.atomic():
            row, _ = BreakerRecord.objects.select_for_update().get_or_create(endpoint=endpoint)
            before = BreakerState.from_json(row.state)
            after, extra = fn(before)
            if after != before:
                row.state = after.to_json()
                row.save(update_fields=["state", "updated_at"])
        return before, after, extra

    def clear(self) -> None:
        from healthchecks.models import BreakerRecord

        BreakerRecord.objects.all().delete()


class RedisBreakerStore(BreakerStore):
    """One JSON value per endpoint under `{prefix}breaker:`, plus a set naming them all."""

    def __init__(self, url: str, *, prefix: str, timeout: float = 1.0) -> None:
        self.prefix = prefix
        self._client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=timeout, socket_timeout=timeout
        )

    def _key(self, endpoint: str) -> str:
        return f"{self.prefix}breaker:{endpoint}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}breakers"

    def load_all(self) -> dict[str, BreakerState]:
        endpoints = self._endpoints()
        if not endpoints:
            return {}
        values: list[str | None] = self._client.mget([self._key(e) for e in endpoints])  # type: ignore[assignment]  # sync client
        return {e: BreakerState.from_json(v) for e, v in zip(endpoints, values, strict=True)}

    def get(self, endpoint: str) -> BreakerState:
        return BreakerState.from_json(self._client.get(self._key(endpoint)))

    def _endpoints(self) -> list[str]:
        return sorted(str(e) for e in self._client.smembers(self._index))

    def update(self, endpoint: str, fn: Transition[T]) -> tuple[BreakerState, BreakerState, T]:
        key = self._key(endpoint)
        with self._client.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_TRANSACTION_ATTEMPTS):
                try:
                    pipe.watch(key)
                    before = BreakerState.from_json(pipe.get(key))
                    after, extra = fn(before)
                    pipe.multi()
                    pipe.set(key, after.to_json())
                    pipe.sadd(self._index, endpoint)
                    pipe.execute()
                    return before, after, extra
                except WatchError:
                    continue  # another process changed it: read again and re-apply
        # Logged by the callers: the endpoint as fit to show, never its credentials.
        raise RuntimeError(
            f"breaker of {base_url_masked(endpoint)} kept changing; gave up updating it"
        )

    def clear(self) -> None:
        self._client.delete(self._index, *[self._key(e) for e in self._endpoints()])

    def close(self) -> None:
        self._client.close()


@functools.cache
def get_breaker_store() -> BreakerStore:
    """Redis when `settings.REDIS_URL` is set, else the database. One per process."""
    from django.conf import settings

    if settings.REDIS_URL:
        return RedisBreakerStore(settings.REDIS_URL, prefix=settings.LLMROTATE_REDIS_PREFIX)
    return DatabaseBreakerStore()


def reset_breaker_store() -> None:
    """Forget the store (tests, or after changing settings)."""
    if get_breaker_store.cache_info().currsize:
        old = get_breaker_store()
        get_breaker_store.cache_clear()
        if isinstance(old, RedisBreakerStore):
            old.close()
