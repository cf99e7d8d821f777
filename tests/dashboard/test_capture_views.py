"""The dashboard's side of wire capture (#11): a request page links each captured attempt to its
capture and loads the capture (headers, bodies, a stream's chunks with their timings) when asked;
a pruned capture says so; every page warns while capturing is on or capture files exist. The
capture files are made by the production writer (CaptureWriter), so what the page shows has been
masked the way real captures are."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from keys.models import CaptureRule, ClientToken
from tests.dashboard.conftest import text
from tests.factories import CallRecordFactory, ClientTokenFactory
from tests.usage.capture_make import write_capture
from usage.capture import selectors
from usage.capture.selectors import SHOWN_CHUNKS, capture_status_forget

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("capture_dir")]

SECRET = "sk-fakeKEYmiddlepart0123456789wxyz"
# What a mask may keep of it (`sk-…wxyz`); nothing of the middle may reach a page.
SECRET_CORE = SECRET[7:-4]
HX = {"HX-Request": "true", "HX-Current-URL": "http://testserver/dashboard/calls/"}


def section(html: str, anchor: str) -> str:
    found = re.search(rf'<section class="capture-leg" id="{anchor}".*?</section>', html, re.S)
    assert found, f"no capture section {anchor}"
    return found.group(0)


def exchange(
    request_id: str, leg: str, attempt: int, when: datetime, **fields: Any
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "type": "exchange",
        "request_id": request_id,
        "leg": leg,
        "attempt": attempt,
        "time": when.timestamp(),
        "route": "gpt-4o-mini",
        "model": "gpt-4o-mini",
        "client": "team-a",
        "provider": "openai" if leg == "upstream" else None,
        "key": f"openai-{attempt}" if leg == "upstream" else None,
        "operation": "chat",
        "api": "openai",
        "stream": False,
        "outcome": "success",
    }
    item.update(fields)
    return item


REQUEST_BODY = (
    b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"say hi"}]}'
)
STREAM_CHUNKS: list[tuple[float, bytes]] = [
    (212.5, b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'),
    (230.1, b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n'),
    (251.0, b"data: [DONE]\n\n"),
]


def stream_request(directory: Path, when: datetime, request_id: str = "r-stream") -> None:
    """A client's stream: attempt 1 rate-limited (a JSON error), attempt 2 streamed."""
    auth = [["authorization", f"Bearer {SECRET}"], ["content-type", "application/json"]]
    write_capture(
        directory,
        [
            exchange(
                request_id, "client", 0, when, stream=True,
                request={"method": "POST", "url": "/v1/chat/completions", "headers": auth,
                         "body": REQUEST_BODY, "body_size": len(REQUEST_BODY), "t": 0.4},
                response={"status": 200, "headers": [["content-type", "text/event-stream"]],
                          "t": 213.0, "chunks": [[t + 0.5, c] for t, c in STREAM_CHUNKS],
                          "size": sum(len(c) for _, c in STREAM_CHUNKS), "truncated": False,
                          "end": "complete", "error": None, "t_end": 252.0},
            ),
            exchange(
                request_id, "upstream", 1, when, outcome="rate_limited",
                request={"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
                         "headers": [["authorization", f"Bearer {SECRET}"]],
                         # The key also inside the body (a provider that wants it there).
                         "body": REQUEST_BODY[:-1] + f',"api_key":"{SECRET}"}}'.encode(),
                         "t": 1.0},
                response={"status": 429, "headers": [["retry-after", "1"]], "t": 40.0,
                          "chunks": [[40.0, b'{"error":{"message":"slow down"}}']], "size": 33,
                          "truncated": False, "end": "complete", "error": None, "t_end": 41.0},
                secrets=[SECRET],
            ),
            exchange(
                request_id, "upstream", 2, when, stream=True,
                request={"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
                         "headers": [["authorization", f"Bearer {SECRET}"]],
                         "body": REQUEST_BODY, "t": 42.0},
                response={"status": 200, "headers": [["content-type", "text/event-stream"]],
                          "t": 212.5, "chunks": [list(c) for c in STREAM_CHUNKS],
                          "size": sum(len(c) for _, c in STREAM_CHUNKS), "truncated": False,
                          "end": "complete", "error": None, "t_end": 251.5},
                secrets=[SECRET],
            ),
        ],
    )  # fmt: skip


