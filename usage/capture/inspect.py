"""Inspecting captured exchanges: a listing row each, and the problems a response shows.

Pure functions over `usage.capture.format.Exchange`; `manage.py capture_inspect` prints them.

Each detector reads one leg's response as it crossed the wire (the chunks and their arrival
times), so the client leg shows what the gateway sent and each upstream leg what the provider
sent. Which API a leg spoke is read from its URL path (`/chat/completions`, `/completions`,
`/messages`, `/responses`, `/embeddings`), else from the exchange's `api`/`operation` fields:
the gateway may speak one API to the client and another upstream.

A non-200 answer is a recorded outcome, not an issue: only the detectors that still make sense
run on it (a cut, gaps). Detectors that need the whole answer (its end event, usage, tool-call
arguments) are skipped when the answer is not whole: cut (the `cut` issue says so), left by the
client (the `client_disconnected` note), truncated by the capture's size cap (the `truncated`
note), or ended by an error event (`error_in_200`).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from usage.capture.format import Exchange
from usage.tokens import encoding_for, estimate_tokens

# Issue codes, in the order they are reported.
CODES = (
    "cut",
    "bad_json",
    "malformed_sse",
    "error_in_200",
    "no_stream_end",
    "no_usage",
    "usage_mismatch",
    "tool_args_invalid",
    "chunk_gap",
    "truncated",
    "client_disconnected",
)
# Notes rather than problems: they explain an exchange, they do not fail --fail-on-issues.
INFO_CODES = frozenset({"truncated", "client_disconnected"})

DEFAULT_GAP_MS = 5000.0
DEFAULT_TOLERANCE_TOKENS = 8
DEFAULT_TOLERANCE_PERCENT = 25.0
# Examples kept in an issue's detail (the count is always whole).
EXAMPLES = 5
_EXCERPT = 120

SSE_FIELDS = frozenset({"event", "data", "id", "retry"})
# The events that end a Responses-API stream.
RESPONSES_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Issue:
    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> bool:
        return self.code in INFO_CODES

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "level": "info" if self.info else "issue",
            "message": self.message,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Reported and counted completion tokens may differ by max(tokens, percent of counted)."""

    tokens: int = DEFAULT_TOLERANCE_TOKENS
    percent: float = DEFAULT_TOLERANCE_PERCENT

    def allows(self, reported: int, counted: int) -> bool:
        return abs(reported - counted) <= max(self.tokens, counted * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.tokens},{self.percent:g}%"


def tolerance_parse(text: str) -> Tolerance:
    """`8,25%` (either bound alone too: `8`, `25%`; an absent one is 0). ValueError if not."""
    tokens, percent = 0, 0.0
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or len(parts) > 2:
        raise ValueError(f"usage tolerance {text!r}: expected TOKENS,PERCENT% (e.g. 8,25%)")
    for part in parts:
        try:
            if part.endswith("%"):
                percent = float(part[:-1])
            else:
                tokens = int(part)
        except ValueError:
            raise ValueError(
                f"usage tolerance {text!r}: {part!r} is not a number of tokens or a percentage"
            ) from None
    if tokens < 0 or percent < 0:
        raise ValueError(f"usage tolerance {text!r}: must not be negative")
    return Tolerance(tokens, percent)


# ---- the listing ---------------------------------------------------------------------------


def exchange_row(exchange: Exchange) -> dict[str, Any]:
    """The listing's columns for one exchange. `key` is the key's id, never a secret."""
    duration = exchange.duration_ms
    return {
        "time": exchange.time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": exchange.request_id,
        "leg": exchange.leg,
        "attempt": exchange.attempt,
        "route": exchange.get("route"),
        "key": exchange.get("key"),
        "status": exchange.response.status,
        "duration_ms": None if duration is None else round(duration, 1),
        "size": exchange.size,
        "stream": exchange.stream,
        "end": exchange.end,
        "file": str(exchange.path) if exchange.path else None,
        "offset": exchange.offset,
    }


