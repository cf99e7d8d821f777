"""Pooled upstream HTTP clients (one `httpx.AsyncClient` per upstream base URL and event loop),
and the headers that authenticate a call with a provider key. Shared by the proxy and the
health checks (probes, key re-validation).

Building a client per request would pay for a new connection pool (and TLS handshakes) every
time, so clients live as long as the process. httpx pools are bound to the event loop that
created them, hence the loop in the cache key: tests and `async_to_sync` run other loops.

Tests inject an `httpx.MockTransport` with `set_transport_factory`; everything else goes through
the real network stack to the configured base URL: `common/fasthttp.py` by default, httpx's own
(httpcore) transport, sharded, when `LLMROTATE_UPSTREAM_TRANSPORT` is `httpx`.

A shared client must not carry state from one call to the next: it keeps no cookies (a
`Set-Cookie` answered to one client's call, with one organisation's key, would otherwise be
sent with everyone's calls on that base URL), follows no redirects and ignores environment
proxies.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import itertools
import math
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from common.fasthttp import FastTransport

TransportFactory = Callable[[], httpx.AsyncBaseTransport]
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"

_clients: dict[tuple[int, str], _Upstream] = {}
_lock = threading.Lock()
_transport_factory: TransportFactory | None = None


def set_transport_factory(factory: TransportFactory | None) -> None:
    """Route every upstream call through `factory()`'s transport (tests), or back to the network."""
    global _transport_factory
    _transport_factory = factory
    with _lock:
        # Clients made with the old transport must not be reused; they are closed lazily by GC
        # because their loop may already be gone.
        _clients.clear()


def _timeout() -> httpx.Timeout:
    return httpx.Timeout(
        connect=settings.LLMROTATE_CONNECT_TIMEOUT_SECONDS,
        read=settings.LLMROTATE_READ_TIMEOUT_SECONDS,
        write=settings.LLMROTATE_READ_TIMEOUT_SECONDS,
        pool=settings.LLMROTATE_CONNECT_TIMEOUT_SECONDS,
    )


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several connection pools behind one client, taken in turn.

    httpcore's pool walks every connection it holds on each request and each release, and
    polls each idle socket to see whether the server closed it: work proportional to the pool's
    size on every call. With 64 calls in flight that walk was a fifth of the gateway's CPU
    (docs/benchmarks.md); pools a few times smaller keep it short.
    """

    def __init__(self, shards: list[httpx.AsyncBaseTransport]) -> None:
        self.shards = shards
        self._turn = itertools.cycle(shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._turn).handle_async_request(request)

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()


def _network_transport() -> httpx.AsyncBaseTransport:
    limit = settings.LLMROTATE_UPSTREAM_MAX_CONNECTIONS
    if settings.LLMROTATE_UPSTREAM_TRANSPORT == "fast":
        # One stack of idle connections per origin, nothing walked per call: no shards.
        return FastTransport(
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        )
    shards = max(1, settings.LLMROTATE_UPSTREAM_POOL_SHARDS)
    # Turns are strict, and streams last unequally long, so one pool can be busier than the
    # others: each may open up to the whole limit rather than queue behind a fixed share while
    # the others sit idle. What is kept open between calls is split, so the idle connections
    # of all pools together stay within the limit.
    limits = httpx.Limits(
        max_connections=limit, max_keepalive_connections=math.ceil(limit / shards)
    )
    # trust_env=False: environment proxies and .netrc are not the operator's intent for
    # upstream calls that carry provider keys.
    pools: list[httpx.AsyncBaseTransport] = [
        httpx.AsyncHTTPTransport(limits=limits, trust_env=False) for _ in range(shards)
    ]
    return pools[0] if shards == 1 else ShardedTransport(pools)


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Refuses to keep any cookie, so none is ever sent back."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def _cookieless_jar() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(policy=_NoCookies())


class ResponseTooLarge(Exception):
    """An upstream answer larger than the gateway will hold in memory."""


def body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """A streamed response's body as it arrives, decoded. Unless the upstream compressed it,
    these are the transport's own pieces: `aiter_bytes` would pass each through three async
    generators, a re-chunker, a decoder that changes nothing and a context manager, a few
    per cent of the worker's CPU (docs/benchmarks.md). Closing the response ends either."""
    if "content-encoding" in response.headers or not isinstance(
        response.stream, httpx.AsyncByteStream
    ):
        return response.aiter_bytes()
    return aiter(response.stream)


