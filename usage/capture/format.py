"""The capture file format, and reading it back.

A capture file is a CBOR sequence (RFC 8742): CBOR items written one after the other, nothing
between them. CBOR because it is compact (bodies are byte strings, not base64), self-describing
(every item is a map with named fields, readable by any CBOR decoder: `python -m cbor2.tool`),
and append-only by nature: an item is complete or it is the torn tail of a crash, which a
reader detects and stops at. LLM Interactive Proxy uses it too.

The first item is the file's header, wrapped in the self-describe tag (55799, so the file
starts with the bytes d9 d9 f7):

    {"format": "llmrotate-capture", "version": 1, "created": "2026-12-07T11:00:00Z",
     "host": "gw-1", "pid": 4242, "fields": {...what each exchange field means...}}

Every further item is one exchange: one leg of one request.

    {"type": "exchange",
     "request_id": "9f…",           # the CallRecord's request id (and its failover path)
     "leg": "client" | "upstream",  # client → gateway, or gateway → upstream
     "attempt": 0 | 1 | 2 …,        # 0 for the client leg; the CallRecord's attempt number
     "time": 1765105200.123,        # wall clock at the request's start (Unix seconds)
     "route": "gpt-4o", "model": "gpt-4o",        # the route, the model the client asked for
     "client": "team-a",            # the client token's name, never the token
     "provider": "openai" | None, "key": "openai-1" | None,   # upstream leg only
     "operation": "chat", "api": "openai", "stream": true,
     "request": {"method": "POST", "url": "/v1/chat/completions" | "https://…/v1/…",
                 "headers": [["content-type", "application/json"], …],   # masked
                 "body": b"…", "body_size": 1234, "t": 0.41},
     "response": {"status": 200 | None, "headers": [[…], …], "t": 212.5,
                  "chunks": [[212.5, b"data: …\n\n"], [230.1, b"…"], …],
                  "size": 5120, "truncated": false,
                  "end": "complete" | "client_disconnected" | "upstream_reset" | "cut" |
                         "timeout" | "too_large" | "error" | "no_response",
                  "error": "ReadTimeout" | None, "t_end": 400.2},
     "outcome": "success"}

Times (`t`, chunk times, `t_end`) are milliseconds since the request reached the gateway. A
JSON answer is one chunk; a stream has one chunk per read, as it arrived. `size` counts every
byte of the response, also those past the capture's per-leg cap (`truncated`).

Secrets never reach a file (usage.capture.writer masks before writing): credential headers and
query values are masked, and the key's secret or the client's token inside a body is replaced
by as many `*`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2

FORMAT = "llmrotate-capture"
VERSION = 1
SELF_DESCRIBE_TAG = 55799
SUFFIX = ".cbor"
PREFIX = "capture-"

# Written into each file's header, so that a file explains itself to whoever finds it.
FIELDS = {
    "request_id": "the request's id, as in its call records and x-llmrotate-request-id",
    "leg": "client: client to gateway; upstream: gateway to upstream (one per attempt)",
    "attempt": "0 for the client leg, else the attempt's number in the request's failover",
    "time": "wall clock at the request's start, Unix seconds",
    "request": "method, url, headers (credentials masked), body (bytes), t (ms since start)",
    "response": "status, headers, t (ms), chunks [[ms, bytes], ...] as received, size, "
    "truncated (past the capture cap), end (how the response ended), error, t_end (ms)",
    "end": "complete, client_disconnected, upstream_reset, cut, timeout, too_large, error, "
    "no_response",
}


def header_item(*, host: str, pid: int, created: datetime) -> cbor2.CBORTag:
    return cbor2.CBORTag(
        SELF_DESCRIBE_TAG,
        {
            "format": FORMAT,
            "version": VERSION,
            "created": created.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "host": host,
            "pid": pid,
            "fields": FIELDS,
        },
    )


def file_name(start: datetime, *, host: str, pid: int, sequence: int) -> str:
    """`capture-20261207T11-host-4242-0.cbor`: the UTC hour the file was opened in first, so
    that a reader looking for a request can go straight to its hour's files."""
    hour = start.astimezone(UTC).strftime("%Y%m%dT%H")
    return f"{PREFIX}{hour}-{host}-{pid}-{sequence}{SUFFIX}"


def file_hour(path: Path) -> datetime | None:
    """The UTC hour in a capture file's name, or None for a name not of ours."""
    name = path.name
    if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
        return None
    try:
        return datetime.strptime(name[len(PREFIX) : len(PREFIX) + 11], "%Y%m%dT%H").replace(
            tzinfo=UTC
        )
    except ValueError:
        return None


class NotACapture(Exception):
    """The file is not a capture file (or not one of a version this reader knows)."""


