"""`manage.py capture_inspect`: the listing, and one test per problem --detect-issues claims.

Every capture is made the way the gateway makes one: the fake upstream (in a thread) is
scripted to produce the problem, called with httpx, and what came back (status, headers, each
chunk as read with its arrival time, how it ended) is written as an exchange item with
CaptureWriter. Clean calls of each API are inspected too, so that every detector is seen
both firing and staying quiet.
"""

from __future__ import annotations

import io
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from fake_upstream import FakeUpstream
from tests.usage.capture_make import write_capture
from usage.capture.format import Exchange, header_item, read_file
from usage.capture.inspect import detect_issues, parse_sse

REPLY = "The quick brown fox jumps over the lazy dog"  # 9 words, 9 cl100k tokens
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say it"}]}
MESSAGES = {"model": "claude-3-5-haiku-latest", "max_tokens": 256, **CHAT}
RESPONSES = {"model": "gpt-4o-mini", "input": "Say it"}
# path, body, api, operation
APIS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "chat": ("/v1/chat/completions", CHAT, "openai", "chat"),
    "anthropic": ("/v1/messages", MESSAGES, "anthropic", "chat"),
    "responses": ("/v1/responses", RESPONSES, "openai", "responses"),
}
_keys = itertools.count(1)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def base_url(fake: FakeUpstream) -> str:
    return f"http://{fake.host}:{fake.port}"


