"""Database connections for work done outside any request.

Django recycles connections on the request_started/finished signals. The proxy's background
reads (the routing snapshot, the circuit-breaker sync) run on asgiref's shared thread outside
any request, and `/v1/` bypasses those signals anyway (llmrotate_site.asgi.ProxyHandler), so
they recycle their own connection: a connection the database dropped, or one older than
CONN_MAX_AGE, is closed before and after the work, as Django would do around a request.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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
