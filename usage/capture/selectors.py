"""Reads of wire captures for people: one request's captured legs as the dashboard shows them,
and whether capturing is on or capture files exist (the dashboard's warning).

A capture can be large (a leg keeps up to LLMROTATE_CAPTURE_MAX_BODY_BYTES of each body, a
stream thousands of chunks), and a page must stay small whatever was captured: what is shown is
cut at SHOWN_BYTES of each body and SHOWN_CHUNKS chunks of a stream, and what was cut is
counted, so that the reader knows there is more (`capture_inspect` and `capture_export` read
it whole). Bytes become text as UTF-8 with replacement characters; the text is captured
traffic, so templates escape it like any other string (never mark it safe).

Finding a request reads the capture files of its hour (file I/O, tens of megabytes at worst):
`request_capture` is for a view that was asked for the capture, not for the request page
itself. `capture_status` is for every page: a directory listing and one small query, kept a
few seconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from keys.models import CaptureRule
from usage.capture.format import Exchange, capture_files, find_request

SHOWN_BYTES = 256 * 1024
SHOWN_CHUNKS = 2000
STATUS_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Shown:
    """Bytes as text, cut at the page's budget."""

    text: str
    size: int  # every byte there was
    hidden_bytes: int  # of those, not in `text`
    json: bool = False  # `text` is the body pretty-printed


@dataclass(frozen=True, slots=True)
class ShownChunk:
    number: int  # 1-based, as received
    at_ms: float  # since the request reached the gateway
    gap_ms: float | None  # since the previous chunk; the first: since the request's `t`
    shown: Shown


@dataclass(slots=True)
class LegView:
    leg: str  # "client" or "upstream"
    attempt: int
    anchor: str  # the HTML id of its section: capture-client, capture-attempt-2
    time: datetime
    provider: str | None
    key: str | None
    route: str | None
    model: str | None
    method: str
    url: str
    request_headers: list[tuple[str, str]]
    request_body: Shown
    status: int | None
    response_headers: list[tuple[str, str]]
    stream: bool
    end: str
    error: str | None
    truncated: bool  # the capture itself kept only the first part of the response
    response_size: int
    duration_ms: float | None
    first_byte_ms: float | None
    body: Shown | None = None  # a JSON (or any one-piece) answer
    chunks: list[ShownChunk] = field(default_factory=list)  # a stream
    chunk_count: int = 0
    hidden_chunks: int = 0
    hidden_chunk_bytes: int = 0


@dataclass(slots=True)
class RequestCapture:
    request_id: str
    legs: list[LegView]
    # Attempts whose records say captured but whose leg no file holds any more.
    missing_attempts: list[int]
    # Why the files could not be searched (the folder unreadable by this process), if so.
    problem: str | None = None

    @property
    def pruned(self) -> bool:
        """Records say captured, yet no file holds any leg: retention or the size cap took it."""
        return not self.legs and self.problem is None


def shown(data: bytes, *, budget: int = SHOWN_BYTES, pretty: bool = False) -> Shown:
    """`data` as text, at most `budget` bytes of it; with `pretty`, a JSON body indented."""
    if pretty and len(data) <= budget:
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            pass
        else:
            text = json.dumps(parsed, indent=2, ensure_ascii=False)
            return Shown(text=text, size=len(data), hidden_bytes=0, json=True)
    kept = data[: max(budget, 0)]
    return Shown(
        text=kept.decode("utf-8", errors="replace"),
        size=len(data),
        hidden_bytes=len(data) - len(kept),
    )


def _chunks_shown(exchange: Exchange, view: LegView) -> None:
    chunks = exchange.response.chunks
    view.chunk_count = len(chunks)
    budget = SHOWN_BYTES
    previous: float | None = float(exchange.request.raw.get("t") or 0.0)
    for number, (at_ms, data) in enumerate(chunks, start=1):
        if number > SHOWN_CHUNKS or budget <= 0:
            rest = chunks[number - 1 :]
            view.hidden_chunks = len(rest)
            view.hidden_chunk_bytes = sum(len(d) for _, d in rest)
            return
        piece = shown(data, budget=budget)
        budget -= len(data)
        gap = None if previous is None else at_ms - previous
        view.chunks.append(ShownChunk(number=number, at_ms=at_ms, gap_ms=gap, shown=piece))
        previous = at_ms


