"""A lean HTTP/1.1 transport for httpx: asyncio protocols, httptools' parser, a LIFO pool.

httpx stays the interface (clients, requests, responses, exceptions); only what sits under
`AsyncClient` changes. httpcore's stack costs about 1.2 ms of the event loop per proxied call:
anyio wraps each socket operation, the pool walks and polls every connection on each request
and release, and h11 parses in Python. Here a connection is an `asyncio.Protocol` fed by the
loop, httptools (llhttp, in C) parses, and the pool is a stack per origin: nothing is walked,
and a server that closes an idle connection is seen in `connection_lost`, without polling.

What it does not speak (HTTP/2, proxies, Unix sockets) is the `httpx` choice of
`LLMROTATE_UPSTREAM_TRANSPORT` (common/upstream.py); a URL of another scheme than http or https
is handed to an `httpx.AsyncHTTPTransport` made on first use (`FastTransport._fallback`).

Errors are the httpx exceptions httpcore's stack raises in the same situations, so callers'
`except` clauses and the recorded error types (`ReadError`, `RemoteProtocolError`, ...) stay.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

# Unread body bytes held per connection before the socket stops being read: a fast upstream
# and a slow reader must not grow memory without bound.
HIGH_WATER = 256 * 1024
# A request body larger than this is written apart from the head, not copied into it.
_SEPARATE_BODY = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
_DISCONNECTED = "Server disconnected without sending a response."
_INCOMPLETE = "peer closed connection without sending complete message body"


def default_ssl_context() -> ssl.SSLContext:
    """What `httpx.AsyncHTTPTransport(trust_env=False)` verifies with (certifi's CA bundle),
    offering HTTP/1.1 only in ALPN."""
    context = httpx.create_ssl_context(trust_env=False)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


async def _waited(waiter: asyncio.Future[bool], seconds: float | None) -> bool:
    """Await `waiter`, which the protocol resolves with False; True when `seconds` ran out
    first. One timer handle, not a task per wait as asyncio.wait_for would make."""
    handle = None if seconds is None else waiter.get_loop().call_later(seconds, _expire, waiter)
    try:
        return await waiter
    finally:
        if handle is not None:
            handle.cancel()


class _Connection(asyncio.Protocol):
    """One socket, and the state of the exchange under way on it (one at a time)."""

    __slots__ = (
        "buffered",
        "chunks",
        "complete",
        "drain_waiter",
        "error",
        "head_only",
        "headers",
        "headers_done",
        "idle",
        "idle_since",
        "informational",
        "loop",
        "lost",
        "parser",
        "pool",
        "read_paused",
        "reason",
        "reusable",
        "status",
        "transport",
        "waiter",
        "write_paused",
    )

    def __init__(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[bool] | None = None
        self.drain_waiter: asyncio.Future[bool] | None = None
        self.write_paused = False
        self.read_paused = False
        self.parser: httptools.HttpResponseParser | None = None
        self._reset()

    def _reset(self) -> None:
        self.head_only = False
        self.informational = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.reusable = False
        self.error: httpx.HTTPError | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A request head and its body go out at once, not after a delayed ACK.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:
            # Bytes nobody asked for: the connection cannot be trusted with another exchange.
            self.reusable = False
            self.abort()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols (never asked for): the answer ends with its head.
            if self.headers_done:
                self._finish(False)
            else:
                self.error = httpx.RemoteProtocolError("unexpected protocol upgrade")
            self.abort()
        except httptools.HttpParserError as exc:
            if not self.complete:
                self.error = httpx.RemoteProtocolError(f"malformed HTTP response: {exc}")
            self.reusable = False
            self.abort()
        self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost says what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        if self.idle:
            self.pool.drop_idle(self)
            return
        if self.parser is not None and not self.complete and self.error is None:
            if exc is not None:
                self.error = httpx.ReadError(str(exc) or type(exc).__name__)
            elif not self.headers_done:
                self.error = httpx.RemoteProtocolError(_DISCONNECTED)
            elif self._framed():
                self.error = httpx.RemoteProtocolError(_INCOMPLETE)
            else:
                self._finish(False)  # a body delimited by the end of the connection
        self._wake()
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(False)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(False)

    # ---- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.reusable = False  # a second answer to one request

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            # 100 Continue, 103 Early Hints: the answer proper follows (httpcore skips them too).
            self.informational = True
            self.headers = []
            self.reason = b""
            return
        self.status = status
        self.headers_done = True
        if self.head_only or status in _NO_BODY_STATUS:
            # llhttp cannot be told that a HEAD answer has no body: end it here.
            self._finish(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.reusable = False
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if not self.complete:
            assert self.parser is not None
            self._finish(self.parser.should_keep_alive())

    # ---- used by the transport ------------------------------------------------------------

    def _finish(self, keep_alive: bool) -> None:
        self.complete = True
        self.reusable = keep_alive and self.error is None and not self.lost

    def _framed(self) -> bool:
        """Whether the body's end is announced (length or chunks), so EOF before it is short."""
        if self.head_only or self.status in _NO_BODY_STATUS:
            return False
        for name, _ in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or lowered == b"transfer-encoding":
                return True
        return False

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """End the socket: gracefully after a whole exchange, at once otherwise."""
        transport = self.transport
        if transport is None or self.lost:
            return
        if self.complete and self.error is None:
            transport.close()
        else:
            transport.abort()

    def begin(self, head_only: bool) -> None:
        """Start an exchange: a fresh parser (after a HEAD answer llhttp would await a body)."""
        self._reset()
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)
        if self.lost:
            self.error = httpx.RemoteProtocolError(_DISCONNECTED)

    def write(self, data: bytes) -> None:
        # A write to a dead socket is skipped, as httpcore suppresses WriteError: the read
        # that follows says what happened (and a server may have answered before closing).
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    async def drain(self, seconds: float | None) -> None:
        if not self.write_paused or self.lost:
            return
        self.drain_waiter = waiter = self.loop.create_future()
        try:
            timed_out = await _waited(waiter, seconds)
        finally:
            self.drain_waiter = None
        if timed_out:
            raise httpx.WriteTimeout("timed out writing the request")

    async def _wait(self, seconds: float | None) -> None:
        self.waiter = waiter = self.loop.create_future()
        try:
            timed_out = await _waited(waiter, seconds)
        finally:
            self.waiter = None
        if timed_out:
            raise httpx.ReadTimeout("timed out waiting for the upstream")

    async def receive_head(self, seconds: float | None) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(seconds)

    async def receive(self, seconds: float | None) -> bytes:
        """What has arrived of the body (waiting for some), or b"" at its end."""
        while True:
            chunks = self.chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.chunks = []
                self.buffered = 0
                if self.read_paused:
                    self.read_paused = False
                    if not self.lost and self.transport is not None:
                        self.transport.resume_reading()
                return data
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            await self._wait(seconds)


