"""The load generator: keep-alive HTTP/1.1 connections and closed-loop workers.

Two interchangeable clients:

- ``raw`` (default): a minimal HTTP/1.1 client on asyncio streams. It sends a pre-encoded
  request and parses only what it must (status, Content-Length or chunked framing), so the
  client's own cost per request is ~0.1 ms. That matters because the *direct* baseline is a
  sub-millisecond call: a heavier client would inflate the baseline and hide gateway overhead.
- ``httpx``: ``httpx.AsyncClient``, what most Python callers (and the OpenAI SDK) use. Its
  per-request cost is several times higher; the benchmark measures it once as a calibration
  so the choice of the raw client is backed by a number, not by taste.

Workers are closed-loop: each owns one connection and sends the next request as soon as the
previous answer is read, so "concurrency" is the number of requests in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import httpx

# A request that takes this long is a hang, not a latency sample.
REQUEST_TIMEOUT_SECONDS = 30.0
# Keep the first few distinct failures for the report; the count is kept separately.
MAX_ERRORS_KEPT = 5
# Successful calls per target name, warm-ups included: the gateway should have recorded as
# many calls as it answered.
COMPLETED: collections.Counter[str] = collections.Counter()


@dataclass(frozen=True)
class Target:
    """One side of the comparison: the upstream called directly, or the gateway."""

    name: str
    base_url: str  # ends with /v1
    token: str
    model: str

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.base_url).port or 80

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def body(self, *, stream: bool) -> bytes:
        # Identical bodies on both sides, so the only difference measured is the hop.
        payload: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Benchmark: say something short."}],
        }
        if stream:
            payload["stream"] = True
        return json.dumps(payload, separators=(",", ":")).encode()

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}", "content-type": "application/json"}

    def raw_request(self, *, stream: bool) -> bytes:
        body = self.body(stream=stream)
        path = urlsplit(self.url).path
        lines = [f"POST {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in self.headers().items()]
        lines += [f"content-length: {len(body)}", "", ""]
        return "\r\n".join(lines).encode() + body


@dataclass
class Reply:
    status: int
    body: bytes
    first_token_at: float | None = None  # perf_counter() when the first content delta arrived


class SseContentDetector:
    """Fed raw SSE bytes, says when the first event with a non-empty content delta is complete.

    TTFT is "time to first content", not "time to first byte": the first chunk OpenAI sends
    is an empty role delta, which a user does not see.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> bool:
        self._buf += data.replace(b"\r\n", b"\n")
        while (end := self._buf.find(b"\n\n")) >= 0:
            event, self._buf = self._buf[:end], self._buf[end + 2 :]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                try:
                    chunk = json.loads(line[5:])
                except ValueError:
                    continue
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        return True
                # Anthropic's stream (a call straight to /v1/messages): its first text delta.
                if chunk.get("type") == "content_block_delta" and (chunk.get("delta") or {}).get(
                    "text"
                ):
                    return True
        return False


class Connection(Protocol):
    target: Target

    async def request(self, *, stream: bool) -> Reply: ...

    async def aclose(self) -> None: ...


class RawConnection:
    """One keep-alive HTTP/1.1 connection; reconnects lazily after a close or an error."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._requests = {s: target.raw_request(stream=s) for s in (False, True)}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.target.host, self.target.port
            )

    async def request(self, *, stream: bool) -> Reply:
        await self.connect()
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(self._requests[stream])
            return await self._read_reply(self._reader, sse=stream)
        except BaseException:
            # The connection is in an unknown state (half-read reply): never reuse it.
            await self.aclose()
            raise

    async def _read_reply(self, reader: asyncio.StreamReader, *, sse: bool) -> Reply:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        reply = Reply(status=status, body=b"")
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            detector = SseContentDetector() if sse else None
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    break
                data = (await reader.readexactly(size + 2))[:-2]
                if detector is not None and detector.feed(data):
                    reply.first_token_at = time.perf_counter()
                    detector = None
                parts.append(data)
            reply.body = b"".join(parts)
        elif b"content-length" in headers:
            reply.body = await reader.readexactly(int(headers[b"content-length"]))
        else:
            reply.body = await reader.read()  # delimited by the close
            await self.aclose()
        if sse and reply.first_token_at is None and SseContentDetector().feed(reply.body):
            # A non-chunked stream arrives whole: the first token came with the last byte.
            reply.first_token_at = time.perf_counter()
        if headers.get(b"connection", b"").lower() == b"close":
            await self.aclose()
        return reply

    async def aclose(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class HttpxConnection:
    """A worker's handle on a shared ``httpx.AsyncClient`` (its pool holds the connections)."""

    def __init__(self, target: Target, client: httpx.AsyncClient) -> None:
        self.target = target
        self.client = client
        self._bodies = {s: target.body(stream=s) for s in (False, True)}
        self._headers = target.headers()

    async def request(self, *, stream: bool) -> Reply:
        body = self._bodies[stream]
        if not stream:
            response = await self.client.post(self.target.url, content=body, headers=self._headers)
            return Reply(status=response.status_code, body=response.content)
        reply = Reply(status=0, body=b"")
        async with self.client.stream(
            "POST", self.target.url, content=body, headers=self._headers
        ) as response:
            reply.status = response.status_code
            detector: SseContentDetector | None = SseContentDetector()
            parts = []
            async for data in response.aiter_raw():
                if detector is not None and detector.feed(data):
                    reply.first_token_at = time.perf_counter()
                    detector = None
                parts.append(data)
            reply.body = b"".join(parts)
        return reply

    async def aclose(self) -> None:
        pass  # the pool owns the sockets