def leg_view(exchange: Exchange) -> LegView:
    request, response = exchange.request, exchange.response
    body_size = request.raw.get("body_size")
    request_body = shown(request.body, pretty=True)
    if isinstance(body_size, int) and body_size > request_body.size:
        # The capture kept only the first part of a large request body.
        request_body = Shown(
            text=request_body.text,
            size=body_size,
            hidden_bytes=body_size - request_body.size + request_body.hidden_bytes,
        )
    chunks = response.chunks
    view = LegView(
        leg=exchange.leg,
        attempt=exchange.attempt,
        anchor="capture-client"
        if exchange.leg == "client"
        else f"capture-attempt-{exchange.attempt}",
        time=exchange.time,
        provider=exchange.get("provider"),
        key=exchange.get("key"),
        route=exchange.get("route"),
        model=exchange.get("model"),
        method=str(request.raw.get("method") or ""),
        url=str(request.raw.get("url") or ""),
        request_headers=request.headers,
        request_body=request_body,
        status=response.status,
        response_headers=response.headers,
        # A JSON answer may have come in several reads: it is still shown as one body.
        stream="event-stream" in (response.header("content-type") or "")
        or (exchange.stream and response.status == 200),
        end=exchange.end,
        error=response.raw.get("error"),
        truncated=bool(response.raw.get("truncated")),
        response_size=exchange.size,
        duration_ms=exchange.duration_ms,
        first_byte_ms=chunks[0][0] if chunks else None,
    )
    if view.stream:
        _chunks_shown(exchange, view)
    else:
        view.body = shown(response.body, pretty=True)
        view.chunk_count = len(chunks)
    return view


def request_capture(
    request_id: str, *, records: Iterable[Mapping[str, Any]], directory: Path | None = None
) -> RequestCapture | None:
    """The captured legs of a request, from its call records (`attempt`, `captured`,
    `started_at`, as usage.record_selectors.request_attempts gives them). None when no record
    says captured: then no file is read."""
    records = list(records)
    captured = [r for r in records if r.get("captured")]
    if not captured:
        return None
    when = min(r["started_at"] for r in records)
    directory = Path(directory or settings.LLMROTATE_CAPTURE_DIR)
    try:
        exchanges = find_request(request_id, directory=directory, when=when)
    except OSError as exc:
        problem = f"the capture folder {directory} cannot be read ({exc.strerror or exc})"
        return RequestCapture(request_id=request_id, legs=[], missing_attempts=[], problem=problem)
    legs = [leg_view(e) for e in exchanges]
    found = {leg.attempt for leg in legs if leg.leg == "upstream"}
    missing = sorted({int(r["attempt"]) for r in captured if r["attempt"]} - found)
    return RequestCapture(request_id=request_id, legs=legs, missing_attempts=missing)


@dataclass(frozen=True, slots=True)
class CaptureStatus:
    directory: Path
    files: int
    total_bytes: int
    rules: int  # enabled, unexpired capture rules with a share above 0
    allowed: bool  # LLMROTATE_CAPTURE_ALLOWED: with it off, no rule applies

    @property
    def capturing(self) -> bool:
        return self.allowed and self.rules > 0

    @property
    def shown(self) -> bool:
        """Whether a page must warn: capturing is on, or capture files exist."""
        return self.capturing or self.files > 0


_status_lock = threading.Lock()
_status_cache: dict[str, tuple[float, CaptureStatus]] = {}


def _files_and_size(directory: Path) -> tuple[int, int]:
    files, total = 0, 0
    try:
        paths = capture_files(directory)
    except OSError:
        return 0, 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:  # pruned between the listing and now
            continue
        files += 1
    return files, total


def capture_status(directory: Path | None = None) -> CaptureStatus:
    """Whether capturing is on and which capture files exist, as of at most STATUS_SECONDS ago
    (every dashboard page and poll asks; this keeps it to a listing and a query per interval)."""
    directory = Path(directory or settings.LLMROTATE_CAPTURE_DIR)
    key = str(directory)
    now = time.monotonic()
    cached = _status_cache.get(key)
    if cached and now - cached[0] < STATUS_SECONDS:
        return cached[1]
    files, total = _files_and_size(directory)
    rules = (
        CaptureRule.objects.filter(enabled=True, sample_rate__gt=0)
        .filter(Q(until__isnull=True) | Q(until__gt=timezone.now()))
        .count()
    )
    status = CaptureStatus(
        directory=directory,
        files=files,
        total_bytes=total,
        rules=rules,
        allowed=bool(settings.LLMROTATE_CAPTURE_ALLOWED),
    )
    with _status_lock:
        _status_cache[key] = (now, status)
    return status


def capture_status_forget() -> None:
    """Drop the kept status (a rule was just changed; tests)."""
    with _status_lock:
        _status_cache.clear()
