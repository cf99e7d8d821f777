"""ASGI entry point: `llmrotate_site.asgi:application`.

Django's ASGI handler does not speak the lifespan protocol, so this wrapper does: at shutdown
it flushes the call-record buffer and closes the pooled upstream clients. While running, it
keeps this process's copy of the circuit breakers fresh (healthchecks/gate.py) and, in
embedded mode, runs the scheduled key re-validation (proxy/recheck.py). It also refuses an
oversized body from its Content-Length before Django reads it into memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmrotate_site.settings")

django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (settings need the app registry first)

logger = logging.getLogger("llmrotate")

_handler: Any = django_application
if settings.LLMROTATE_SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    _handler = ASGIStaticFilesHandler(django_application)

Scope = dict[str, Any]


async def _lifespan(receive: Any, send: Any) -> None:
    from asgiref.sync import sync_to_async

    from healthchecks.gate import get_breaker_gate
    from proxy.recheck import keys_revalidate_forever
    from proxy.upstream import upstream_clients_close
    from usage.recorder import get_recorder

    background: list[asyncio.Task[None]] = []
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            loop = asyncio.get_running_loop()
            # Circuit breakers changed by the worker's probes or other processes reach this
            # process's routing within LLMROTATE_BREAKER_SYNC_SECONDS.
            background.append(loop.create_task(get_breaker_gate().sync_forever()))
            if not settings.REDIS_URL:
                # Embedded mode: key state lives in this process, so this process re-validates
                # quarantined and exhausted keys itself (scaled out, a Celery task does it).
                background.append(
                    loop.create_task(
                        keys_revalidate_forever(interval=settings.LLMROTATE_KEY_REVALIDATE_SECONDS)
                    )
                )
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            for task in background:
                task.cancel()
            await upstream_clients_close()
            # Graceful stop: nothing recorded in memory may be lost.
            await sync_to_async(get_recorder().stop, thread_sensitive=False)()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _too_large(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value) > settings.LLMROTATE_MAX_REQUEST_BYTES
            except ValueError:
                return False
    return False


async def _reject_too_large(send: Any) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"Request body is larger than "
                f"{settings.LLMROTATE_MAX_REQUEST_BYTES} bytes.",
                "type": "invalid_request_error",
                "code": "request_too_large",
                "param": None,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def application(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] == "http" and _too_large(scope):
        await _reject_too_large(send)
        return
    await _handler(scope, receive, send)
