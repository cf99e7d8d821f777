"""Work started on the running event loop and left to finish on its own (a breaker write, a
key re-check, settling a stream a client abandoned).

asyncio keeps only weak references to tasks, so one that nobody holds may be garbage-collected
before it finishes: `spawn` holds each until it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
