"""Server-sent events, passed through one event at a time as they arrive.

Each upstream event is forwarded as soon as its terminating blank line is read: nothing waits
for the rest of the stream. Along the way the relay notes the first content or tool-call delta
(true TTFT: the role-only first chunk or Anthropic's message_start does not count), the last
one, and the usage, removing OpenAI's usage chunk when the client did not ask for it. What an
event means is the dialect's business (proxy.dialects); the relay is the same for both.

Events are split as the SSE specification says: lines end in LF, CRLF or a bare CR (an
upstream's line ends are normalised to LF on the way through), and an event ends at a blank
line. Each chunk is scanned once, from where the previous scan stopped, so an event delivered
in many small chunks costs time in proportion to its size; an event that grows past
LLMROTATE_MAX_SSE_EVENT_BYTES without ending ends the stream instead (`event_too_large`).
A stream still running LLMROTATE_MAX_STREAM_SECONDS after its request began ends as well
(`stream_too_long`): the read timeout only catches one that falls silent.

If the upstream fails midway the client gets the dialect's `error` event (the SDKs raise on
it) instead of a silent truncation, and the request is not retried: text already sent would be
duplicated by a second key. Before its first chunk has arrived nothing has been sent, so the
engine waits for it (`start`) and fails over if the upstream dies first.

Once the client is answered the relay owns the attempt's key (proxy.engine.Attempt), and gives
it back exactly once however the stream ends: read to the end, cut by the upstream, abandoned
by a client that hung up (the view's task is cancelled mid-iteration), or never read at all
(Django closes the response; a response dropped unclosed is caught when it is
garbage-collected).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
from django.conf import settings
from django.http import StreamingHttpResponse

from common.background import spawn
from common.upstream import body_chunks
from keys.health import Outcome as Health
from proxy.classify import (
    EMPTY_STREAM,
    ERROR_FIRST,
    EVENT_TOO_LARGE,
    SUCCESS,
    Next,
    Verdict,
    classify_exception,
)
from proxy.dialects import StreamState
from usage.models import CLIENT_CLOSED_STATUS

if TYPE_CHECKING:
    from proxy.engine import Attempt

logger = logging.getLogger("llmrotate.proxy")
# The model an upstream names in its first event (OpenAI's chunk, Anthropic's message_start),
# for the attempt's span: searched for, not parsed, and only when tracing.
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')


class SseSplitter:
    """Splits a byte stream into SSE events (each ending in a blank line), incrementally."""

    def __init__(self, *, max_event: int) -> None:
        self.max_event = max_event
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for an event's end
        self._after_cr = False  # the last chunk ended in CR: an LF opening the next is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events this chunk completes. See `overflowed` after each call."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._after_cr = False
        buffer = self._buffer
        buffer += chunk
        events = []
        start = 0
        # One character back: the blank line may begin in what was scanned before.
        at = max(0, self._scanned - 1)
        while (end := buffer.find(b"\n\n", at)) >= 0:
            events.append(bytes(buffer[start : end + 2]))
            start = at = end + 2
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        return events

    @property
    def overflowed(self) -> bool:
        """An event has grown past the size limit without ending."""
        return len(self._buffer) > self.max_event

    def rest(self) -> bytes:
        """What is left after the stream ended (an event without its blank line)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return rest


class EventTooLarge(Exception):
    """Raised by the relay, to end the stream, when the splitter overflowed."""


class StreamTooLong(Exception):
    """Raised by the relay, to end the stream, past LLMROTATE_MAX_STREAM_SECONDS."""