def stream_records(when: datetime, request_id: str = "r-stream") -> None:
    """The call records of stream_request's two attempts, both captured."""
    retried = {"outcome": "rate_limited", "status_code": 429}
    answered = {"stream": True, "final": True, "client_status": 200}
    for attempt, fields in ((1, retried), (2, answered)):
        CallRecordFactory(
            request_id=request_id,
            attempt=attempt,
            key_id=f"openai-{attempt}",
            started_at=when,
            captured=True,
            **fields,
        )


def test_only_captured_attempts_link_to_their_capture(
    staff: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_file_reads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the request page read the capture files")

    # The request page only links; the files are read when the capture is asked for.
    monkeypatch.setattr(selectors, "find_request", no_file_reads)
    now = timezone.now()
    CallRecordFactory(
        request_id="r-mixed",
        attempt=1,
        started_at=now,
        captured=False,
        outcome="rate_limited",
        status_code=429,
    )
    CallRecordFactory(request_id="r-mixed", attempt=2, started_at=now, captured=True)  # fmt: skip
    CallRecordFactory(request_id="r-plain", attempt=1, started_at=now)

    html = staff.get("/dashboard/calls/r-mixed/").content.decode()
    links = re.findall(r'<a class="pill capture-link"[^>]*href="([^"]+)"', html)
    assert links == ["/dashboard/calls/r-mixed/capture/#capture-attempt-2"]
    # The section that loads the capture when opened, not the capture itself.
    assert 'hx-get="/dashboard/calls/r-mixed/capture/"' in html
    assert "Wire capture" in text(html) and 'class="capture-leg"' not in html

    plain = staff.get("/dashboard/calls/r-plain/").content.decode()
    assert "capture-link" not in plain and 'hx-get="/dashboard/calls/r-plain/capture/"' not in plain
    # The drawer (the same partial through htmx) links too.
    drawer = staff.get("/dashboard/calls/r-mixed/", headers=HX).content.decode()
    assert "#capture-attempt-2" in drawer


def test_a_captured_stream_shows_headers_bodies_and_chunks_with_timings(
    staff: Client, capture_dir: Path
) -> None:
    now = timezone.now()
    stream_request(capture_dir, now)
    stream_records(now)

    html = staff.get("/dashboard/calls/r-stream/capture/", headers=HX).content.decode()
    assert "<html" not in html  # the partial, for the request page's section

    client_leg = section(html, "capture-client")
    assert "POST /v1/chat/completions" in text(client_leg)
    # Masked by the writer before it reached the file: the scheme, the mask's ends.
    assert "Bearer sk-…wxyz" in text(client_leg)
    # The request body as indented JSON.
    assert "&quot;content&quot;: &quot;say hi&quot;" in client_leg
    assert "data-json" in client_leg

    streamed = section(html, "capture-attempt-2")
    assert "Attempt 2 · gateway → openai / openai-2" in text(streamed)
    assert "POST https://api.openai.com/v1/chat/completions" in text(streamed)
    rows = re.findall(r'<tr data-chunk="(\d+)">(.*?)</tr>', streamed, re.S)
    assert [n for n, _ in rows] == ["1", "2", "3"]
    cells = [[text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)] for _, r in rows]
    # At (ms since start), gap (the first: since the request left at 42.0 ms), size, text.
    assert cells[0][1:4] == ["212.5 ms", "170.5 ms", f"{len(STREAM_CHUNKS[0][1])} B"]
    assert cells[1][1:3] == ["230.1 ms", "17.6 ms"]
    assert cells[2][1:3] == ["251.0 ms", "20.9 ms"]
    assert cells[2][4] == "data: [DONE]"
    assert "&quot;content&quot;:&quot;Hel&quot;" in rows[0][1]
    assert "complete" in text(re.search(r"<span[^>]*data-end[^>]*>.*?</span>", streamed).group(0))  # type: ignore[union-attr]

    # The rate-limited attempt: a one-piece JSON answer, shown as its body, not as chunks.
    limited = section(html, "capture-attempt-1")
    assert "429" in text(limited) and "retry-after" in limited
    assert "data-chunks" not in limited
    assert "&quot;message&quot;: &quot;slow down&quot;" in limited