async def read_bounded(
    response: httpx.Response, limit: int, *, seen: Callable[[bytes], None] | None = None
) -> bytes:
    """The body of a streamed response, refusing to hold more than `limit` bytes of it (after
    decompression, so a compressed bomb is caught too). `seen` is shown each piece as it
    arrives (a wire capture keeps what came before a reset)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge
    parts: list[bytes] = []
    size = 0
    async for chunk in body_chunks(response):
        if seen is not None:
            seen(chunk)
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge
        parts.append(chunk)
    return b"".join(parts)


@dataclass(frozen=True)
class _Upstream:
    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    transport: httpx.AsyncBaseTransport
    # The client's default headers (Accept, Accept-Encoding, Connection, User-Agent) as
    # (name, lower-case name, value), in the order httpx sends them.
    defaults: tuple[tuple[str, str, str], ...]


def _upstream(base_url: str) -> _Upstream:
    loop = asyncio.get_running_loop()
    cache_key = (id(loop), base_url)
    entry = _clients.get(cache_key)
    if entry is not None and entry.loop is loop:
        return entry
    transport = _transport_factory() if _transport_factory else _network_transport()
    client = httpx.AsyncClient(
        timeout=_timeout(),
        transport=transport,
        trust_env=False,
        follow_redirects=False,
        cookies=_cookieless_jar(),
    )
    defaults = tuple(
        (name.decode("latin-1"), name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in client.headers.raw
    )
    entry = _Upstream(loop, client, transport, defaults)
    with _lock:
        _clients[cache_key] = entry
    return entry


def upstream_client(base_url: str) -> httpx.AsyncClient:
    return _upstream(base_url).client


_URLS_KEPT = 1024
_urls: dict[str, httpx.URL] = {}


def upstream_request(
    base_url: str,
    url: str,
    *,
    content: bytes,
    headers: dict[str, str],
    timeout: httpx.Timeout,
) -> httpx.Request:
    """The POST `upstream_client(base_url).build_request(...)` would build, byte for byte,
    for `upstream_send`: the client's default headers but those `headers` name, then
    `headers`."""
    given = {name.lower() for name in headers}
    defaults = _upstream(base_url).defaults
    merged = [(name, value) for name, lower, value in defaults if lower not in given]
    merged.extend(headers.items())
    parsed = _urls.get(url)
    if parsed is None:
        # Parsing a URL is most of what building a request costs; the gateway calls a few.
        parsed = httpx.URL(url)
        if len(_urls) < _URLS_KEPT:
            _urls[url] = parsed
    return httpx.Request(
        "POST", parsed, content=content, headers=merged, extensions={"timeout": timeout.as_dict()}
    )


async def upstream_send(base_url: str, request: httpx.Request) -> httpx.Response:
    """`client.send(request, stream=True)` for the proxy's calls, straight to the transport.

    The client's own layer (auth and redirect handling, cookie extraction, event hooks,
    timers) cost as much CPU per call as the transport does (docs/benchmarks.md), and the
    proxy uses none of it: no auth, no redirects followed, no cookies kept. The answer is the
    same streamed response; it must be read or closed as `send`'s is.
    """
    response = await _upstream(base_url).transport.handle_async_request(request)
    response.request = request
    return response


async def upstream_clients_close() -> None:
    """Close the clients that belong to the running loop (graceful shutdown)."""
    loop = asyncio.get_running_loop()
    with _lock:
        mine = [key for key, entry in _clients.items() if entry.loop is loop]
        clients = [_clients.pop(key).client for key in mine]
    for client in clients:
        await client.aclose()


def upstream_headers(kind: str, secret: str, *, stream: bool) -> dict[str, str]:
    """Headers of an OpenAI-format call (also used by the key re-check and the HTTP probes)."""
    headers = {"Content-Type": "application/json"}
    if secret:  # none for a keyless provider (a local server)
        headers["Authorization"] = f"Bearer {secret}"
    if kind == "anthropic":
        # Anthropic's OpenAI-compatible endpoint takes the bearer key; the native header is
        # sent as well so that gateways in front of it that expect it work too.
        headers["x-api-key"] = secret
        headers["anthropic-version"] = DEFAULT_ANTHROPIC_VERSION
    if stream:
        # A compressed event stream would be buffered by the decoder; ask for plain bytes.
        headers["Accept-Encoding"] = "identity"
        headers["Accept"] = "text/event-stream"
    return headers


def messages_headers(secret: str, *, stream: bool) -> dict[str, str]:
    """Headers of a call to Anthropic's native Messages API: `x-api-key` only (a bearer there
    is read as an OAuth token and refused)."""
    headers = {
        "x-api-key": secret,
        "anthropic-version": DEFAULT_ANTHROPIC_VERSION,
        "Content-Type": "application/json",
    }
    if stream:
        headers["Accept-Encoding"] = "identity"
        headers["Accept"] = "text/event-stream"
    return headers