# ---- reading a response --------------------------------------------------------------------


def api_of(exchange: Exchange) -> str | None:
    """chat, completions, anthropic, responses, embeddings, or None (another endpoint)."""
    path = urlsplit(str(exchange.request.raw.get("url") or "")).path.rstrip("/")
    for suffix, api in (
        ("/chat/completions", "chat"),
        ("/completions", "completions"),
        ("/messages", "anthropic"),
        ("/responses", "responses"),
        ("/embeddings", "embeddings"),
    ):
        if path.endswith(suffix):
            return api
    if path.endswith("/count_tokens") or "/models" in path or "/responses/" in path:
        return None
    operation = exchange.get("operation")
    if exchange.get("api") == "anthropic" and operation in (None, "chat"):
        return "anthropic"
    return {
        "chat": "chat",
        "text_completion": "completions",
        "completions": "completions",
        "responses": "responses",
        "embeddings": "embeddings",
    }.get(str(operation))


@dataclass(slots=True)
class SseEvent:
    event: str | None
    data: str | None  # data lines joined by "\n"; None when the event had none
    t: float  # arrival of the chunk that completed it (ms since the request's start)
    line: int  # the line it started on (1-based)


@dataclass(slots=True)
class SseParse:
    events: list[SseEvent]
    malformed: list[dict[str, Any]]  # lines that are not SSE
    incomplete_tail: bool  # the text does not end with an event's blank line


def parse_sse(chunks: list[tuple[float, bytes]]) -> SseParse:
    """The events of an SSE body, each with the arrival time of the chunk that completed it."""
    whole = b"".join(b for _, b in chunks)
    ends: list[tuple[int, float]] = []  # (end offset of a chunk, its time)
    at = 0
    for t, b in chunks:
        at += len(b)
        ends.append((at, t))

    offsets = [end for end, _ in ends]

    def time_at(offset: int) -> float:
        """The time of the chunk holding byte `offset` (a binary search: streams of many
        thousand chunks are read in linear time)."""
        i = bisect.bisect_right(offsets, offset)
        if i < len(ends):
            return ends[i][1]
        return ends[-1][1] if ends else 0.0

    events: list[SseEvent] = []
    malformed: list[dict[str, Any]] = []
    name: str | None = None
    data: list[str] = []
    started: int | None = None
    position, number = 0, 0
    pending = False  # lines seen since the last blank line
    while position < len(whole):
        match = _LINE_END.search(whole, position)
        if match is None:  # the last line has no end: a torn stream
            line_bytes, end, terminated = whole[position:], len(whole), False
        else:
            line_bytes, end, terminated = whole[position : match.start()], match.end(), True
        number += 1
        line = line_bytes.decode("utf-8", "replace")
        position = end
        if not terminated:
            pending = True
            if line and not line.startswith(":"):
                started = number if started is None else started
            break
        if line == "":
            if data or name is not None:
                events.append(
                    SseEvent(
                        name, "\n".join(data) if data else None, time_at(end - 1), started or number
                    )
                )
            name, data, started, pending = None, [], None, False
            continue
        pending = True
        if line.startswith(":"):
            continue
        fname, colon, value = line.partition(":")
        if not colon or fname not in SSE_FIELDS:
            why = "no field name and colon" if not colon else f"unknown field {fname!r}"
            malformed.append({"line": number, "text": line[:_EXCERPT], "why": why})
            continue
        started = number if started is None else started
        value = value.removeprefix(" ")
        if fname == "data":
            data.append(value)
        elif fname == "event":
            name = value
    return SseParse(events, malformed, incomplete_tail=pending)


