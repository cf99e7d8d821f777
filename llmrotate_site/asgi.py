"""ASGI entry point: `llmrotate_site.asgi:application`.

Django's ASGI handler does not speak the lifespan protocol, so this wrapper does: at shutdown
it flushes the call-record buffer and closes the pooled upstream clients. While running, it
keeps this process's copy of the circuit breakers fresh (healthchecks/gate.py) and, in
embedded mode, runs the scheduled key re-validation (healthchecks/key_recheck.py). It also
refuses an oversized body (413) from its Content-Length, or while receiving one sent without
(chunked), before Django reads it whole, and sends the proxy's `/v1/` calls past the middleware
stack (ProxyHandler).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
from typing import Any

from asgiref.sync import sync_to_async
from django.core.asgi import get_asgi_application
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import ResolverMatch, URLResolver, get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmrotate_site.settings")

django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (settings need the app registry first)
from django.db import connections  # noqa: E402

# The app registry is ready from here on (get_asgi_application above set it up).
from common import telemetry  # noqa: E402
from common.db import db_thread_close  # noqa: E402
from common.errors import ApiError, anthropic_caller, invalid_body, missing_token  # noqa: E402
from common.upstream import upstream_clients_close  # noqa: E402
from healthchecks.gate import get_breaker_gate  # noqa: E402
from healthchecks.key_recheck import keys_revalidate_forever  # noqa: E402
from keys.auth import client_token_verified  # noqa: E402
from keys.routing import RoutingUnavailable  # noqa: E402
from llmrotate_site.api import routing_unavailable  # noqa: E402
from llmrotate_site.beat import keys_revalidation_schedule  # noqa: E402
from llmrotate_site.metrics import otel_gauges_register  # noqa: E402
from proxy.calls import refusal_record  # noqa: E402
from proxy.validation import body_too_large  # noqa: E402
from usage.capture.writer import capture_writer_stop  # noqa: E402
from usage.recorder import get_recorder  # noqa: E402

logger = logging.getLogger("llmrotate")

Scope = dict[str, Any]

_handler: Any = django_application
if settings.LLMROTATE_SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    _handler = ASGIStaticFilesHandler(django_application)


_MATCHES_KEPT = 256


class ProxyHandler(ASGIHandler):
    """Django's ASGI handler for `/v1/`, trimmed to what the proxy needs.

    Django's own handler costs the proxy most of its CPU (docs/benchmarks.md): each sync
    middleware is two thread hand-offs per request (MiddlewareMixin runs it through
    sync_to_async), the per-request ThreadSensitiveContext starts and joins a thread, and the
    request_started/finished signals and `response.close()` are two more hand-offs. The proxy
    needs none of it. Clients authenticate with a bearer token (no session, CSRF or messages);
    the ALLOWED_HOSTS check and nosniff that CommonMiddleware and SecurityMiddleware would give
    are done here. The signals exist to recycle database connections, and the proxy never
    touches the database on a request: its reads (routing snapshot, breaker sync) run in the
    background and recycle their own connection (keys.routing, healthchecks.gate).

    What is kept is Django's handling of a client that hangs up: the view is cancelled, so
    the failover engine can release its key and record the attempt.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        self._middleware_chain = convert_exception_to_response(self._proxy_response)
        self._resolver: URLResolver | None = None
        self._matches: dict[str, ResolverMatch] = {}

    def resolve_request(self, request: HttpRequest) -> ResolverMatch:
        # Resolving walks the site's patterns (about 35 µs a request); the proxy has a handful
        # of paths, and a path's match stays the same until the URLconf does. Bounded, since
        # paths with a parameter (/v1/models/{id}) are as many as callers make up.
        resolver = get_resolver()
        if resolver is not self._resolver:
            self._resolver, self._matches = resolver, {}
        match = self._matches.get(request.path_info)
        if match is None:
            match = resolver.resolve(request.path_info)
            if len(self._matches) < _MATCHES_KEPT:
                self._matches[request.path_info] = match
        request.resolver_match = match
        return match

    async def _proxy_response(self, request: HttpRequest) -> HttpResponseBase:
        request.get_host()  # DisallowedHost becomes a 400, as behind CommonMiddleware
        response = await self._get_response_async(request)  # type: ignore[attr-defined]
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["method"] == "POST":
            # Authenticated before the body is read: a caller without a valid token gets its
            # 401 without having its upload received. (The view checks scopes and routes.)
            refusal = await _without_valid_token(scope)
            if refusal is not None:
                await _send_error(scope, send, refusal)
                return
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        with body_file:
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                assert error_response is not None
                await self.send_response(error_response, send)
                return
            await self._serve(request, receive, send)

    async def _serve(self, request: HttpRequest, receive: Any, send: Any) -> None:
        # As in ASGIHandler.handle, a client that hangs up cancels the response. Django runs
        # the response in a task of its own and waits for whichever ends first; here it runs
        # in this task and the listener cancels it, which saves a task and a wait per request
        # (5 % of the worker's CPU at 64 in flight, docs/benchmarks.md).
        current = asyncio.current_task()
        assert current is not None
        hung_up = False

        async def listen() -> None:
            nonlocal hung_up
            # AssertionError: a message other than a disconnect after the body; the
            # connection is no use for an answer either.
            with contextlib.suppress(RequestAborted, AssertionError):
                await self.listen_for_disconnect(receive)
            hung_up = True
            current.cancel()

        listener = asyncio.create_task(listen())
        response: HttpResponseBase | None = None
        try:
            response = await self.run_get_response(request)
            capture = getattr(request, "llmrotate_capture", None)
            sender = send if capture is None else capture.sender(send)
            # The client may go away while the body is being sent; the response is still
            # closed below.
            if response.streaming:
                # A client that stops reading parks the relay where it yields (the server's
                # flow control), holding the upstream call and its key: bounded whole. A
                # client that reads gets the relay's own end first (it checks the time at
                # each chunk, and one comes within the read timeout).
                limit = (
                    settings.LLMROTATE_MAX_STREAM_SECONDS + settings.LLMROTATE_READ_TIMEOUT_SECONDS
                )
                async with asyncio.timeout(limit):
                    await self.send_response(response, sender)
            else:
                await self.send_response(response, sender)
        except asyncio.CancelledError:
            # Not (only) the client: the server is stopping.
            if not hung_up or current.uncancel() > 0:
                raise
        except TimeoutError:
            logger.info("a streamed answer's client read too slowly; cut off")
        finally:
            listener.cancel()
            if response is not None:
                await _close(response)
        capture = getattr(request, "llmrotate_capture", None)
        if capture is not None:
            # Unless its last byte went out (the leg ended then), the client left first.
            capture.client.end("client_disconnected")