@dataclass(slots=True)
class Message:
    """One side of a leg: the request, or the response."""

    raw: dict[str, Any]

    @property
    def status(self) -> int | None:
        status = self.raw.get("status")
        return status if isinstance(status, int) else None

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(str(n), str(v)) for n, v in self.raw.get("headers") or ()]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def chunks(self) -> list[tuple[float, bytes]]:
        """(ms since the request's start, bytes), as received; a request has its body as one."""
        if "chunks" in self.raw:
            return [(float(t), bytes(b)) for t, b in self.raw["chunks"] or ()]
        body = self.raw.get("body")
        return [(float(self.raw.get("t") or 0.0), bytes(body))] if body else []

    @property
    def body(self) -> bytes:
        if "chunks" in self.raw:
            return b"".join(bytes(b) for _, b in self.raw["chunks"] or ())
        return bytes(self.raw.get("body") or b"")


@dataclass(slots=True)
class Exchange:
    """One leg of one request, as read from a file."""

    raw: dict[str, Any]
    path: Path | None = None
    offset: int = 0

    @property
    def request_id(self) -> str:
        return str(self.raw.get("request_id", ""))

    @property
    def leg(self) -> str:
        return str(self.raw.get("leg", ""))

    @property
    def attempt(self) -> int:
        return int(self.raw.get("attempt") or 0)

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(float(self.raw.get("time") or 0.0), tz=UTC)

    @property
    def request(self) -> Message:
        return Message(self.raw.get("request") or {})

    @property
    def response(self) -> Message:
        return Message(self.raw.get("response") or {})

    @property
    def stream(self) -> bool:
        return bool(self.raw.get("stream"))

    @property
    def end(self) -> str:
        return str(self.response.raw.get("end") or "no_response")

    @property
    def duration_ms(self) -> float | None:
        """From the request leaving (upstream leg) or arriving (client leg) to the response's
        end; None when the response never ended (no_response)."""
        t_end = self.response.raw.get("t_end")
        if t_end is None:
            return None
        return float(t_end) - float(self.request.raw.get("t") or 0.0)

    @property
    def size(self) -> int:
        """Response bytes, also those past the capture cap."""
        size = self.response.raw.get("size")
        return int(size) if isinstance(size, int) else len(self.response.body)

    def get(self, name: str, default: Any = None) -> Any:
        return self.raw.get(name, default)


@dataclass(slots=True)
class CaptureFile:
    path: Path
    header: dict[str, Any]
    exchanges: list[Exchange] = field(default_factory=list)
    # Why reading stopped before the end: a torn last item (a crash while writing), or bytes
    # that are not CBOR. Everything before it was read.
    problem: str | None = None


def read_file(path: Path | str) -> CaptureFile:
    """Every exchange of a capture file. Raises NotACapture for another kind of file."""
    path = Path(path)
    with path.open("rb") as fp:
        try:
            first = cbor2.load(fp)
        except cbor2.CBORError as exc:
            raise NotACapture(f"{path}: not a capture file ({exc})") from None
        header = first.value if isinstance(first, cbor2.CBORTag) else first
        if not isinstance(header, Mapping) or header.get("format") != FORMAT:
            raise NotACapture(f"{path}: not a capture file (no {FORMAT} header)")
        if header.get("version") != VERSION:
            raise NotACapture(
                f"{path}: capture format version {header.get('version')!r}; this gateway reads"
                f" version {VERSION}"
            )
        capture = CaptureFile(path=path, header=dict(header))
        size = os.fstat(fp.fileno()).st_size
        while (offset := fp.tell()) < size:
            try:
                item = cbor2.load(fp)
            except cbor2.CBORDecodeEOF:
                capture.problem = f"the last {size - offset} bytes are a torn item (cut off)"
                break
            except cbor2.CBORError as exc:
                capture.problem = f"unreadable from byte {offset}: {exc}"
                break
            if isinstance(item, Mapping) and item.get("type") == "exchange":
                capture.exchanges.append(Exchange(dict(item), path=path, offset=offset))
        return capture


def read_exchanges(paths: Iterable[Path | str]) -> Iterator[Exchange]:
    for path in paths:
        yield from read_file(path).exchanges


def capture_files(directory: Path) -> list[Path]:
    """The capture files in `directory`, oldest first (by name: hour, then host, pid, number)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if file_hour(p) is not None)


def find_request(request_id: str, *, directory: Path, when: datetime | None) -> list[Exchange]:
    """Every captured leg of one request, the client leg first, then the attempts in order.

    With `when` (the request's start), only the files opened in that hour or the next are read
    (a file is opened at most an hour before what it holds, and a stream may end an hour later);
    without it, every file.
    """
    files = capture_files(directory)
    if when is not None:
        hour = when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        wanted = {hour, hour - timedelta(hours=1), hour + timedelta(hours=1)}
        files = [p for p in files if file_hour(p) in wanted]
    found: list[Exchange] = []
    for path in files:
        try:
            capture = read_file(path)
        except (NotACapture, OSError):
            continue
        found.extend(e for e in capture.exchanges if e.request_id == request_id)
    return sorted(found, key=lambda e: (e.leg != "client", e.attempt))