@pytest.mark.parametrize("reads", [1, 3], ids=["one read", "several reads"])
def test_a_captured_json_call_shows_its_answer_as_indented_json(
    staff: Client, capture_dir: Path, reads: int
) -> None:
    now = timezone.now()
    answer = (
        b'{"id":"chatcmpl-1","choices":[{"message":{"content":"hi"}}],"usage":{"total_tokens":7}}'
    )
    # An answer that came in several reads is still one body, not a table of chunks.
    cut = len(answer) // reads
    pieces = [answer[i * cut : (i + 1) * cut if i < reads - 1 else None] for i in range(reads)]
    chunks = [[120.0 + i, piece] for i, piece in enumerate(pieces)]
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
    write_capture(capture_dir, [
        exchange("r-json", "upstream", 1, now,
                 request={"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
                          "headers": [["content-type", "application/json"]], "body": body,
                          "t": 1.0},
                 response={"status": 200, "headers": [["content-type", "application/json"]],
                           "t": 120.0, "chunks": chunks, "size": len(answer),
                           "truncated": False, "end": "complete", "error": None,
                           "t_end": 121.0}),
    ])  # fmt: skip
    CallRecordFactory(request_id="r-json", attempt=1, started_at=now, captured=True)

    # Followed as a link (not htmx): a whole page with the capture in it.
    html = staff.get("/dashboard/calls/r-json/capture/").content.decode()
    assert "<html" in html and "/dashboard/calls/r-json/" in html
    leg = section(html, "capture-attempt-1")
    assert "data-chunks" not in leg
    assert '"total_tokens": 7'.replace('"', "&quot;") in leg
    assert "&quot;content&quot;: &quot;hello&quot;" in leg
    assert "one body" in text(leg) and "120 ms" in text(leg)  # first byte


def test_a_pruned_capture_says_it_is_no_longer_on_disk(staff: Client, capture_dir: Path) -> None:
    now = timezone.now()
    stream_records(now, "r-gone")
    html = staff.get("/dashboard/calls/r-gone/capture/", headers=HX).content.decode()
    assert "capture no longer on disk (pruned by retention or size cap)" in text(html).lower()
    assert "data-capture-pruned" in html

    # One attempt's leg still there, the other's gone: that one is named.
    write_capture(capture_dir, [
        exchange("r-half", "upstream", 2, now, request={"method": "POST", "url": "/x", "t": 1.0},
                 response={"status": 200, "t": 2.0, "chunks": [[2.0, b"{}"]], "size": 2,
                           "end": "complete", "t_end": 3.0}),
    ])  # fmt: skip
    stream_records(now, "r-half")
    half = staff.get("/dashboard/calls/r-half/capture/", headers=HX).content.decode()
    assert "data-capture-pruned" not in half
    missing = re.search(r"<p[^>]*data-capture-missing[^>]*>.*?</p>", half, re.S)
    assert missing and text(missing.group(0)).startswith("Attempt 1: capture no longer on disk")