async def _without_valid_token(scope: Scope) -> ApiError | None:
    """Why the request's client token (bearer, else `x-api-key`) is refused, or None."""

    headers = dict(scope.get("headers", ()))
    scheme, _, bearer = headers.get(b"authorization", b"").partition(b" ")
    token = bearer.strip() if scheme.lower() == b"bearer" else headers.get(b"x-api-key", b"")
    if not token:
        text = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        return missing_token(anthropic=anthropic_caller(scope["path"], text))
    client = scope.get("client") or ("unknown", 0)
    try:
        await client_token_verified(token.decode("latin-1"), source=str(client[0]))
    except ApiError as refusal:
        return refusal
    except RoutingUnavailable as exc:
        return routing_unavailable(exc)
    return None


async def _close(response: HttpResponseBase) -> None:
    """Close the response (a streamed body's iterator too), and with it fire request_finished.

    Its receivers recycle this thread's database connections. The gateway never opens one on
    the event loop's thread, so there is nothing to do and no reason for a thread hop; where
    one is open after all (a test's database, set up on the loop's thread), closing it here
    would be a synchronous database call in async code, so that case goes through a thread.
    """
    if any(True for _ in connections.all(initialized_only=True)):
        await sync_to_async(response.close, thread_sensitive=True)()
    else:
        response.close()


_proxy_handler = ProxyHandler()


# Collect the youngest objects after this many more allocations than deallocations (Python's
# default is 700). See _collector_tune.
GC_YOUNG_THRESHOLD = 5000


