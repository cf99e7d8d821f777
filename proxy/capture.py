"""Wire capture on the request path: what each leg of a chosen request carried, handed to the
capture writer (usage.capture.writer) as the leg ends.

A request is captured when a capture rule matches its client and route and the sample draw
says so (`capture_start`); with no rule, the usual case, that is one empty-tuple check. A
captured request costs little more: the legs keep references to bytes the gateway holds anyway
(the client's body, the forwarded payload, each chunk as it arrives) and a time per chunk.
Masking, encoding and disk are the writer thread's, so nothing here does I/O, and nothing
here may raise into the proxy: a capture that goes wrong loses the capture, never the call.

Two legs: the client's (what it sent, and what the gateway answered, recorded as the ASGI
messages go out: `RequestCapture.sender`) and, per attempt, the upstream's (what the gateway
sent, and what the upstream answered, read by the attempt and the stream relay). The request
id ties them together, and to the call records (`captured`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from keys.routing import RoutingSnapshot, TokenInfo
from usage.capture.writer import get_capture_writer

# Which requests a partial sample rate takes; nothing secret depends on it.
_rng = random.Random()  # noqa: S311

Send = Callable[[dict[str, Any]], Awaitable[None]]


def capture_wanted(snapshot: RoutingSnapshot, client: TokenInfo, route: str) -> bool:
    if not snapshot.capture or not settings.LLMROTATE_CAPTURE_ALLOWED:
        return False
    rate = snapshot.capture_rate(client.name, route, now=time.time())
    return rate > 0 and (rate >= 1 or _rng.random() < rate)


class Leg:
    """One leg's item, as the writer will take it: the request as sent, the response as it
    arrives (status and headers, then chunks with their times), until `end`."""

    __slots__ = (
        "_datas",
        "_ended",
        "_kept",
        "_max_bytes",
        "_max_chunks",
        "_t0",
        "_times",
        "item",
        "response",
        "whole",
    )

    def __init__(self, item: dict[str, Any], t0: float) -> None:
        self.item = item
        self._t0 = t0
        # Two flat lists rather than a [time, bytes] pair per chunk: no object for the garbage
        # collector to track per chunk (the writer pairs them).
        self._times: list[float] = []
        self._datas: list[bytes] = []
        self.response: dict[str, Any] = {
            "status": None,
            "headers": [],
            "chunk_times": self._times,
            "chunk_data": self._datas,
            "size": 0,
        }
        item["response"] = self.response
        self._kept = 0
        self._ended = False
        # Read once per leg, not once per chunk.
        self._max_bytes = settings.LLMROTATE_CAPTURE_MAX_BODY_BYTES
        self._max_chunks = settings.LLMROTATE_CAPTURE_MAX_CHUNKS
        # Set by the stream relay once it sent its last event: a client that hangs up after
        # that (as SDKs do at `[DONE]`) got the whole answer.
        self.whole = False

    def ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1000

    def started(self, status: int, headers: Any) -> None:
        """Headers as the server or httpx holds them (pairs of bytes): decoded and masked by
        the writer, off the request path."""
        response = self.response
        response["status"] = status
        response["headers"] = headers
        response["t"] = self.ms()

    def chunk(self, data: bytes) -> None:
        response = self.response
        response["size"] += len(data)
        room = self._max_bytes - self._kept
        # Bounded in pieces too: an upstream sending a byte at a time would otherwise cost an
        # entry per byte.
        if room <= 0 or len(self._datas) >= self._max_chunks:
            response["truncated"] = True
            return
        if len(data) > room:
            data = data[:room]
            response["truncated"] = True
        self._kept += len(data)
        self._times.append((time.perf_counter() - self._t0) * 1000)
        self._datas.append(data)

    def end(self, end: str, error: str | None = None) -> None:
        """The leg is over: to the writer, once (whichever end point comes first says how)."""
        if self._ended:
            return
        self._ended = True
        response = self.response
        response["end"] = "complete" if end == "client_disconnected" and self.whole else end
        response["error"] = error or None
        response["t_end"] = self.ms()
        request_body = self.item.get("request", {}).get("body") or b""
        get_capture_writer().submit(self.item, self._kept + len(request_body))


class RequestCapture:
    """One captured request: its client leg, and a `Leg` per upstream attempt."""

    __slots__ = ("_base", "_secrets", "_t0", "client")

    def __init__(
        self,
        request: HttpRequest,
        *,
        request_id: str,
        t0: float,
        started: float,
        route: str,
        model: str,
        client: str,
        operation: str,
        api: str,
        stream: bool,
    ) -> None:
        self._t0 = t0
        self._base = {
            "type": "exchange",
            "request_id": request_id,
            "time": started,
            "route": route,
            "model": model,
            "client": client,
            "operation": operation,
            "api": api,
            "stream": stream,
        }
        raw_headers = getattr(request, "scope", {}).get("headers") or [
            (k.lower().encode("latin-1"), str(v).encode("latin-1"))
            for k, v in request.headers.items()
        ]
        # The client's own token, to scrub from bodies (the writer masks it in headers).
        self._secrets = tuple(_credentials(raw_headers))
        body = request.body
        self.client = Leg(
            {
                **self._base,
                "leg": "client",
                "attempt": 0,
                "provider": None,
                "key": None,
                "secrets": self._secrets,
                "request": {
                    "method": request.method,
                    "url": request.get_full_path(),
                    "headers": raw_headers,
                    "body": body[: settings.LLMROTATE_CAPTURE_MAX_BODY_BYTES],
                    "body_size": len(body),
                    "t": 0.0,
                },
            },
            t0,
        )

    def attempt(
        self,
        number: int,
        *,
        provider: str,
        key_id: str,
        secret: str,
        url: str,
        headers: Iterable[tuple[bytes, bytes]],
        payload: bytes,
    ) -> Leg:
        return Leg(
            {
                **self._base,
                "leg": "upstream",
                "attempt": number,
                "provider": provider,
                "key": key_id,
                "secrets": (*self._secrets, secret) if secret else self._secrets,
                "request": {
                    "method": "POST",
                    "url": url,
                    "headers": headers,
                    "body": payload[: settings.LLMROTATE_CAPTURE_MAX_BODY_BYTES],
                    "body_size": len(payload),
                    "t": (time.perf_counter() - self._t0) * 1000,
                },
            },
            self._t0,
        )

    def sender(self, send: Send) -> Send:
        """`send`, recording the client leg's response as it goes out."""
        leg = self.client

        async def sending(message: dict[str, Any]) -> None:
            kind = message.get("type")
            last = kind == "http.response.body" and not message.get("more_body", False)
            if kind == "http.response.start":
                leg.started(message["status"], message.get("headers") or ())
            elif kind == "http.response.body" and message.get("body"):
                leg.chunk(message["body"])
            elif last:
                # A stream's empty closing message: every byte of the answer is out. A client
                # that reads to the end and hangs up at once may cancel this very send.
                leg.end("complete")
            await send(message)
            if last:
                leg.end("complete")

        return sending


def upstream_end(outcome: str, error_type: str, *, answered: bool) -> str:
    """How an upstream leg ended, from its attempt's verdict: an error outcome with the whole
    answer read (a 429, a 500) is a complete exchange; the outcome says the rest."""
    if error_type in ("response_too_large", "event_too_large"):
        return "too_large"
    if outcome == "gateway_error":  # a bug of ours ended it (the API answered 500)
        return "error"
    if outcome == "client_disconnected":
        return "client_disconnected"
    if not answered:
        return "no_response"
    if outcome == "timeout":
        return "timeout"
    if error_type == "truncated":
        return "cut"
    if outcome in ("connection_error", "stream_error"):
        return "upstream_reset"
    return "complete"


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _credentials(headers: Iterable[tuple[bytes, bytes]]) -> Iterable[str]:
    for name, value in headers:
        lower = name.lower()
        if lower == b"authorization":
            yield _text(value).partition(" ")[2].strip()
        elif lower == b"x-api-key":
            yield _text(value).strip()
