"""What a log line says about the work it was written for: the proxied request's id, and the
active trace and span when tracing is on.

The request id lives in a context variable, so it follows the request wherever asyncio takes
it (tasks copy the context when they are created) and nowhere else: the recorder's and the
database's threads have contexts of their own and log without it.

Trace ids come from common.telemetry, which imports nothing of OpenTelemetry until tracing is
turned on, so asking it costs a process that does not trace one `None` check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar, Token

from common import telemetry

_request_id: ContextVar[str] = ContextVar("llmrotate_request_id", default="")


def request_id() -> str:
    """The id of the proxied request being handled, or "" outside one."""
    return _request_id.get()


def request_id_bind(value: str) -> Token[str]:
    """Bind the request id for the rest of the current context (the request's own task and
    the tasks it starts). Returns the token `request_id_reset` takes."""
    return _request_id.set(value)


def request_id_reset(token: Token[str]) -> None:
    _request_id.reset(token)


@contextlib.contextmanager
def request_id_bound(value: str) -> Iterator[None]:
    token = request_id_bind(value)
    try:
        yield
    finally:
        request_id_reset(token)


def trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the active span, or None when there is none or tracing
    is off."""
    return telemetry.current_trace_ids()
