"""Server-sent events, passed through one event at a time as they arrive.

Each upstream event is forwarded as soon as its terminating blank line is read: nothing waits
for the rest of the stream. Along the way the relay notes the first content or tool-call delta
(true TTFT: the role-only first chunk or Anthropic's message_start does not count), the last
one, and the usage, removing OpenAI's usage chunk when the client did not ask for it. What an
event means is the dialect's business (proxy.dialects); the relay is the same for both.

If the upstream fails midway the client gets the dialect's `error` event (the SDKs raise on
it) instead of a silent truncation, and the request is not retried: text already sent would be
duplicated by a second key. Before its first chunk has arrived nothing has been sent, so the
engine waits for it (`start`) and fails over if the upstream dies first.

Once the client is answered the relay owns the key, and gives it back exactly once however the
stream ends: read to the end, cut by the upstream, abandoned by a client that hung up (the
view's task is cancelled mid-iteration), or never read at all (Django closes the response; a
response dropped unclosed is caught when it is garbage-collected).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator

import httpx
from django.http import StreamingHttpResponse

from keys.health import Outcome as Health
from keys.routing import DeploymentInfo, UpstreamKey
from proxy.calls import CallContext, key_settle, record_attempt
from proxy.classify import EMPTY_STREAM, ERROR_FIRST, Verdict, classify_exception
from proxy.dialects import StreamState

logger = logging.getLogger("llmrotate.proxy")
# Closing work scheduled from `close()`: the loop keeps only weak references to tasks.
_closing: set[asyncio.Task[None]] = set()


class StreamRelay:
    def __init__(
        self,
        *,
        ctx: CallContext,
        deployment: DeploymentInfo,
        key: UpstreamKey,
        response: httpx.Response,
        attempt: int,
        t_start: float,
        overhead_ms: float,
    ) -> None:
        self.ctx = ctx
        self.deployment = deployment
        self.key = key
        self.upstream = response
        self.attempt = attempt
        self.t_start = t_start
        self.overhead_ms = overhead_ms
        self.dialect = ctx.dialect
        self.state = StreamState(strip_usage=ctx.strip_usage)
        self.busy = 0.0  # time spent in our own parsing, i.e. proxy overhead
        self._buffer = b""
        self._pending = b""  # what arrived before the client was answered
        self._chunks: AsyncIterator[bytes] | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()

    async def start(self) -> Verdict | None:
        """Wait for the upstream's first chunk; a verdict if the stream failed before it.

        Nothing has reached the client yet, so such a failure is an ordinary failed attempt
        (and the key is still the engine's to settle). It costs no TTFT: the chunk is parsed
        here, on arrival, and is the first thing the client is sent.
        """
        self._chunks = self.upstream.aiter_bytes()
        try:
            first = await anext(self._chunks)
        except StopAsyncIteration:
            return EMPTY_STREAM
        except (httpx.HTTPError, OSError) as exc:
            return classify_exception(exc)
        self._pending = self._feed(first)
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
        out["x-llmrotate-attempts"] = str(self.attempt)
        out["x-llmrotate-key"] = self.key.key_id
        return out

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._relay()

    def _feed(self, chunk: bytes) -> bytes:
        """What to forward of the events completed by this chunk (b"" if none yet)."""
        t = time.perf_counter()
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        out = []
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[: end + 2], buffer[end + 2 :]
            forwarded = self.dialect.event(self.state, event)
            if forwarded is not None:
                out.append(forwarded)
        self._buffer = buffer
        self.busy += time.perf_counter() - t
        return b"".join(out)

    async def _relay(self) -> AsyncIterator[bytes]:
        try:
            if self._pending:
                pending, self._pending = self._pending, b""
                yield pending
            assert self._chunks is not None, "start() runs before the stream is relayed"
            async for chunk in self._chunks:
                out = self._feed(chunk)
                if out:
                    yield out
            if self._buffer.strip():
                forwarded = self.dialect.event(self.state, self._buffer + b"\n\n")
                if forwarded is not None:
                    yield forwarded
            if not self.state.complete and self.state.failure is None:
                self.state.failure = ("stream_error", "truncated")
                yield self.dialect.error_event(
                    "The upstream closed the stream before it finished.", code="stream_truncated"
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
            self._hung_up()
            raise
        finally:
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
            task = running.create_task(closing)
            _closing.add(task)
            task.add_done_callback(_closing.discard)
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
        self._finish()
        # Shielded: a second cancellation must not leave the key taken.
        await asyncio.shield(self._settle())

    def _finish(self) -> None:
        # Synchronous on purpose: it must run even when the task is being cancelled.
        t_end = time.perf_counter()
        state = self.state
        outcome, error_type = state.failure or ("success", "")
        ctx = self.ctx
        record_attempt(
            ctx,
            attempt=self.attempt,
            deployment=self.deployment,
            key=self.key,
            outcome=outcome,
            error_type=error_type,
            status_code=self.upstream.status_code,
            t_start=self.t_start,
            t_end=t_end,
            overhead_ms=self.overhead_ms + self.busy * 1000,
            usage=state.usage,
            completion_text=None
            if state.usage is not None and state.usage.reported
            else self.dialect.streamed_text(state),
            ttft_ms=ctx.ms_since_start(state.first_token_at) if state.first_token_at else None,
            ttlt_ms=ctx.ms_since_start(state.last_token_at) if state.last_token_at else None,
        )

    async def _settle(self) -> None:
        failure = self.state.failure
        outcome = failure[0] if failure else "success"
        if outcome == "client_disconnected":
            health = Health.CLIENT_ERROR  # says nothing about the key
        elif outcome == "success":
            health = Health.SUCCESS
        else:
            health = Health.UPSTREAM_ERROR
        try:
            await key_settle(
                self.key.key_id,
                self.upstream,
                health=health,
                policy=self.deployment.provider.policy,
                headroom=self.dialect.headroom(self.upstream.headers),
                error_type=failure[1] if failure else None,
            )
        except Exception:
            logger.warning("could not settle key state after stream %s", self.ctx.request_id)
