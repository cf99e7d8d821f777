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
                  "error": "ReadTimeout" | None, "t_end": 400.2}}

Times (`t`, chunk times, `t_end`) are milliseconds since the request reached the gateway.
Chunks are the reads as they arrived (a JSON answer's too), bodies as they were after
transfer decoding: an upstream's gzip is undone (its headers still say `content-encoding`).
`size` counts every byte of the response, also those past the capture's per-leg cap
(`truncated`).

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


def _name_parts(path: Path) -> tuple[str, str, int, int] | None:
    """(hour, host, pid, number) of a capture file's name; the host may hold dashes."""
    if file_hour(path) is None:
        return None
    middle = path.name[len(PREFIX) + 12 : -len(SUFFIX)]
    host, _, rest = middle.rpartition("-")
    host, _, pid = host.rpartition("-")
    if not (host and pid.isdigit() and rest.isdigit()):
        return None
    return path.name[len(PREFIX) : len(PREFIX) + 11], host, int(pid), int(rest)


def file_owner(path: Path) -> tuple[str, int] | None:
    """(host, pid) of the process that wrote a capture file."""
    parts = _name_parts(path)
    return (parts[1], parts[2]) if parts else None


def index_path(path: Path) -> Path:
    """The file's index: a line per exchange, `request_id<TAB>offset<TAB>length`, so that one
    request is found without decoding the whole file. A convenience: the capture file alone
    is complete, and a reader without the index scans it."""
    return path.with_name(path.name + ".idx")


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
    # How many exchanges `iter_file` has read so far (they are not kept there).
    exchanges_read: int = 0
    # Why reading stopped before the end: a torn last item (a crash while writing), or bytes
    # that are not CBOR. Everything before it was read.
    problem: str | None = None


def read_file(path: Path | str) -> CaptureFile:
    """Every exchange of a capture file. Raises NotACapture for another kind of file."""
    capture = CaptureFile(path=Path(path), header={})
    for exchange in iter_file(capture):
        capture.exchanges.append(exchange)
    return capture


def iter_file(capture: CaptureFile) -> Iterator[Exchange]:
    """The exchanges of `capture.path` one at a time (its header and problem are set on
    `capture` as they are read), so that a reader looking for a few keeps only those."""
    path = capture.path
    with path.open("rb") as fp:
        try:
            first = cbor2.load(fp)
        except (cbor2.CBORError, RecursionError) as exc:
            raise NotACapture(f"{path}: not a capture file ({exc})") from None
        header = first.value if isinstance(first, cbor2.CBORTag) else first
        if not isinstance(header, Mapping) or header.get("format") != FORMAT:
            raise NotACapture(f"{path}: not a capture file (no {FORMAT} header)")
        if header.get("version") != VERSION:
            raise NotACapture(
                f"{path}: capture format version {header.get('version')!r}; this gateway reads"
                f" version {VERSION}"
            )
        capture.header = dict(header)
        size = os.fstat(fp.fileno()).st_size
        skipped = 0
        while (offset := fp.tell()) < size:
            try:
                item = cbor2.load(fp)
            except cbor2.CBORDecodeEOF:
                capture.problem = f"the last {size - offset} bytes are a torn item (cut off)"
                break
            except (cbor2.CBORError, RecursionError) as exc:
                capture.problem = f"unreadable from byte {offset}: {exc}"
                break
            exchange = _exchange(item, path, offset)
            if exchange is None:
                skipped += 1
                capture.problem = f"{skipped} item(s) not shaped as exchanges were skipped"
                continue
            yield exchange


def _exchange(item: Any, path: Path, offset: int) -> Exchange | None:
    """The item as an exchange, if it is shaped as one (a file is input like any other: a
    wrong type must not crash a reader, nor a number stand for a body's length)."""
    if not isinstance(item, Mapping) or item.get("type") != "exchange":
        return None
    for side in ("request", "response"):
        message = item.get(side)
        if message is None:
            continue
        if not isinstance(message, Mapping):
            return None
        if not isinstance(message.get("body", b""), bytes):
            return None
        headers = message.get("headers") or []
        if not isinstance(headers, list | tuple) or not all(
            isinstance(h, list | tuple) and len(h) == 2 and all(isinstance(x, str) for x in h)
            for h in headers
        ):
            return None
        chunks = message.get("chunks") or []
        if not isinstance(chunks, list | tuple) or not all(
            isinstance(c, list | tuple)
            and len(c) == 2
            and isinstance(c[0], int | float)
            and isinstance(c[1], bytes)
            for c in chunks
        ):
            return None
    return Exchange(dict(item), path=path, offset=offset)


def read_exchanges(paths: Iterable[Path | str]) -> Iterator[Exchange]:
    for path in paths:
        yield from iter_file(CaptureFile(path=Path(path), header={}))


def capture_files(directory: Path) -> list[Path]:
    """The capture files in `directory`, oldest first (hour, then host, pid and number)."""
    if not directory.is_dir():
        return []
    named = [(parts, p) for p in directory.iterdir() if (parts := _name_parts(p)) is not None]
    return [p for _, p in sorted(named)]


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
            found.extend(_indexed(path, request_id))
        except (NotACapture, OSError):
            continue
    return sorted(found, key=lambda e: (e.leg != "client", e.attempt))


def _indexed(path: Path, request_id: str) -> list[Exchange]:
    """The request's exchanges in one file: through its index (a seek per exchange), or by
    reading the file through when it has none."""
    try:
        index = index_path(path).read_text("ascii", "replace")
    except FileNotFoundError:
        return [
            e for e in iter_file(CaptureFile(path=path, header={})) if e.request_id == request_id
        ]
    found = []
    with path.open("rb") as fp:
        for line in index.splitlines():
            rid, _, rest = line.partition("\t")
            offset, _, length = rest.partition("\t")
            if rid != request_id or not (offset.isdigit() and length.isdigit()):
                continue
            fp.seek(int(offset))
            try:
                item = cbor2.loads(fp.read(int(length)))
            except (cbor2.CBORError, RecursionError):
                continue
            exchange = _exchange(item, path, int(offset))
            if exchange is not None:
                found.append(exchange)
    return found