def test_an_unreadable_capture_folder_is_said_not_raised(
    staff: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(selectors, "find_request", unreadable)
    stream_records(timezone.now(), "r-locked")
    response = staff.get("/dashboard/calls/r-locked/capture/", headers=HX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "cannot be read (Permission denied)" in text(html)
    assert "data-capture-pruned" not in html


def test_capture_content_is_escaped_and_holds_no_secret(staff: Client, capture_dir: Path) -> None:
    now = timezone.now()
    script = b'{"messages":[{"role":"user","content":"<script>alert(1)</script>"}]}'
    write_capture(capture_dir, [
        exchange("r-xss", "upstream", 1, now,
                 request={"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
                          "headers": [["authorization", f"Bearer {SECRET}"],
                                      ["x-api-key", SECRET]],
                          "body": script[:-1] + f',"key":"{SECRET}"}}'.encode(), "t": 1.0},
                 response={"status": 200, "headers": [["x-evil", "<img src=x onerror=alert(2)>"]],
                           "t": 5.0, "chunks": [[5.0, b"data: <script>alert(3)</script>\n\n"],
                                                [6.0, b"data: [DONE]\n\n"]],
                           "size": 48, "end": "complete", "t_end": 7.0},
                 stream=True, secrets=[SECRET]),
    ])  # fmt: skip
    CallRecordFactory(request_id="r-xss", attempt=1, started_at=now, captured=True)

    for headers in (HX, {}):
        html = staff.get("/dashboard/calls/r-xss/capture/", headers=headers).content.decode()
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "&lt;script&gt;alert(3)&lt;/script&gt;" in html
        assert "&lt;img src=x onerror=alert(2)&gt;" in html
        assert SECRET not in html
        for start in range(len(SECRET_CORE) - 7):
            run = SECRET_CORE[start : start + 8]
            assert run not in html, f"{run!r} of the key is on the page"


def test_the_stream_s_chunks_are_bounded(staff: Client, capture_dir: Path) -> None:
    now = timezone.now()
    many = [[float(i), b"data: x\n\n"] for i in range(SHOWN_CHUNKS + 25)]
    write_capture(capture_dir, [
        exchange("r-long", "upstream", 1, now, stream=True,
                 request={"method": "POST", "url": "/x", "t": 0.0},
                 response={"status": 200, "t": 0.0, "chunks": many, "size": 9 * len(many),
                           "end": "complete", "t_end": float(len(many))}),
    ])  # fmt: skip
    CallRecordFactory(request_id="r-long", attempt=1, started_at=now, captured=True)
    html = staff.get("/dashboard/calls/r-long/capture/", headers=HX).content.decode()
    assert html.count("<tr data-chunk=") == SHOWN_CHUNKS
    assert "… 25 more chunks (225 bytes) not shown" in text(html)


def test_every_page_warns_while_a_capture_rule_is_active(staff: Client) -> None:
    assert "data-capture-warning" not in staff.get("/dashboard/").content.decode()
    # Disabled, or expired: capturing nothing, no warning.
    CaptureRule.objects.create(enabled=False)
    CaptureRule.objects.create(
        client=cast(ClientToken, ClientTokenFactory()), until=timezone.now() - timedelta(minutes=1)
    )
    capture_status_forget()
    assert "data-capture-warning" not in staff.get("/dashboard/").content.decode()

    fifteen_minutes = timezone.now() + timedelta(minutes=15)
    CaptureRule.objects.create(
        client=cast(ClientToken, ClientTokenFactory()), until=fifteen_minutes
    )
    capture_status_forget()
    for url in ("/dashboard/", "/dashboard/calls/", "/dashboard/limits/"):
        html = staff.get(url).content.decode()
        warning = re.search(r"<div[^>]*data-capture-warning[^>]*>.*?</div>", html, re.S)
        assert warning, url
        words = text(warning.group(0))
        assert words.startswith("Wire capture is on · 1 active capture rule")
        assert "prompts, completions and headers (credentials masked)" in words
        assert "readable by whoever can read that folder" in words
        assert "docs/capture.md" in words
    # Polls do not carry it (nor pay for it).
    poll = staff.get("/dashboard/panels/summary/", headers=HX).content.decode()
    assert "data-capture-warning" not in poll


def test_every_page_warns_while_capture_files_exist(staff: Client, capture_dir: Path) -> None:
    assert "data-capture-warning" not in staff.get("/dashboard/calls/").content.decode()
    stream_request(capture_dir, timezone.now())
    capture_status_forget()
    html = staff.get("/dashboard/calls/").content.decode()
    warning = re.search(r"<div[^>]*data-capture-warning[^>]*>.*?</div>", html, re.S)
    assert warning
    words = text(warning.group(0))
    files = len(list(capture_dir.glob("capture-*.cbor")))
    size = sum(p.stat().st_size for p in capture_dir.glob("capture-*.cbor"))
    assert words.startswith(f"Wire capture files exist · {files} capture file")
    assert f"{size / 1024:.1f} KB" in words
    assert str(capture_dir) in words


def test_the_capture_is_staff_only(client: Client, capture_dir: Path) -> None:
    now = timezone.now()
    stream_request(capture_dir, now)
    stream_records(now)
    url = "/dashboard/calls/r-stream/capture/"
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    client.force_login(User.objects.create_user("someone", password="pw"))
    assert client.get(url)["Location"].startswith("/admin/login/")
    client.force_login(User.objects.create_user("clerk", password="pw", is_staff=True))
    assert client.get(url).status_code == 403
    assert client.get(url, headers=HX).status_code == 403
    # A request that does not exist is a 404, not an empty capture.
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    assert client.get("/dashboard/calls/r-nothing/capture/").status_code == 404