class _Body(httpx.AsyncByteStream):
    """A response body as it arrives; the connection goes back to the pool at its end."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, conn: _Connection | None, pool: _Pool, timeout: float | None) -> None:
        self._conn = conn
        self._pool = pool
        self._timeout = timeout

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            data = await conn.receive(self._timeout)
        except BaseException:
            self._give_back(conn)
            raise
        if conn.complete and not conn.chunks:
            # All of it is in hand: the connection is free before the caller asks again.
            self._give_back(conn)
        if not data:
            raise StopAsyncIteration
        return data

    def _give_back(self, conn: _Connection) -> None:
        # Once: an aclose() from another task while this one waited has given it back already.
        if self._conn is conn:
            self._conn = None
            self._pool.release(conn)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)  # unfinished: closed, not reused


class _Pool:
    """The connections to one origin: a stack of idle ones (the most recently used is taken
    first, so under light traffic few stay warm) and a count of every one open or opening."""

    def __init__(
        self,
        transport: FastTransport,
        scheme: str,
        host: str,
        port: int,
        limits: httpx.Limits,
    ) -> None:
        self.transport = transport
        self.https = scheme == "https"
        self.host = host
        self.port = port
        self.max_connections = limits.max_connections
        self.max_idle = limits.max_keepalive_connections
        self.expiry = limits.keepalive_expiry
        self.idle: collections.deque[_Connection] = collections.deque()
        self.conns: set[_Connection] = set()
        # Slots taken: connections open, being opened, or handed to a waiter.
        self.count = 0
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self.closed = False

    async def acquire(self, seconds: float | None) -> _Connection | None:
        """A slot: an idle connection, or None for one to open. Pair with `release` (a
        connection) or `free_slot` (none was opened)."""
        idle = self.idle
        if idle:
            if self.expiry is not None:
                # The oldest idle connection may have outlived the server's patience; one
                # check per call keeps the stack's bottom clean without walking it.
                oldest = idle[0]
                if time.monotonic() - oldest.idle_since > self.expiry:
                    idle.popleft()
                    oldest.idle = False
                    self._close(oldest)
                    self.count -= 1
            if idle:
                conn = idle.pop()
                conn.idle = False
                return conn
        if self.max_connections is None or self.count < self.max_connections:
            self.count += 1
            return None
        return await self._wait_for_slot(seconds)

    async def _wait_for_slot(self, seconds: float | None) -> _Connection | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self.waiters.append(waiter)
        handle = None if seconds is None else loop.call_later(seconds, self._time_out, waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # A slot was handed over as we were cancelled: pass it on.
                conn = waiter.result()
                if conn is None:
                    self.free_slot()
                else:
                    self.release(conn)
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise
        finally:
            if handle is not None:
                handle.cancel()

    @staticmethod
    def _time_out(waiter: asyncio.Future[_Connection | None]) -> None:
        if not waiter.done():
            waiter.set_exception(httpx.PoolTimeout("no connection free in the pool in time"))

    def _hand_over(self, conn: _Connection | None) -> bool:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def free_slot(self) -> None:
        if not self._hand_over(None):
            self.count -= 1

    def release(self, conn: _Connection) -> None:
        """Give a connection back after its exchange: kept when it may carry another.

        Not when the caller left part of the body unread: reading may be paused on it (the
        next exchange would then never be read) and the unread chunks would stay in memory.
        """
        if (
            conn.reusable
            and conn.complete
            and not conn.chunks
            and not conn.read_paused
            and not conn.lost
            and not self.closed
        ):
            conn.parser = None
            if self._hand_over(conn):
                return
            if self.max_idle is None or len(self.idle) < self.max_idle:
                conn.idle = True
                conn.idle_since = time.monotonic()
                self.idle.append(conn)
                return
        self._close(conn)
        self.free_slot()

    def forget(self, conn: _Connection) -> None:
        """A connection found dead when taken: its slot stays with the taker."""
        self.conns.discard(conn)

    def drop_idle(self, conn: _Connection) -> None:
        """The server closed an idle connection."""
        conn.idle = False
        try:
            self.idle.remove(conn)
        except ValueError:
            return
        self.conns.discard(conn)
        self.free_slot()

    def _close(self, conn: _Connection) -> None:
        self.conns.discard(conn)
        conn.close()

    async def connect(self, seconds: float | None, sni_hostname: str | None) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, loop)
        context = self.transport.ssl_context() if self.https else None
        try:
            async with asyncio.timeout(seconds):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=context,
                    server_hostname=(sni_hostname or self.host) if context else None,
                )
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            conn.abort()
            raise httpx.ConnectTimeout(str(exc) or "timed out connecting") from exc
        except OSError as exc:  # refused, unreachable, DNS, TLS (certificate) errors
            conn.abort()
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        self.conns.add(conn)
        return conn

    def close(self) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(httpx.ConnectError("the connection pool was closed"))
        self.idle.clear()
        for conn in list(self.conns):
            conn.idle = False
            conn.abort()
        self.conns.clear()


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio with keep-alive pools per origin (limits apply per origin; the
    gateway's clients each talk to one base URL). `ssl_context` replaces the default
    verification (certifi's CAs, as httpx does), e.g. for a test's own CA."""

    def __init__(
        self,
        limits: httpx.Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.limits = limits or httpx.Limits()
        self._ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._fallback_transport: httpx.AsyncHTTPTransport | None = None

    def ssl_context(self) -> ssl.SSLContext:
        # Made on first use: loading the CA bundle costs ~30 ms, and plain-HTTP upstreams
        # (local servers) never need it.
        if self._ssl_context is None:
            self._ssl_context = default_ssl_context()
        return self._ssl_context

    def _fallback(self) -> httpx.AsyncHTTPTransport:
        if self._fallback_transport is None:
            self._fallback_transport = httpx.AsyncHTTPTransport(limits=self.limits, trust_env=False)
        return self._fallback_transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme != "http" and scheme != "https":
            return await self._fallback().handle_async_request(request)
        # The host as it goes on the wire (IDNA-encoded by httpx), for the lookup and SNI.
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if scheme == "https" else 80)
        pool = self._pools.get((scheme, host, port))
        if pool is None:
            pool = self._pools[(scheme, host, port)] = _Pool(self, scheme, host, port, self.limits)
        timeouts = request.extensions.get("timeout") or {}
        read_timeout = timeouts.get("read")
        head = _request_head(request)
        method = request.method

        conn = await pool.acquire(timeouts.get("pool"))
        try:
            if conn is None or conn.lost:
                if conn is not None:
                    pool.forget(conn)
                    conn = None
                conn = await pool.connect(
                    timeouts.get("connect"), request.extensions.get("sni_hostname")
                )
            conn.begin(head_only=method == "HEAD")
            await _send(conn, request, head, timeouts.get("write"))
            await conn.receive_head(read_timeout)
        except BaseException:
            if conn is None:
                pool.free_slot()
            else:
                conn.reusable = False
                pool.release(conn)
            raise

        body: _Body
        if conn.complete and not conn.chunks:
            pool.release(conn)
            body = _Body(None, pool, read_timeout)
        else:
            body = _Body(conn, pool, read_timeout)
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason.strip()},
        )

    async def aclose(self) -> None:
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            pool.close()
        if self._fallback_transport is not None:
            await self._fallback_transport.aclose()