def _json(text: str | bytes | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


_NOT_JSON = object()


def _is_event_stream(exchange: Exchange) -> bool:
    ctype = (exchange.response.header("content-type") or "").lower()
    if ctype:
        return ctype.startswith("text/event-stream")
    return exchange.stream and exchange.response.status == 200


@dataclass(slots=True)
class Answer:
    """What an answer carried, assembled from its events or its JSON body."""

    text: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    reported: int | None = None  # completion/output tokens the usage reports, less reasoning
    errors: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    # Tool-call arguments by where they were assembled (choice/index, block, item).
    tool_args: dict[str, list[str]] = field(default_factory=dict)
    tool_names: dict[str, str] = field(default_factory=dict)


def _reported(usage: dict[str, Any], api: str) -> int | None:
    name = "completion_tokens" if api in ("chat", "completions") else "output_tokens"
    value = usage.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    # Reasoning tokens are billed as completion tokens but never sent: not in the text.
    details = usage.get(
        "completion_tokens_details" if api in ("chat", "completions") else "output_tokens_details"
    )
    if isinstance(details, dict):
        reasoning = details.get("reasoning_tokens")
        if isinstance(reasoning, int) and not isinstance(reasoning, bool):
            value -= reasoning
    return value


def _take_usage(answer: Answer, usage: Any, api: str) -> None:
    if isinstance(usage, dict) and usage:
        answer.usage = {**(answer.usage or {}), **usage}
        reported = _reported(answer.usage, api)
        if reported is not None:
            answer.reported = reported


def _error_of(data: Any) -> dict[str, Any] | None:
    """The error object a JSON value is, if it is one (OpenAI's, Anthropic's, Responses')."""
    if not isinstance(data, dict):
        return None
    if data.get("error") is not None and "choices" not in data and "output" not in data:
        error = data["error"]
        return error if isinstance(error, dict) else {"message": str(error)}
    if data.get("type") == "error":
        error = data.get("error")
        if isinstance(error, dict):
            return error
        return {k: v for k, v in data.items() if k in ("code", "message", "param")}
    return None


def _add_args(answer: Answer, where: str, piece: Any, name: Any = None) -> None:
    answer.tool_args.setdefault(where, [])
    if isinstance(piece, str) and piece:
        answer.tool_args[where].append(piece)
    if isinstance(name, str) and name:
        answer.tool_names[where] = name


def _openai_message(answer: Answer, choice: dict[str, Any], key: str, i: int) -> None:
    """A chat choice's `message` (JSON) or `delta` (stream) into the answer."""
    message = choice.get(key)
    if not isinstance(message, dict):
        return
    for part in ("content", "refusal"):
        if isinstance(message.get(part), str):
            answer.text.append(message[part])
    for n, call in enumerate(message.get("tool_calls") or ()):
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        index = call.get("index", n)
        _add_args(
            answer, f"choice {i} tool_call {index}", function.get("arguments"), function.get("name")
        )


def _stream_event(answer: Answer, api: str, event: SseEvent, data: Any) -> None:
    if api in ("chat", "completions"):
        for i, choice in enumerate(data.get("choices") or ()):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", i)
            if api == "chat":
                _openai_message(answer, choice, "delta", index)
            elif isinstance(choice.get("text"), str):
                answer.text.append(choice["text"])
        _take_usage(answer, data.get("usage"), api)
    elif api == "anthropic":
        kind = data.get("type")
        if kind == "message_start":
            _take_usage(answer, (data.get("message") or {}).get("usage"), api)
        elif kind == "message_delta":
            _take_usage(answer, data.get("usage"), api)
        elif kind == "message_stop":
            answer.ended = True
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                _add_args(answer, f"content block {data.get('index')}", None, block.get("name"))
            elif isinstance(block.get("text"), str):
                answer.text.append(block["text"])
        elif kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "input_json_delta":
                _add_args(answer, f"content block {data.get('index')}", delta.get("partial_json"))
            for part in ("text", "thinking"):
                if isinstance(delta.get(part), str):
                    answer.text.append(delta[part])
    elif api == "responses":
        kind = data.get("type") or event.event
        if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
            answer.text.append(data["delta"])
        elif kind == "response.output_item.added":
            item = data.get("item") or {}
            if item.get("type") == "function_call":
                where = f"output item {data.get('output_index')}"
                _add_args(answer, where, None, item.get("name"))
        elif kind == "response.function_call_arguments.delta":
            _add_args(answer, f"output item {data.get('output_index')}", data.get("delta"))
        elif kind in RESPONSES_ENDS:
            answer.ended = True
            _take_usage(answer, (data.get("response") or {}).get("usage"), api)


def _json_answer(answer: Answer, api: str, body: Any) -> None:
    if not isinstance(body, dict):
        return
    _take_usage(answer, body.get("usage"), api)
    if api == "chat":
        for i, choice in enumerate(body.get("choices") or ()):
            if isinstance(choice, dict):
                _openai_message(answer, choice, "message", choice.get("index", i))
    elif api == "completions":
        for choice in body.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("text"), str):
                answer.text.append(choice["text"])
    elif api == "anthropic":
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            for part in ("text", "thinking"):
                if isinstance(block.get(part), str):
                    answer.text.append(block[part])
            if block.get("type") == "tool_use":
                answer.text.append(json.dumps(block.get("input")))
                answer.text.append(str(block.get("name") or ""))
    elif api == "responses":
        for n, item in enumerate(body.get("output") or ()):
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                for part in item.get("content") or ():
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        answer.text.append(part["text"])
            elif item.get("type") == "function_call":
                _add_args(answer, f"output item {n}", item.get("arguments"), item.get("name"))