class StreamRelay:
    def __init__(self, attempt: Attempt) -> None:
        assert attempt.response is not None
        self.attempt = attempt
        self.ctx = attempt.ctx
        self.upstream: httpx.Response = attempt.response
        self.dialect = attempt.call.dialect
        self.state = StreamState(
            strip_usage=self.ctx.strip_usage, keep_max=settings.LLMROTATE_ESTIMATE_MAX_CHARS
        )
        self.state.translator = self.dialect.stream_translator(
            model=self.ctx.route.name,
            include_usage=not self.ctx.strip_usage,
            request_id=self.ctx.request_id,
        )
        self.busy = 0.0  # time spent in our own parsing, i.e. proxy overhead
        self._events = SseSplitter(max_event=settings.LLMROTATE_MAX_SSE_EVENT_BYTES)
        # The read timeout ends a silent stream; this ends one that keeps sending forever.
        self._until = self.ctx.t0 + settings.LLMROTATE_MAX_STREAM_SECONDS
        self._pending = b""  # what arrived before the client was answered
        self._chunks: AsyncIterator[bytes] | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self.model: str | None = None  # as the upstream named it (tracing only)
        self.capture = attempt.capture

    async def start(self) -> Verdict | None:
        """Wait for the upstream's first chunk; a verdict if the stream failed before it.

        Nothing has reached the client yet, so such a failure is an ordinary failed attempt
        (and the key is still the attempt's to settle). It costs no TTFT: the chunk is parsed
        here, on arrival, and is the first thing the client is sent.
        """
        self._chunks = body_chunks(self.upstream)
        try:
            first = await anext(self._chunks)
        except StopAsyncIteration:
            return EMPTY_STREAM
        except (httpx.HTTPError, OSError) as exc:
            return classify_exception(exc)
        if self.attempt.span is not None and (found := _MODEL.search(first)):
            self.model = found.group(1).decode("utf-8", "replace")
        self._pending = self._feed(first)
        if self._events.overflowed:
            return EVENT_TOO_LARGE
        if self.state.failure is not None and self.state.first_token_at is None:
            return ERROR_FIRST
        return None

    def response(self) -> StreamingHttpResponse:
        # The relay itself is the content: Django calls its `close()` when it closes the
        # response, even one it never iterated.
        out = StreamingHttpResponse(self, content_type="text/event-stream")
        finalizer = weakref.finalize(out, self.close)
        finalizer.atexit = False
        out["Cache-Control"] = "no-cache"
        # Tells nginx and similar reverse proxies not to buffer the stream.
        out["X-Accel-Buffering"] = "no"
        out["x-llmrotate-request-id"] = self.ctx.request_id
        out["x-llmrotate-attempts"] = str(self.attempt.number)
        out["x-llmrotate-key"] = self.attempt.key.key_id
        return out

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._relay()

    def _feed(self, chunk: bytes) -> bytes:
        """What to forward of the events completed by this chunk (b"" if none yet)."""
        t = time.perf_counter()
        if self.capture is not None:
            self.capture.chunk(chunk)
        out = []
        for event in self._events.feed(chunk):
            forwarded = self.dialect.event(self.state, event)
            if forwarded is not None:
                out.append(forwarded)
        self.busy += time.perf_counter() - t
        return b"".join(out)

    async def _relay(self) -> AsyncIterator[bytes]:
        left = False  # the client hung up before the relay ended
        try:
            if self._pending:
                pending, self._pending = self._pending, b""
                yield pending
            assert self._chunks is not None, "start() runs before the stream is relayed"
            async for chunk in self._chunks:
                out = self._feed(chunk)
                if out:
                    yield out
                if self._events.overflowed:
                    raise EventTooLarge
                if time.perf_counter() > self._until:
                    raise StreamTooLong
            rest = self._events.rest()
            if rest.strip():
                forwarded = self.dialect.event(self.state, rest + b"\n\n")
                if forwarded is not None:
                    yield forwarded
            if not self.state.complete and self.state.failure is None:
                self.state.failure = ("stream_error", "truncated")
                yield self.dialect.error_event(
                    "The upstream closed the stream before it finished.", code="stream_truncated"
                )
        except EventTooLarge:
            self.state.failure = ("stream_error", "event_too_large")
            yield self.dialect.error_event(
                "The upstream sent an event larger than the gateway relays.",
                code="event_too_large",
            )
        except StreamTooLong:
            self.state.failure = ("timeout", "stream_too_long")
            yield self.dialect.error_event(
                "The upstream was still streaming when the gateway's time limit for one answer"
                " ran out.",
                code="stream_too_long",
            )
        except httpx.TimeoutException:
            self.state.failure = ("timeout", "stream_read_timeout")
            yield self.dialect.error_event(
                "The upstream stopped sending mid-stream.", code="upstream_timeout"
            )
        except (httpx.HTTPError, OSError) as exc:
            self.state.failure = ("stream_error", type(exc).__name__)
            yield self.dialect.error_event(
                "The upstream connection failed mid-stream.", code="stream_interrupted"
            )
        except (asyncio.CancelledError, GeneratorExit):
            left = True
            self._hung_up()
            raise
        finally:
            if self.ctx.capture is not None and (not left or self.state.complete):
                # Every event was sent (each yield returns once Django sent it), or the end
                # event was: a hang-up from here on (SDKs close at `[DONE]`, or while the key
                # is settled) came after the whole answer.
                self.ctx.capture.client.whole = True
            await self._close()

    def close(self) -> None:
        """Django is done with the response. Settles the attempt unless the stream already did.

        It runs after the stream ended (nothing left to do), after a client hung up mid-stream
        (Django stops iterating without closing this iterator), or without any iteration at all.
        """
        if self._closed:
            return
        self._hung_up()
        running: asyncio.AbstractEventLoop | None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        closing = self._close()
        if running is self._loop:
            spawn(closing)
            return
        try:
            asyncio.run_coroutine_threadsafe(closing, self._loop)
        except RuntimeError:  # the loop is gone (shutdown): nothing left to give the key to
            closing.close()
            logger.warning("could not settle key state after stream %s", self.ctx.request_id)

    def _hung_up(self) -> None:
        if self.state.failure is None:
            self.state.failure = ("client_disconnected", "client_disconnected")

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True  # before any await: exactly once, whoever gets here first
        state = self.state
        usage = state.usage
        ctx = self.ctx
        # Recorded (synchronously, before its first await) and settled by the attempt; the
        # settle is shielded there, so a second cancellation cannot leave the key taken.
        text = None if usage is not None and usage.reported else self.dialect.streamed_text(state)
        hung_up = state.failure is not None and state.failure[0] == "client_disconnected"
        await self.attempt.finish(
            _verdict(state.failure),
            # The client got a 200 and events, whatever came later; unless it left first.
            client_status=CLIENT_CLOSED_STATUS if hung_up else 200,
            usage=usage,
            tools=state.tools,
            completion_text=text,
            completion_chars=state.full_length(text) if text is not None else None,
            ttft_ms=ctx.ms_since_start(state.first_token_at) if state.first_token_at else None,
            ttlt_ms=ctx.ms_since_start(state.last_token_at) if state.last_token_at else None,
            extra_overhead_ms=self.busy * 1000,
            response_model=self.model,
        )


def _verdict(failure: tuple[str, str] | None) -> Verdict:
    """How a stream that reached the client ended. Never retried, whatever happened."""
    if failure is None:
        return SUCCESS
    outcome, error_type = failure
    # A client that hung up says nothing about the key; anything else the upstream did does.
    health = Health.CLIENT_ERROR if outcome == "client_disconnected" else Health.UPSTREAM_ERROR
    return Verdict(outcome, health, Next.DONE, error_type)