def _collector_tune() -> None:
    """Keep the garbage collector's cost per request flat as calls in flight grow.

    With 64 calls in flight their objects outlive the youngest generation, so each collection
    of it walks more of them and promotes them, and full collections walked the ~175,000
    objects of the loaded code as well: 100 µs a request at 64 in flight, 8 at 1
    (docs/benchmarks.md). What start-up made lives as long as the process: frozen, full
    collections skip it. A higher threshold for the youngest generation makes collections
    fewer, each still short.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def _lifespan(receive: Any, send: Any) -> None:

    background: list[asyncio.Task[None]] = []
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # OpenTelemetry, if the `otel` extra is installed and OTEL_* variables ask for it;
            # otherwise nothing of it is imported. The shared-state gauges of /metrics are
            # offered to it first (bound only if it turns on).
            otel_gauges_register()
            telemetry.configure()
            loop = asyncio.get_running_loop()
            # Circuit breakers changed by the worker's probes or other processes reach this
            # process's routing within LLMROTATE_BREAKER_SYNC_SECONDS.
            background.append(loop.create_task(get_breaker_gate().sync_forever()))
            if not settings.REDIS_URL:
                # Embedded mode: key state lives in this process, so this process re-validates
                # quarantined and exhausted keys itself (scaled out, a Celery task does it).
                background.append(
                    loop.create_task(
                        keys_revalidate_forever(
                            schedule=functools.partial(
                                keys_revalidation_schedule,
                                default=settings.LLMROTATE_KEY_REVALIDATE_SECONDS,
                            )
                        )
                    )
                )
            _collector_tune()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            for task in background:
                task.cancel()
            await upstream_clients_close()
            # Graceful stop: nothing recorded in memory may be lost.
            await sync_to_async(get_recorder().stop, thread_sensitive=False)()
            await sync_to_async(capture_writer_stop, thread_sensitive=False)()
            # After the recorder: its last records update the metrics exported here.
            await sync_to_async(telemetry.shutdown, thread_sensitive=False)()
            await db_thread_close()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _headers_refusal(scope: Scope) -> ApiError | None:
    """A 431 for headers over LLMROTATE_MAX_HEADER_BYTES in all: uvicorn's httptools parser
    takes headers of any size (a megabyte and more), and nothing after it should carry them."""
    limit = settings.LLMROTATE_MAX_HEADER_BYTES
    if sum(len(name) + len(value) for name, value in scope.get("headers", ())) <= limit:
        return None
    return ApiError(
        431,
        f"The request's headers are larger than {limit} bytes in all.",
        type="invalid_request_error",
        code="headers_too_large",
    )


def _length_refusal(scope: Scope) -> ApiError | None:
    """A 413 for a Content-Length over LLMROTATE_MAX_REQUEST_BYTES; a 400 for one that is not
    a single non-negative integer, which Django would fail on (a 500) when it reads the body.
    uvicorn's parser refuses most such requests itself; other servers may not."""
    lengths = {value for name, value in scope.get("headers", ()) if name == b"content-length"}
    if not lengths:
        return None
    (length,) = lengths if len(lengths) == 1 else (b"",)
    if not length.isdigit():
        return invalid_body(
            "The Content-Length header must be one non-negative integer.",
            code="invalid_content_length",
        )
    # The digit count first: int() refuses strings of thousands of digits (a ValueError).
    if len(length) > 18 or int(length) > settings.LLMROTATE_MAX_REQUEST_BYTES:
        return body_too_large()
    return None


class _BodyTooLarge(Exception):
    """The body went past LLMROTATE_MAX_REQUEST_BYTES while it was being received."""


def _counting(receive: Any) -> Any:
    """`receive`, counting the body's bytes as they arrive: a chunked upload carries no
    Content-Length to refuse it by, and Django would otherwise read it whole (to a temporary
    file past a few megabytes) before anything looks at its size."""
    limit = settings.LLMROTATE_MAX_REQUEST_BYTES
    received = 0

    async def counted() -> Any:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge
        return message

    return counted


async def _send_error(scope: Scope, send: Any, error: ApiError) -> None:
    """An error answered here, before Django: in the envelope the caller's API uses, and with
    `Connection: close`, since the rest of the request body is left unread."""
    # A locked-out address is refused without a record: its flood must cost next to nothing
    # (each bad token before the lockout was recorded, and the lockout is logged).
    if scope["method"] == "POST" and error.code != "too_many_failed_auth":
        refusal_record(path=scope["path"], status=error.status, code=error.code)
    headers = {name.decode("latin-1"): value for name, value in scope.get("headers", ())}
    body = json.dumps(error.body(anthropic=anthropic_caller(scope["path"], headers))).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"connection", b"close"),
                # A lockout's 429 carries Retry-After, as it does past this point.
                *(
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in error.extra_headers().items()
                ),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _proxied(path: str) -> bool:
    """The proxy's calls take the fast path. `/v1/usage/` and `/v1/replacement/` are the
    monitoring API under LLM Interactive Proxy's paths: they need the full stack (sessions for
    staff, CORS)."""
    return path.startswith("/v1/") and not path.startswith(_MONITORING_UNDER_V1)


_MONITORING_UNDER_V1 = ("/v1/usage/", "/v1/replacement/")


async def application(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        await _handler(scope, receive, send)
        return
    refusal = _headers_refusal(scope) or _length_refusal(scope)
    if refusal is not None:
        await _send_error(scope, send, refusal)
        return
    try:
        if _proxied(scope["path"]):
            await _proxy_handler(scope, _counting(receive), send)
        else:
            await _handler(scope, _counting(receive), send)
    except _BodyTooLarge:
        # Raised while Django reads the body, which it does before anything is answered.
        await _send_error(scope, send, body_too_large())
