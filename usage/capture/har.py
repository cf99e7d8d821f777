"""A captured request as a HAR 1.2 file, for browser devtools and other HTTP tools.

One HAR entry per leg of the request: the client leg (client → gateway) first, then the
upstream leg of each attempt, so that a failover reads top to bottom as it happened. Pure:
exchanges in, a JSON-ready dict out; the command writes it.

What HAR cannot say exactly is kept in fields prefixed `_` (HAR 1.2 allows custom fields that
start with an underscore; importers ignore them): the request id, the leg and attempt, the key,
how the response ended, and for streams each chunk's arrival time and size (`_chunks`), since
HAR's timings only know "waiting" and "receiving".

Bodies: HAR's `content` has an `encoding` field, so a response body that is not UTF-8 is kept
exactly, in base64. `postData` has none in HAR 1.2: a request body that is not UTF-8 is shown
decoded with replacement characters and its exact bytes go into `_base64`, with a `comment`.
Headers and URLs are what the capture holds: already masked by the writer.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from usage.capture.format import Exchange

CREATOR = "llmrotate"
# The client leg's URL is a path (what the gateway received); HAR wants an absolute URL.
DEFAULT_CLIENT_ORIGIN = "http://llmrotate"


def _version() -> str:
    try:
        return metadata.version("llmrotate")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0"


def har_log(exchanges: list[Exchange]) -> dict[str, Any]:
    """`{"log": {...}}` for the legs of one request (find_request's order: client first)."""
    ordered = sorted(exchanges, key=lambda e: (e.leg != "client", e.attempt))
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": CREATOR, "version": _version()},
            "pages": [],
            "entries": [har_entry(e) for e in ordered],
        }
    }


def har_entry(exchange: Exchange) -> dict[str, Any]:
    request, response = exchange.request, exchange.response
    t_request = float(request.raw.get("t") or 0.0)
    status = response.status
    t_response = response.raw.get("t")
    t_end = response.raw.get("t_end")
    # The capture knows when the request was sent (or arrived), when the response's headers
    # came and when its last byte did: HAR's wait and receive. Sending is not timed apart.
    wait = max(float(t_response) - t_request, 0.0) if t_response is not None else 0.0
    if t_end is not None:
        start = float(t_response) if t_response is not None else t_request
        receive = max(float(t_end) - start, 0.0)
    else:
        receive = 0.0
    timings = {
        "blocked": -1,
        "dns": -1,
        "connect": -1,
        "ssl": -1,
        "send": 0,
        "wait": round(wait, 3),
        "receive": round(receive, 3),
    }
    started = exchange.time + timedelta(milliseconds=t_request)
    entry: dict[str, Any] = {
        "startedDateTime": _iso(started),
        # The sum of the timings that apply, as HAR requires.
        "time": round(wait + receive, 3),
        "request": _request(exchange),
        "response": _response(exchange, status),
        "cache": {},
        "timings": timings,
        # Devtools files these under Fetch/XHR, where API calls are looked for.
        "_resourceType": "fetch",
        "_requestId": exchange.request_id,
        "_leg": exchange.leg,
        "_attempt": exchange.attempt,
        "_end": exchange.end,
    }
    for name in ("key", "provider", "route"):
        if exchange.get(name) is not None:
            entry[f"_{name}"] = str(exchange.get(name))
    if response.raw.get("error"):
        entry["_error"] = entry["response"]["_error"] = str(response.raw["error"])
    if exchange.stream or len(response.chunks) > 1:
        entry["_chunks"] = [{"t": round(t, 3), "size": len(data)} for t, data in response.chunks]
    return entry


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{moment.microsecond // 1000:03d}Z"
    )


def _headers(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in pairs]


def _url(exchange: Exchange) -> str:
    url = str(exchange.request.raw.get("url") or "/")
    if url.startswith(("http://", "https://")):
        return url
    host = exchange.request.header("host")
    origin = f"http://{host}" if host else DEFAULT_CLIENT_ORIGIN
    return origin + (url if url.startswith("/") else "/" + url)


def _request(exchange: Exchange) -> dict[str, Any]:
    request = exchange.request
    url = _url(exchange)
    body = request.body
    har: dict[str, Any] = {
        "method": str(request.raw.get("method") or "GET"),
        "url": url,
        "httpVersion": "HTTP/1.1",
        "cookies": [],
        "headers": _headers(request.headers),
        "queryString": [
            {"name": n, "value": v}
            for n, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)
        ],
        "headersSize": -1,
        "bodySize": int(request.raw.get("body_size") or len(body)),
    }
    if body or har["method"] not in ("GET", "HEAD"):
        post: dict[str, Any] = {
            "mimeType": request.header("content-type") or "application/octet-stream",
            "text": body.decode("utf-8", "replace"),
        }
        if not _is_utf8(body):
            post["comment"] = "not UTF-8: text has replacement characters; _base64 is exact"
            post["_base64"] = base64.b64encode(body).decode("ascii")
        har["postData"] = post
    return har


def _response(exchange: Exchange, status: int | None) -> dict[str, Any]:
    response = exchange.response
    body = response.body
    content: dict[str, Any] = {
        "size": exchange.size,
        "mimeType": response.header("content-type") or "application/octet-stream",
    }
    if _is_utf8(body):
        content["text"] = body.decode("utf-8")
    else:
        content["text"] = base64.b64encode(body).decode("ascii")
        content["encoding"] = "base64"
    if response.raw.get("truncated"):
        content["comment"] = f"truncated by the capture: {len(body)} of {exchange.size} bytes kept"
    har: dict[str, Any] = {
        "status": status or 0,
        "statusText": _status_text(status),
        "httpVersion": "HTTP/1.1" if status else "",
        "cookies": [],
        "headers": _headers(response.headers),
        "content": content,
        "redirectURL": response.header("location") or "",
        "headersSize": -1,
        "bodySize": exchange.size if status else -1,
    }
    if not status:
        har["comment"] = f"no response ({exchange.end})"
    return har


def _status_text(status: int | None) -> str:
    if not status:
        return ""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def har_dumps(har: dict[str, Any]) -> str:
    """HAR files are UTF-8 JSON; non-ASCII text is kept as it is, readable."""
    return json.dumps(har, ensure_ascii=False, indent=2) + "\n"