def _include_usage_asked(exchange: Exchange) -> bool:
    body = _json(exchange.request.body)
    options = body.get("stream_options") if isinstance(body, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


def _model_of(exchange: Exchange) -> str:
    body = _json(exchange.request.body)
    model = body.get("model") if isinstance(body, dict) else None
    return str(model or exchange.get("model") or "")


# ---- detection -----------------------------------------------------------------------------


def detect_issues(
    exchange: Exchange,
    *,
    gap_ms: float = DEFAULT_GAP_MS,
    tolerance: Tolerance | None = None,
) -> list[Issue]:
    """The problems one leg's response shows, in CODES order (see the module docstring)."""
    tolerance = tolerance or Tolerance()
    issues: list[Issue] = []
    response = exchange.response
    status, end = response.status, exchange.end
    whole = end in ("complete", "client_disconnected")
    truncated = bool(response.raw.get("truncated"))

    if not whole:
        error = response.raw.get("error")
        why = {
            "upstream_reset": "the upstream closed the connection mid-answer",
            "cut": "the answer was cut midway",
            "timeout": "the answer timed out",
            "too_large": "the answer exceeded the size limit",
            "error": "reading the answer failed",
            "no_response": "no response was received",
        }.get(end, f"the answer ended as {end}")
        issues.append(
            Issue(
                "cut",
                f"{why} ({end}{', ' + str(error) if error else ''})",
                {"end": end, "error": error},
            )
        )
    if truncated:
        issues.append(
            Issue(
                "truncated",
                f"the capture holds {len(response.body)} of {exchange.size} bytes (its size cap);"
                " the checks that need the whole answer were skipped",
                {"captured": len(response.body), "size": exchange.size},
            )
        )
    if end == "client_disconnected":
        issues.append(Issue("client_disconnected", "the client went away before the answer ended"))

    chunks = response.chunks
    gaps = [
        {
            "after_chunk": i,
            "at_ms": round(chunks[i][0], 1),
            "gap_ms": round(chunks[i + 1][0] - chunks[i][0], 1),
        }
        for i in range(len(chunks) - 1)
        if chunks[i + 1][0] - chunks[i][0] > gap_ms
    ]
    if gaps:
        longest = max(g["gap_ms"] for g in gaps)
        issues.append(
            Issue(
                "chunk_gap",
                f"{len(gaps)} gap(s) between chunks above {gap_ms:g} ms (longest {longest:g} ms)",
                {
                    "count": len(gaps),
                    "longest_ms": longest,
                    "threshold_ms": gap_ms,
                    "gaps": gaps[:EXAMPLES],
                },
            )
        )

    if status is None or not chunks:
        return _ordered(issues)
    api = api_of(exchange)
    answer = Answer()
    # A client that left took the rest of the answer with it: nothing to check it against.
    complete = end == "complete" and not truncated
    if _is_event_stream(exchange):
        parsed = parse_sse(chunks)
        bad_data: list[dict[str, Any]] = []
        for event in parsed.events:
            if event.data is None:
                continue
            if event.data == "[DONE]":
                answer.ended = answer.ended or api in ("chat", "completions")
                continue
            data = _json(event.data)
            if data is _NOT_JSON:
                bad_data.append(
                    {"line": event.line, "text": event.data[:_EXCERPT], "why": "data is not JSON"}
                )
                continue
            error = _error_of(data) if event.event in (None, "error") else None
            if event.event == "error" and error is None:
                error = {"message": str(data)[:_EXCERPT]}
            if error is not None:
                answer.errors.append({"line": event.line, "error": error})
                continue
            if isinstance(data, dict):
                if data.get("type") == "response.failed":
                    failed = (data.get("response") or {}).get("error")
                    answer.errors.append(
                        {"line": event.line, "error": failed or {"type": "response.failed"}}
                    )
                _stream_event(answer, api or "", event, data)
        malformed = parsed.malformed + bad_data
        if malformed:
            malformed.sort(key=lambda m: m["line"])
            issues.append(
                Issue(
                    "malformed_sse",
                    f"{len(malformed)} malformed SSE line(s), first at line {malformed[0]['line']}:"
                    f" {malformed[0]['why']}",
                    {"count": len(malformed), "lines": malformed[:EXAMPLES]},
                )
            )
        if parsed.incomplete_tail and end == "complete" and not truncated:
            issues.append(
                Issue(
                    "cut",
                    "the stream's last event is incomplete (no blank line ends it)",
                    {"end": end},
                )
            )
            complete = False
        if answer.errors and status == 200:
            first = answer.errors[0]["error"]
            issues.append(
                Issue(
                    "error_in_200",
                    f"an error event in a 200 stream: {_error_text(first)}",
                    {"count": len(answer.errors), "errors": answer.errors[:EXAMPLES]},
                )
            )
        if complete and status == 200 and not answer.errors:
            if api in ("chat", "completions", "anthropic", "responses") and not answer.ended:
                expected = {
                    "chat": "data: [DONE]",
                    "completions": "data: [DONE]",
                    "anthropic": "message_stop",
                    "responses": "response.completed, .incomplete or .failed",
                }[api]
                issues.append(
                    Issue(
                        "no_stream_end",
                        f"the stream ended without {expected}",
                        {"api": api, "expected": expected},
                    )
                )
            stream_usage_expected = api in ("anthropic", "responses") or (
                api in ("chat", "completions") and _include_usage_asked(exchange)
            )
            if stream_usage_expected:
                _usage_checks(issues, answer, api or "", exchange, tolerance, "stream")
            _tool_checks(issues, answer)
        return _ordered(issues)

    # A JSON (or other) body.
    ctype = (response.header("content-type") or "").lower()
    if status != 200 or not complete:
        return _ordered(issues)
    body = _json(response.body)
    if body is _NOT_JSON:
        if "json" in ctype or api is not None:
            promised = response.header("content-length")
            # Bodies are kept decoded: a compressed answer's Content-Length counts other bytes.
            encoded = (response.header("content-encoding") or "identity").lower() != "identity"
            if (
                promised
                and promised.isdigit()
                and not encoded
                and int(promised) > len(response.body)
            ):
                issues.append(
                    Issue(
                        "cut",
                        f"the JSON body is {len(response.body)} of the {promised} bytes promised",
                        {"received": len(response.body), "content_length": int(promised)},
                    )
                )
            else:
                issues.append(
                    Issue(
                        "bad_json",
                        f"the 200 body is not JSON: {response.body[:60]!r}",
                        {
                            "content_type": ctype,
                            "excerpt": response.body[:_EXCERPT].decode("utf-8", "replace"),
                        },
                    )
                )
        return _ordered(issues)
    error = _error_of(body)
    if error is not None:
        issues.append(
            Issue(
                "error_in_200",
                f"a 200 whose body is an error: {_error_text(error)}",
                {"error": error},
            )
        )
        return _ordered(issues)
    if api is None:
        return _ordered(issues)
    _json_answer(answer, api, body)
    _usage_checks(issues, answer, api, exchange, tolerance, "JSON answer")
    _tool_checks(issues, answer)
    return _ordered(issues)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        message = error.get("message")
        return f"{kind}: {message}" if kind and message else str(message or kind or error)
    return str(error)


def _usage_checks(
    issues: list[Issue],
    answer: Answer,
    api: str,
    exchange: Exchange,
    tolerance: Tolerance,
    what: str,
) -> None:
    if answer.usage is None:
        issues.append(Issue("no_usage", f"the {what} never carried usage", {"api": api}))
        return
    if api == "embeddings" or answer.reported is None:
        return
    text = "".join(answer.text)
    text += "".join(
        "".join(pieces) + answer.tool_names.get(k, "") for k, pieces in answer.tool_args.items()
    )
    model = _model_of(exchange)
    encoding = encoding_for(model)
    counted = estimate_tokens(text, encoding=encoding)
    if not tolerance.allows(answer.reported, counted):
        issues.append(
            Issue(
                "usage_mismatch",
                f"usage reports {answer.reported} completion tokens; the answer's text counts"
                f" {counted} ({encoding}); tolerance {tolerance}",
                {
                    "reported": answer.reported,
                    "counted": counted,
                    "encoding": encoding,
                    "tolerance": str(tolerance),
                },
            )
        )


def _tool_checks(issues: list[Issue], answer: Answer) -> None:
    bad: list[dict[str, Any]] = []
    for where, pieces in answer.tool_args.items():
        arguments = "".join(pieces)
        if arguments == "":
            continue  # no arguments sent: a function without parameters
        parsed = _json(arguments)
        if parsed is _NOT_JSON or not isinstance(parsed, dict):
            why = "not JSON" if parsed is _NOT_JSON else "not a JSON object"
            bad.append(
                {
                    "where": where,
                    "name": answer.tool_names.get(where),
                    "why": why,
                    "arguments": arguments[:_EXCERPT],
                    "pieces": len(pieces),
                }
            )
    if bad:
        first = bad[0]
        issues.append(
            Issue(
                "tool_args_invalid",
                f"tool-call arguments of {first['name'] or first['where']} ({first['where']}) are"
                f" {first['why']} once assembled: {first['arguments']!r}",
                {"count": len(bad), "calls": bad[:EXAMPLES]},
            )
        )


def _ordered(issues: list[Issue]) -> list[Issue]:
    return sorted(issues, key=lambda i: CODES.index(i.code))


def summarize(found: Iterable[list[Issue]]) -> dict[str, Any]:
    """Exchanges, those with issues (notes aside), and the count of each code."""
    exchanges = with_issues = 0
    by_code: dict[str, int] = {}
    for issues in found:
        exchanges += 1
        if any(not i.info for i in issues):
            with_issues += 1
        for issue in issues:
            by_code[issue.code] = by_code.get(issue.code, 0) + 1
    return {
        "exchanges": exchanges,
        "with_issues": with_issues,
        "by_code": {c: by_code[c] for c in CODES if c in by_code},
    }
