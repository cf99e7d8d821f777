"""Server-sent events, passed through one event at a time as they arrive.

Each upstream event is forwarded as soon as its terminating blank line is read: nothing waits
for the rest of the stream. Along the way the relay notes the first content or tool-call delta
(true TTFT: the role-only first chunk does not count), the last one, and the usage chunk,
which it removes when the client did not ask for it.

If the upstream fails midway the client gets an OpenAI-shaped `error` event (the SDKs raise on
it) instead of a silent truncation, and the request is not retried: text already sent would be
duplicated by a second key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import httpx
from django.http import StreamingHttpResponse

from keys.health import Outcome as Health
from keys.ratelimits import parse_headroom
from keys.routing import DeploymentInfo, UpstreamKey
from keys.state_store import get_key_state_store
from proxy.calls import CallContext, Usage, record_attempt, usage_from

logger = logging.getLogger("llmrotate.proxy")


def error_event(message: str, *, code: str) -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "code": code, "param": None}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


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
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.usage: Usage | None = None
        self.pieces: list[str] = []
        self.finished = False  # saw a finish_reason
        self.done = False  # saw [DONE]
        self.failure: tuple[str, str] | None = None  # (outcome, error_type)

    def response(self) -> StreamingHttpResponse:
        out = StreamingHttpResponse(self._relay(), content_type="text/event-stream")
        out["Cache-Control"] = "no-cache"
        # Tells nginx and similar reverse proxies not to buffer the stream.
        out["X-Accel-Buffering"] = "no"
        out["x-llmrotate-request-id"] = self.ctx.request_id
        out["x-llmrotate-attempts"] = str(self.attempt)
        out["x-llmrotate-key"] = self.key.key_id
        return out

    def _event(self, raw: bytes) -> bytes | None:
        """Inspect one complete event; return what to forward (None drops it)."""
        data = b""
        for line in raw.splitlines():
            if line.startswith(b"data:"):
                data += line[5:].lstrip(b" ")
        if not data:
            return raw
        if data == b"[DONE]":
            self.done = True
            return raw
        try:
            chunk = json.loads(data)
        except ValueError:
            return raw
        if not isinstance(chunk, dict):
            return raw
        if "error" in chunk:
            self.failure = ("stream_error", "upstream_error_event")
            return raw
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if usage:
            self.usage = usage_from(usage)
            if self.ctx.strip_usage and not choices:
                return None
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if content or delta.get("tool_calls") or delta.get("reasoning_content"):
                        now = time.perf_counter()
                        if self.first_token_at is None:
                            self.first_token_at = now
                        self.last_token_at = now
                        if isinstance(content, str):
                            self.pieces.append(content)
                if choice.get("finish_reason"):
                    self.finished = True
        return raw

    async def _relay(self) -> AsyncIterator[bytes]:
        buffer = b""
        busy = 0.0  # time spent in our own parsing, i.e. proxy overhead
        try:
            async for chunk in self.upstream.aiter_bytes():
                t = time.perf_counter()
                buffer += chunk
                if b"\r" in buffer:
                    buffer = buffer.replace(b"\r\n", b"\n")
                out = []
                while True:
                    end = buffer.find(b"\n\n")
                    if end < 0:
                        break
                    event, buffer = buffer[: end + 2], buffer[end + 2 :]
                    forwarded = self._event(event)
                    if forwarded is not None:
                        out.append(forwarded)
                busy += time.perf_counter() - t
                if out:
                    yield b"".join(out)
            if buffer.strip():
                forwarded = self._event(buffer + b"\n\n")
                if forwarded is not None:
                    yield forwarded
            if not (self.done or self.finished) and self.failure is None:
                self.failure = ("stream_error", "truncated")
                yield error_event(
                    "The upstream closed the stream before it finished.", code="stream_truncated"
                )
        except httpx.TimeoutException:
            self.failure = ("timeout", "stream_read_timeout")
            yield error_event("The upstream stopped sending mid-stream.", code="upstream_timeout")
        except (httpx.HTTPError, OSError) as exc:
            self.failure = ("stream_error", type(exc).__name__)
            yield error_event(
                "The upstream connection failed mid-stream.", code="stream_interrupted"
            )
        except (asyncio.CancelledError, GeneratorExit):
            self.failure = ("client_disconnected", "client_disconnected")
            raise
        finally:
            self._finish(busy)
            await self._settle()

    def _finish(self, busy: float) -> None:
        # Synchronous on purpose: it must run even when the task is being cancelled.
        t_end = time.perf_counter()
        outcome, error_type = self.failure or ("success", "")
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
            overhead_ms=self.overhead_ms + busy * 1000,
            usage=self.usage,
            completion_text="".join(self.pieces) if self.usage is None else None,
            ttft_ms=ctx.ms_since_start(self.first_token_at) if self.first_token_at else None,
            ttlt_ms=ctx.ms_since_start(self.last_token_at) if self.last_token_at else None,
        )

    async def _settle(self) -> None:
        store = get_key_state_store()
        outcome = self.failure[0] if self.failure else "success"
        if outcome == "client_disconnected":
            health = Health.CLIENT_ERROR
        elif outcome == "success":
            health = Health.SUCCESS
        else:
            health = Health.UPSTREAM_ERROR
        try:
            await self.upstream.aclose()
            await store.release(self.key.key_id)
            await store.record(
                self.key.key_id,
                health,
                now=time.time(),
                policy=self.deployment.provider.policy,
                headroom=parse_headroom(self.upstream.headers),
                error_type=self.failure[1] if self.failure else None,
            )
        except (asyncio.CancelledError, Exception):
            logger.warning("could not settle key state after stream %s", self.ctx.request_id)