class Pool:
    """``size`` connections to one target, opened up front so no sample pays a TCP handshake."""

    def __init__(self, target: Target, size: int, client_kind: str) -> None:
        self.target = target
        self.size = size
        self.client_kind = client_kind
        self._client: httpx.AsyncClient | None = None
        self.connections: list[Connection] = []

    async def open(self) -> None:
        if self.client_kind == "raw":
            raw = [RawConnection(self.target) for _ in range(self.size)]
            await asyncio.gather(*(c.connect() for c in raw))
            self.connections = list(raw)
        else:
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=self.size, max_keepalive_connections=self.size),
                timeout=REQUEST_TIMEOUT_SECONDS,
                trust_env=False,
            )
            self.connections = [HttpxConnection(self.target, self._client)] * self.size

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.connections))
        if self._client is not None:
            await self._client.aclose()


@dataclass
class Samples:
    """What one batch of requests produced. Latencies and TTFTs are in seconds."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    error_count: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.latencies)

    def add_error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT and message not in self.errors:
            self.errors.append(message)

    def extend(self, other: Samples) -> None:
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.elapsed += other.elapsed
        self.error_count += other.error_count
        for message in other.errors:
            if len(self.errors) < MAX_ERRORS_KEPT and message not in self.errors:
                self.errors.append(message)


async def _timed(conn: Connection, samples: Samples, *, stream: bool) -> float | None:
    target = conn.target.name
    """Send one request; record its latency (and TTFT) or its error. Returns the end time."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
            reply = await conn.request(stream=stream)
    except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
        samples.add_error(f"{type(exc).__name__}: {exc}")
        return None
    t1 = time.perf_counter()
    if reply.status != 200:
        samples.add_error(f"HTTP {reply.status}: {reply.body[:200]!r}")
        return None
    if stream:
        if reply.first_token_at is None:
            samples.add_error("stream ended without a content delta")
            return None
        samples.ttfts.append(reply.first_token_at - t0)
    samples.latencies.append(t1 - t0)
    COMPLETED[target] += 1
    return t1


async def run_count(pool: Pool, n: int, *, stream: bool = False) -> Samples:
    """Send ``n`` requests with ``pool.size`` in flight; ``elapsed`` is the batch's wall time."""
    samples = Samples()
    remaining = n

    async def worker(conn: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _timed(conn, samples, stream=stream)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in pool.connections))
    samples.elapsed = time.perf_counter() - t0
    return samples


async def run_for(
    pool: Pool, seconds: float, *, ramp: float, on_window: Callable[[str], None] | None = None
) -> Samples:
    """Saturate for ``ramp + seconds``; keep only what completes inside the last ``seconds``.

    Skipping the ramp keeps connection warm-up and the first scheduling hiccups out of the
    throughput figure, and a fixed window (rather than a fixed count) avoids the drain at the
    end of a batch, when fewer than ``pool.size`` requests are still in flight.
    ``on_window("start"/"end")`` lets the caller sample CPU counters at the window's edges.
    """
    everything = Samples()
    window = Samples(elapsed=seconds)
    t_start = time.perf_counter()
    window_start, window_end = t_start + ramp, t_start + ramp + seconds
    stop = False

    async def worker(conn: Connection) -> None:
        while not stop:
            t_done = await _timed(conn, everything, stream=False)
            # _timed appended this request's latency last, with no await in between.
            if t_done is not None and window_start <= t_done <= window_end:
                window.latencies.append(everything.latencies[-1])

    async def edges() -> None:
        nonlocal stop
        await asyncio.sleep(ramp)
        if on_window is not None:
            on_window("start")
        await asyncio.sleep(seconds)
        if on_window is not None:
            on_window("end")
        stop = True

    await asyncio.gather(edges(), *(worker(c) for c in pool.connections))
    window.error_count, window.errors = everything.error_count, everything.errors
    return window


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 1]."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)