def _request_head(request: httpx.Request) -> bytes:
    headers = request.headers.raw
    if not headers or headers[0][0].lower() != b"host":
        # httpx puts Host first; a request built otherwise gets it moved (or added) there.
        rest = [(k, v) for k, v in headers if k.lower() != b"host"]
        host = [(k, v) for k, v in headers if k.lower() == b"host"][:1]
        headers = (host or [(b"Host", request.url.netloc)]) + rest
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    # One count per byte instead of a check per header: a CR, LF or NUL inside a name, a
    # value or the target would let a caller smuggle headers or a second request.
    expected = len(lines)
    if head.count(b"\n") != expected or head.count(b"\r") != expected or b"\0" in head:
        raise httpx.LocalProtocolError("illegal character in the request line or a header")
    return head


async def _send(
    conn: _Connection, request: httpx.Request, head: bytes, seconds: float | None
) -> None:
    try:
        content = request.content  # bytes content (the usual case) is already read
    except httpx.RequestNotRead:
        stream = request.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        chunked = "content-length" not in request.headers
        if chunked and "transfer-encoding" not in request.headers:
            head = head[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
        conn.write(head)
        async for part in stream:
            if conn.lost:
                return  # httpcore stops too; the read says why
            if not part:
                continue
            conn.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            await conn.drain(seconds)
        if chunked:
            conn.write(b"0\r\n\r\n")
        await conn.drain(seconds)
        return
    if len(content) > _SEPARATE_BODY:
        conn.write(head)
        conn.write(content)
    else:
        conn.write(head + content)
    await conn.drain(seconds)
