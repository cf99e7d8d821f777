"""Database connections for work done outside any request.

Django recycles connections on the request_started/finished signals. The proxy's background
reads (the routing snapshot, the circuit-breaker sync) run on asgiref's shared thread outside
any request, and `/v1/` bypasses those signals anyway (llmrotate_site.asgi.ProxyHandler), so
they recycle their own connection: a connection the database dropped, or one older than
CONN_MAX_AGE, is closed before and after the work, as Django would do around a request.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from django.db import connections

P = ParamSpec("P")
R = TypeVar("R")


def _recycle() -> None:
    for conn in connections.all(initialized_only=True):
        # Inside a transaction (a test's, or a caller's atomic block) closing would break it.
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


def outside_request(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _recycle()
        try:
            return fn(*args, **kwargs)
        finally:
            _recycle()

    return wrapper


# One thread of the gateway's own for the database work its event loop starts in the
# background (routing snapshot reloads, circuit-breaker reads and writes, the re-validation
# schedule). Not asgiref's thread-sensitive executor: inside a Django request that executor
# belongs to the request and is shut down when the request ends, so a reload a request started
# in the background would fail ("CurrentThreadExecutor already quit") whenever it outlived it.
# One thread keeps it to one connection, which the ASGI lifespan closes at shutdown.
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _db_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmrotate-db")
        return _executor


async def run_outside_request(fn: Callable[[], R]) -> R:
    """Run `fn` (synchronous, database work) on the gateway's database thread, recycling its
    connection around it as Django would around a request."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_db_executor(), outside_request(fn))


async def db_thread_close() -> None:
    """Close the database thread's connections (at shutdown, and in tests)."""
    if _executor is not None:
        await asyncio.get_running_loop().run_in_executor(_executor, connections.close_all)


def _forget_after_fork() -> None:
    # A forked child has the executor object but not its thread.
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
