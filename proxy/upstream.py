"""Pooled upstream HTTP clients: one `httpx.AsyncClient` per upstream base URL and event loop.

Building a client per request would pay for a new connection pool (and TLS handshakes) every
time, so clients live as long as the process. httpx pools are bound to the event loop that
created them, hence the loop in the cache key: tests and `async_to_sync` run other loops.

Tests inject an `httpx.MockTransport` with `set_transport_factory`; everything else goes through
the real network stack to the configured base URL.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import httpx
from django.conf import settings

TransportFactory = Callable[[], httpx.AsyncBaseTransport]

_clients: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}
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


def upstream_client(base_url: str) -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    cache_key = (id(loop), base_url)
    entry = _clients.get(cache_key)
    if entry is not None and entry[0] is loop:
        return entry[1]
    limit = settings.LLMROTATE_UPSTREAM_MAX_CONNECTIONS
    client = httpx.AsyncClient(
        timeout=_timeout(),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        transport=_transport_factory() if _transport_factory else None,
        # The proxy speaks for the client; environment proxies and .netrc are not the
        # operator's intent for upstream calls carrying provider keys.
        trust_env=False,
        follow_redirects=False,
    )
    with _lock:
        _clients[cache_key] = (loop, client)
    return client


async def upstream_clients_close() -> None:
    """Close the clients that belong to the running loop (graceful shutdown)."""
    loop = asyncio.get_running_loop()
    with _lock:
        mine = [key for key, (owner, _) in _clients.items() if owner is loop]
        clients = [_clients.pop(key)[1] for key in mine]
    for client in clients:
        await client.aclose()
