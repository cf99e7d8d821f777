"""What a log line says about the work it was written for: the proxied request's id, and the
active trace and span when tracing is on.

The request id lives in a context variable, so it follows the request wherever asyncio takes
it (tasks copy the context when they are created) and nowhere else: the recorder's and the
database's threads have contexts of their own and log without it.

Trace ids come from common.telemetry, which only exists with tracing support and may import
OpenTelemetry; it is looked up on the first log line that asks, never at import, so a process
that does not trace never loads it because of logging.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token

_request_id: ContextVar[str] = ContextVar("llmrotate_request_id", default="")

TraceIds = Callable[[], "tuple[str, str] | None"]
_UNRESOLVED: TraceIds = lambda: None  # noqa: E731 - a sentinel, compared by identity
_trace_hook: TraceIds = _UNRESOLVED


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
    is not installed."""
    global _trace_hook
    if _trace_hook is _UNRESOLVED:
        _trace_hook = _resolve_trace_hook()
    return _trace_hook()


def _resolve_trace_hook() -> TraceIds:
    try:
        telemetry = importlib.import_module("common.telemetry")
    except ImportError:
        return lambda: None
    hook: TraceIds | None = getattr(telemetry, "current_trace_ids", None)
    return hook if hook is not None else lambda: None