def captured(
    fake: FakeUpstream,
    http: httpx.Client,
    api: str,
    behaviour: dict[str, Any] | None = None,
    *,
    stream: bool = True,
    stop_after: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Call the fake with `behaviour` scripted for a fresh key and return the exchange item,
    as the gateway writes one for an upstream leg. `stop_after` chunks: the client leaves."""
    path, body, flavour, operation = APIS[api]
    key = f"sk-inspect-{next(_keys):04d}-secret"
    fake.script(keys={key: {"queue": [{"reply": REPLY, **(behaviour or {})}]}})
    body = {**body, **extra}
    if stream:
        body["stream"] = True
        if api == "chat":
            body["stream_options"] = {"include_usage": True}
    headers = {"authorization": f"Bearer {key}"}
    if flavour == "anthropic":
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    raw_body = json.dumps(body).encode()
    chunks: list[list[Any]] = []
    status, response_headers, end, error, t_head = None, [], "complete", None, None
    started, wall = time.perf_counter(), time.time()

    def ms() -> float:
        return (time.perf_counter() - started) * 1000

    try:
        with http.stream(
            "POST", base_url(fake) + path, content=raw_body, headers=headers
        ) as response:
            status, t_head = response.status_code, ms()
            response_headers = [[k, v] for k, v in response.headers.multi_items()]
            for piece in response.iter_raw():
                chunks.append([ms(), piece])
                if stop_after is not None and len(chunks) >= stop_after:
                    end = "client_disconnected"
                    break
    except httpx.RemoteProtocolError as exc:
        end, error = "cut", type(exc).__name__
    return {
        "type": "exchange",
        "request_id": uuid.uuid4().hex,
        "leg": "upstream",
        "attempt": 1,
        "time": wall,
        "route": body["model"],
        "model": body["model"],
        "client": "tests",
        "provider": flavour,
        "key": "fake-key-1",
        "operation": operation,
        "api": flavour,
        "stream": stream,
        "secrets": [key],
        "request": {
            "method": "POST",
            "url": base_url(fake) + path,
            "headers": [["content-type", "application/json"], *map(list, headers.items())],
            "body": raw_body,
            "body_size": len(raw_body),
            "t": 0.0,
        },
        "response": {
            "status": status,
            "headers": response_headers,
            "t": t_head,
            "chunks": chunks,
            "size": sum(len(c) for _, c in chunks),
            "truncated": False,
            "end": end,
            "error": error,
            "t_end": ms(),
        },
        "outcome": "success" if end == "complete" and status == 200 else "error",
    }


def write(folder: Path, *items: dict[str, Any]) -> Path:
    return write_capture(folder, list(items))


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("capture_inspect", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def inspect(tmp_path: Path, *items: dict[str, Any], args: tuple[str, ...] = ()) -> dict[str, Any]:
    path = write(tmp_path / "captures", *items)
    out, _ = run(str(path), "--detect-issues", "--json", *args)
    document: dict[str, Any] = json.loads(out)
    return document


def codes(document: dict[str, Any], n: int = 0) -> list[str]:
    return [issue["code"] for issue in document["exchanges"][n]["issues"]]


def issue(document: dict[str, Any], code: str, n: int = 0) -> dict[str, Any]:
    found = [i for i in document["exchanges"][n]["issues"] if i["code"] == code]
    assert found, f"no {code} in {codes(document, n)}"
    result: dict[str, Any] = found[0]
    return result


# ---- clean calls: every detector quiet ----------------------------------------------------


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_clean_call_has_no_issue(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str, stream: bool
) -> None:
    document = inspect(tmp_path, captured(fake, http, api, stream=stream))
    assert document["exchanges"][0]["status"] == 200
    assert codes(document) == []
    assert document["summary"] == {"exchanges": 1, "with_issues": 0, "by_code": {}}


@pytest.mark.parametrize("api", list(APIS))
def test_clean_tool_call_stream_has_no_issue(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str
) -> None:
    document = inspect(tmp_path, captured(fake, http, api, {"fault": "tool_call", "reply": None}))
    assert codes(document) == []


# ---- one test per detector ----------------------------------------------------------------


@pytest.mark.parametrize("api", list(APIS))
def test_malformed_sse_lines_and_data_that_is_not_json(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str
) -> None:
    document = inspect(tmp_path, captured(fake, http, api, {"fault": "bad_sse"}))
    found = issue(document, "malformed_sse")
    whys = [line["why"] for line in found["detail"]["lines"]]
    assert found["detail"]["count"] == 2
    assert whys == ["no field name and colon", "data is not JSON"]
    assert found["detail"]["lines"][0]["text"] == "this line is not SSE"


@pytest.mark.parametrize("api", list(APIS))
def test_stream_without_its_end_event(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str
) -> None:
    document = inspect(tmp_path, captured(fake, http, api, {"fault": "no_done"}))
    found = issue(document, "no_stream_end")
    expected = {"chat": "data: [DONE]", "anthropic": "message_stop"}.get(api, "response.completed")
    assert expected in found["message"]
    assert found["level"] == "issue"


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_answer_that_never_carried_usage(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str, stream: bool
) -> None:
    document = inspect(tmp_path, captured(fake, http, api, {"fault": "no_usage"}, stream=stream))
    assert codes(document) == ["no_usage"]


def test_stream_that_was_not_asked_for_usage_is_not_flagged(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    item = captured(fake, http, "chat", stream=True, stream_options={"include_usage": False})
    assert codes(inspect(tmp_path, item)) == []


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_usage_that_disagrees_with_the_counted_tokens(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str, stream: bool
) -> None:
    item = captured(fake, http, api, {"usage_completion_tokens": 40}, stream=stream)
    found = issue(inspect(tmp_path, item), "usage_mismatch")
    assert found["detail"]["reported"] == 40
    assert found["detail"]["counted"] == 9
    # 31 apart: within a tolerance of 31 tokens, beyond one of 30.
    again = inspect(tmp_path / "2", item, args=("--usage-tolerance", "31,0%"))
    assert "usage_mismatch" not in codes(again)
    again = inspect(tmp_path / "3", item, args=("--usage-tolerance", "30"))
    assert "usage_mismatch" in codes(again)


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_200_whose_body_is_an_error(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str, stream: bool
) -> None:
    document = inspect(tmp_path, captured(fake, http, api, {"fault": "error_200"}, stream=stream))
    assert document["exchanges"][0]["status"] == 200
    assert codes(document) == ["error_in_200"]
    assert "error" in issue(document, "error_in_200")["message"]


@pytest.mark.parametrize("api", list(APIS))
def test_tool_arguments_that_do_not_assemble_into_json(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str
) -> None:
    item = captured(fake, http, api, {"fault": "bad_tool_args", "reply": None})
    found = issue(inspect(tmp_path, item), "tool_args_invalid")
    (call,) = found["detail"]["calls"]
    assert call["name"] == "get_weather"
    assert call["arguments"] == '{"location": "Paris, France"'
    assert call["pieces"] == 3  # assembled from the deltas, not read whole


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_tool_arguments_of_a_json_answer(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str
) -> None:
    item = captured(fake, http, api, {"fault": "bad_tool_args", "reply": None}, stream=False)
    assert "tool_args_invalid" in codes(inspect(tmp_path, item))


def test_gaps_between_chunks_above_the_threshold(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    item = captured(fake, http, "chat", {"token_delay_ms": 150})
    found = issue(inspect(tmp_path, item, args=("--gap-ms", "100")), "chunk_gap")
    assert found["detail"]["longest_ms"] >= 150
    assert found["detail"]["threshold_ms"] == 100
    # The same capture against a threshold above every gap.
    assert codes(inspect(tmp_path / "2", item, args=("--gap-ms", "2000"))) == []


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_response_cut_midway(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path, api: str, stream: bool
) -> None:
    document = inspect(tmp_path, captured(fake, http, api, {"fault": "cut"}, stream=stream))
    assert document["exchanges"][0]["end"] == "cut"
    assert codes(document) == ["cut"]


def test_stream_whose_last_event_is_incomplete(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    """Recorded as complete, yet its bytes stop inside an event: the capture says cut."""
    item = captured(fake, http, "chat")
    chunks = item["response"]["chunks"]
    chunks[-1] = [chunks[-1][0], b"data: [DO"]
    found = issue(inspect(tmp_path, item), "cut")
    assert "incomplete" in found["message"]


def test_200_body_that_is_not_json(fake: FakeUpstream, http: httpx.Client, tmp_path: Path) -> None:
    item = captured(fake, http, "chat", {"fault": "garbage"}, stream=False)
    assert codes(inspect(tmp_path, item)) == ["bad_json"]


def test_client_disconnect_is_a_note_not_an_issue(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    item = captured(fake, http, "chat", {"token_delay_ms": 20}, stop_after=2)
    document = inspect(tmp_path, item)
    found = issue(document, "client_disconnected")
    assert found["level"] == "info"
    assert document["summary"]["with_issues"] == 0


def test_error_status_is_an_outcome_not_an_issue(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    item = captured(fake, http, "chat", {"fault": "503"}, stream=False)
    document = inspect(tmp_path, item)
    assert document["exchanges"][0]["status"] == 503
    assert codes(document) == []


def test_truncated_capture_skips_the_whole_answer_checks(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    item = captured(fake, http, "chat")
    response = item["response"]
    response["chunks"] = response["chunks"][:2]  # as the capture's size cap keeps it
    response["truncated"] = True
    assert codes(inspect(tmp_path, item)) == ["truncated"]


def test_sse_event_times_are_the_arrival_of_their_last_byte() -> None:
    parsed = parse_sse([(10.0, b"data: {}\n"), (20.0, b"\n: comment\n\ndata: 1\n\n")])
    assert [(e.data, e.t) for e in parsed.events] == [("{}", 20.0), ("1", 20.0)]
    assert not parsed.malformed and not parsed.incomplete_tail


# ---- the command ---------------------------------------------------------------------------


def test_listing_columns(fake: FakeUpstream, http: httpx.Client, tmp_path: Path) -> None:
    first = captured(fake, http, "chat")
    second = captured(fake, http, "anthropic", {"fault": "429"}, stream=False)
    path = write(tmp_path, first, second)
    out, _ = run(str(path))
    lines = out.splitlines()
    header = lines[0].split()
    assert header == [
        "TIME",
        "REQUEST",
        "LEG",
        "ATT",
        "ROUTE",
        "KEY",
        "STATUS",
        "MS",
        "BYTES",
        "STREAM",
        "END",
    ]
    rows = [line.split() for line in lines[1:3]]
    assert rows[0][1:7] == [
        first["request_id"],
        "upstream",
        "1",
        "gpt-4o-mini",
        "fake-key-1",
        "200",
    ]
    assert rows[1][1] == second["request_id"] and rows[1][6] == "429"
    assert rows[0][9:] == ["yes", "complete"] and rows[1][9:] == ["no", "complete"]
    assert int(rows[0][8]) == first["response"]["size"]
    assert rows[0][0].endswith("Z") and rows[0][0][:4].isdigit()
    # Aligned: each column starts at the same offset on every line.
    starts = [lines[0].index("REQUEST"), lines[0].index("STATUS") + len("STATUS")]
    assert lines[1][starts[0] :].startswith(first["request_id"])
    assert lines[2][: starts[1]].endswith("429")
    assert lines[3] == "2 exchanges in 1 file(s)"
    assert "sk-inspect" not in out


def test_issues_under_each_exchange_and_a_summary(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    clean = captured(fake, http, "chat")
    broken = captured(fake, http, "chat", {"fault": "no_done"})
    path = write(tmp_path, clean, broken)
    out, _ = run(str(path), "--detect-issues")
    lines = out.splitlines()
    assert broken["request_id"] in lines[2]
    assert lines[3].startswith("    issue no_stream_end: the stream ended without data: [DONE]")
    assert lines[-1] == "2 exchanges in 1 file(s), 1 with issues: no_stream_end 1"


def test_request_id_filter_and_folders(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    items = [captured(fake, http, "chat", stream=False) for _ in range(3)]
    write(tmp_path, *items)
    out, _ = run(str(tmp_path), "--json", "--request-id", items[1]["request_id"])
    document = json.loads(out)
    assert [e["request_id"] for e in document["exchanges"]] == [items[1]["request_id"]]
    assert "issues" not in document["exchanges"][0]


def test_json_shape(fake: FakeUpstream, http: httpx.Client, tmp_path: Path) -> None:
    item = captured(fake, http, "chat", {"fault": "no_usage"})
    document = inspect(tmp_path, item)
    (path,) = (tmp_path / "captures").glob("*.cbor")
    assert document["files"] == [{"path": str(path), "exchanges": 1, "problem": None}]
    (row,) = document["exchanges"]
    assert set(row) == {
        "time",
        "request_id",
        "leg",
        "attempt",
        "route",
        "key",
        "status",
        "duration_ms",
        "size",
        "stream",
        "end",
        "file",
        "offset",
        "issues",
    }
    assert row["key"] == "fake-key-1" and row["stream"] is True and row["attempt"] == 1
    assert row["duration_ms"] > 0
    assert row["issues"] == [
        {
            "code": "no_usage",
            "level": "issue",
            "message": "the stream never carried usage",
            "detail": {"api": "chat"},
        }
    ]
    assert document["summary"] == {
        "exchanges": 1,
        "with_issues": 1,
        "by_code": {"no_usage": 1},
    }


def test_fail_on_issues_exits_1_only_when_there_are_issues(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    clean = write(tmp_path / "clean", captured(fake, http, "chat"))
    broken = write(tmp_path / "broken", captured(fake, http, "chat", {"fault": "no_done"}))
    run(str(clean), "--fail-on-issues")
    run(str(broken), "--detect-issues")  # a report: exit 0
    with pytest.raises(SystemExit) as exited:
        run(str(broken), "--fail-on-issues")
    assert exited.value.code == 1


def test_torn_tail_is_reported_and_what_precedes_it_listed(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    items = [captured(fake, http, "chat", stream=False) for _ in range(2)]
    path = write(tmp_path, *items)
    path.write_bytes(path.read_bytes()[:-10])  # a crash in the middle of the last item
    out, err = run(str(path), "--detect-issues")
    assert f"{path}: the last" in err and "torn item" in err
    assert items[0]["request_id"] in out and items[1]["request_id"] not in out
    document = json.loads(run(str(path), "--json")[0])
    assert "torn item" in document["files"][0]["problem"]
    assert len(document["exchanges"]) == 1


def test_a_file_that_is_not_a_capture(tmp_path: Path) -> None:
    other = tmp_path / "notes.cbor"
    other.write_bytes(cbor2.dumps({"hello": "world"}))
    with pytest.raises(CommandError, match=f"{other}: not a capture file"):
        run(str(other))
    text = tmp_path / "notes.txt"
    text.write_text("just text\n")
    with pytest.raises(CommandError, match=str(text)):
        run(str(text))
    with pytest.raises(CommandError, match="no such file"):
        run(str(tmp_path / "missing.cbor"))


def test_bad_usage_tolerance_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "capture-20261207T11-h-1-0.cbor"
    path.write_bytes(cbor2.dumps(header_item(host="h", pid=1, created=_now())))
    with pytest.raises(CommandError, match="not a number of tokens or a percentage"):
        run(str(path), "--usage-tolerance", "lots")


def test_detect_issues_reads_an_exchange_as_the_reader_returns_it(
    fake: FakeUpstream, http: httpx.Client, tmp_path: Path
) -> None:
    path = write(tmp_path, captured(fake, http, "anthropic", {"fault": "no_done"}))
    (exchange,) = read_file(path).exchanges
    assert isinstance(exchange, Exchange)
    assert [i.code for i in detect_issues(exchange)] == ["no_stream_end"]


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
