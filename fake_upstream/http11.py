"""Just enough HTTP/1.1 for the fake upstream: request parsing and response framing.

Hand-written rather than borrowed from an ASGI server because the fake must be able to
misbehave on the wire (drop before headers, cut a chunked body) and stay cheap per request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_BODY = 32 * 1024 * 1024
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# One shared encoder: json.dumps(..., separators=...) builds a fresh encoder on every call.
encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

Headers = Iterable[tuple[str, str]]


class HTTPError(Exception):
    """A request we cannot parse; answered with ``status`` and then the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    keep_alive: bool

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


def response_head(
    status: int, content_type: str, length: int | None, keep: bool, extra: Headers = ()
) -> bytes:
    """Status line + headers; ``length=None`` means a chunked body follows."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"content-type: {content_type}"]
    lines.append("transfer-encoding: chunked" if length is None else f"content-length: {length}")
    lines.append("connection: keep-alive" if keep else "connection: close")
    lines.extend(f"{name}: {value}" for name, value in extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_response(status: int, payload: Any, keep: bool, extra: Headers = ()) -> bytes:
    body = encode_json(payload).encode()
    return response_head(status, "application/json", len(body), keep, extra) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


async def read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """Parse one request: None on a clean EOF between requests, HTTPError if malformed.

    A body cut short by the peer raises asyncio.IncompleteReadError (nobody to answer).
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise HTTPError(400, "Incomplete request head.") from None
        return None
    except asyncio.LimitOverrunError:
        raise HTTPError(431, "Request head too large.") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise HTTPError(400, "Malformed request line.")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        # Whitespace before the colon is forbidden (RFC 9112 5.1): a smuggling vector.
        if not sep or not name or name != name.strip():
            raise HTTPError(400, "Malformed header line.")
        headers[name.lower()] = value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        # curl sends this for bodies over 1 KiB and otherwise stalls a second before sending.
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "transfer-encoding" in headers:
        if headers["transfer-encoding"].lower() != "chunked":
            raise HTTPError(400, "Unsupported transfer-encoding.")
        body = await _read_chunked_body(reader)
    else:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise HTTPError(400, "Invalid content-length.") from None
        if length < 0:
            raise HTTPError(400, "Invalid content-length.")
        if length > MAX_BODY:
            raise HTTPError(413, "Request body too large.")
        body = await reader.readexactly(length) if length else b""
    connection = headers.get("connection", "").lower()
    keep = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    return Request(method, target, headers, body, keep)


async def _read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HTTPError(400, "Invalid chunk size.") from None
        if size < 0:
            raise HTTPError(400, "Invalid chunk size.")
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # discard trailers
                pass
            return b"".join(parts)
        total += size
        if total > MAX_BODY:
            raise HTTPError(413, "Request body too large.")
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HTTPError(400, "Malformed chunk.")
