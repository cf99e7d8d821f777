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
import os
import threading
from collections.abc import Iterator
from contextvars import ContextVar, Token

from common import telemetry

_request_id: ContextVar[str] = ContextVar("llmrotate_request_id", default="")


_ENTROPY_CHUNK = 4096
_entropy = b""
_entropy_at = 0
_entropy_lock = threading.Lock()


def _entropy_forget() -> None:
    # A forked child must not hand out the ids its parent's block still holds.
    global _entropy, _entropy_at
    _entropy, _entropy_at = b"", 0


os.register_at_fork(after_in_child=_entropy_forget)


def request_id_new() -> str:
    """A new request id: the hex of a random version-4 UUID, as `uuid.uuid4().hex` makes it.

    uuid4 asks the kernel for 16 bytes on every call, and that system call lets go of the GIL,
    so under load each request then waited for another thread to hand it back. The same
    kernel entropy is drawn 4 KiB at a time instead.
    """
    global _entropy, _entropy_at
    with _entropy_lock:
        if _entropy_at + 16 > len(_entropy):
            _entropy, _entropy_at = os.urandom(_ENTROPY_CHUNK), 0
        value = int.from_bytes(_entropy[_entropy_at : _entropy_at + 16])
        _entropy_at += 16
    # RFC 4122 variant and version 4, the bits uuid.UUID(version=4) sets.
    value = (value & ~(0xC000 << 48)) | (0x8000 << 48)
    value = (value & ~(0xF000 << 64)) | (4 << 76)
    return f"{value:032x}"


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
