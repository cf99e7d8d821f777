"""`manage.py capture_export --format har`: a HAR 1.2 file that devtools can import (every
required field, of the right type), bodies kept exactly, no secret, written 0600."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.usage.capture_make import exchange, write_capture

pytestmark = pytest.mark.embedded

KEY_SECRET = "sk-har-test-Zq81xLm4Nv7Pr2Ks9Wd0"
CLIENT_TOKEN = "llmr_hartestclienttoken55554444"
SSE = [
    b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":" w\xc3\xb6rld"}}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
    b"\n\ndata: [DONE]\n\n",
]
NOT_UTF8 = b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary"


def _items(request_id: str = "req-har") -> list[dict[str, Any]]:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "user": KEY_SECRET,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    client = exchange(
        request_id,
        leg="client",
        attempt=0,
        stream=False,
        request={
            "method": "POST",
            "url": "/v1/chat/completions?api-version=2024-06-01",
            "headers": [
                ["content-type", "application/json"],
                ["authorization", f"Bearer {CLIENT_TOKEN}"],
                ["cookie", f"session={CLIENT_TOKEN}"],
            ],
            "body": body,
            "t": 0.5,
        },
        response={
            "status": 200,
            "headers": [["content-type", "application/json"]],
            "t": 120.0,
            "chunks": [[120.0, b'{"id":"x","usage":{"total_tokens":5}}']],
            "end": "complete",
            "t_end": 121.5,
        },
        secrets=[CLIENT_TOKEN, KEY_SECRET],
    )
    upstream = exchange(
        request_id,
        leg="upstream",
        attempt=1,
        stream=True,
        provider="openai",
        key="openai-1",
        request={
            "method": "POST",
            "url": "https://api.example.test/v1/chat/completions",
            "headers": [
                ["content-type", "application/json"],
                ["authorization", f"Bearer {KEY_SECRET}"],
            ],
            "body": body,
            "t": 2.0,
        },
        response={
            "status": 200,
            "headers": [["content-type", "text/event-stream"]],
            "t": 50.0,
            "chunks": [[50.0 + 10 * i, c] for i, c in enumerate(SSE)],
            "end": "complete",
            "t_end": 95.0,
        },
        secrets=[CLIENT_TOKEN, KEY_SECRET],
    )
    binary = exchange(
        request_id,
        leg="upstream",
        attempt=2,
        stream=False,
        provider="openai",
        key="openai-2",
        request={
            "method": "POST",
            "url": "https://api.example.test/v1/files",
            "headers": [["content-type", "application/octet-stream"]],
            "body": NOT_UTF8,
            "t": 96.0,
        },
        response={
            "status": 200,
            "headers": [["content-type", "image/png"]],
            "t": 99.0,
            "chunks": [[99.0, NOT_UTF8]],
            "end": "complete",
            "t_end": 100.0,
        },
    )
    failed = exchange(
        request_id,
        leg="upstream",
        attempt=3,
        stream=False,
        provider="openai",
        key="openai-3",
        request={
            "method": "POST",
            "url": "https://api.example.test/v1/x",
            "headers": [],
            "body": b"{}",
            "t": 101.0,
        },
        response={"status": None, "headers": [], "end": "no_response", "error": "ConnectError"},
    )
    return [upstream, binary, client, failed]  # out of order on purpose


def _export(capture: Path, request_id: str = "req-har", **options: Any) -> dict[str, Any]:
    out = io.StringIO()
    call_command("capture_export", str(capture), request_id=request_id, stderr=out, **options)
    path = Path(options.get("output") or f"{request_id}.har")
    return json.loads(path.read_text(encoding="utf-8"))


ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _check_types(
    obj: dict[str, Any], spec: Mapping[str, type | tuple[type, ...]], where: str
) -> None:
    for name, kind in spec.items():
        assert name in obj, f"{where}.{name} missing"
        value = obj[name]
        assert isinstance(value, kind) and not isinstance(value, bool), (
            f"{where}.{name} is {type(value).__name__}"
        )


def _check_har(har: dict[str, Any]) -> None:
    """The fields HAR 1.2 requires (and devtools' importer reads), with their types."""
    log = har["log"]
    _check_types(log, {"version": str, "creator": dict, "entries": list}, "log")
    assert log["version"] == "1.2"
    _check_types(log["creator"], {"name": str, "version": str}, "creator")
    assert isinstance(log.get("pages", []), list)
    header = {"name": str, "value": str}
    for i, entry in enumerate(log["entries"]):
        where = f"entries[{i}]"
        _check_types(
            entry,
            {
                "startedDateTime": str,
                "time": (int, float),
                "request": dict,
                "response": dict,
                "cache": dict,
                "timings": dict,
            },
            where,
        )
        assert ISO_MS_Z.match(entry["startedDateTime"])
        request, response = entry["request"], entry["response"]
        _check_types(
            request,
            {
                "method": str,
                "url": str,
                "httpVersion": str,
                "cookies": list,
                "headers": list,
                "queryString": list,
                "headersSize": int,
                "bodySize": int,
            },
            f"{where}.request",
        )
        assert request["url"].startswith(("http://", "https://"))
        for h in request["headers"] + request["queryString"] + response["headers"]:
            _check_types(h, header, f"{where} header")
        if "postData" in request:
            _check_types(request["postData"], {"mimeType": str, "text": str}, f"{where}.postData")
        _check_types(
            response,
            {
                "status": int,
                "statusText": str,
                "httpVersion": str,
                "cookies": list,
                "headers": list,
                "content": dict,
                "redirectURL": str,
                "headersSize": int,
                "bodySize": int,
            },
            f"{where}.response",
        )
        _check_types(response["content"], {"size": int, "mimeType": str}, f"{where}.content")
        timings = entry["timings"]
        _check_types(
            timings,
            {"send": (int, float), "wait": (int, float), "receive": (int, float)},
            f"{where}.timings",
        )
        assert all(timings[k] >= 0 for k in ("send", "wait", "receive"))
        applying = sum(v for v in timings.values() if isinstance(v, (int, float)) and v >= 0)
        assert abs(entry["time"] - applying) < 0.01


def test_har_has_every_required_field_with_its_type(tmp_path: Path) -> None:
    capture = write_capture(tmp_path, _items())
    har = _export(capture, output=str(tmp_path / "out.har"))
    _check_har(har)
    entries = har["log"]["entries"]
    assert [(e["_leg"], e["_attempt"]) for e in entries] == [
        ("client", 0),
        ("upstream", 1),
        ("upstream", 2),
        ("upstream", 3),
    ]
    assert har["log"]["creator"]["name"] == "llmrotate"


def test_client_leg_is_absolute_and_json_is_kept(tmp_path: Path) -> None:
    capture = write_capture(tmp_path, _items())
    client = _export(capture, output=str(tmp_path / "out.har"))["log"]["entries"][0]
    assert client["request"]["url"] == (
        "http://llmrotate/v1/chat/completions?api-version=2024-06-01"
    )
    assert client["request"]["queryString"] == [{"name": "api-version", "value": "2024-06-01"}]
    assert json.loads(client["response"]["content"]["text"]) == {
        "id": "x",
        "usage": {"total_tokens": 5},
    }
    assert client["timings"]["wait"] == pytest.approx(119.5)
    assert client["timings"]["receive"] == pytest.approx(1.5)


def test_stream_leg_has_its_chunks_concatenated_and_timed(tmp_path: Path) -> None:
    capture = write_capture(tmp_path, _items())
    stream = _export(capture, output=str(tmp_path / "out.har"))["log"]["entries"][1]
    content = stream["response"]["content"]
    assert content["text"] == b"".join(SSE).decode("utf-8")
    assert "encoding" not in content
    assert content["mimeType"] == "text/event-stream"
    assert stream["_chunks"] == [{"t": 50.0 + 10 * i, "size": len(c)} for i, c in enumerate(SSE)]
    assert stream["_key"] == "openai-1"
    assert stream["timings"]["wait"] == pytest.approx(48.0)
    assert stream["timings"]["receive"] == pytest.approx(45.0)


def test_a_body_that_is_not_utf8_is_kept_exactly(tmp_path: Path) -> None:
    capture = write_capture(tmp_path, _items())
    binary = _export(capture, output=str(tmp_path / "out.har"))["log"]["entries"][2]
    content = binary["response"]["content"]
    assert content["encoding"] == "base64"
    assert base64.b64decode(content["text"]) == NOT_UTF8
    post = binary["request"]["postData"]
    assert isinstance(post["text"], str) and "\ufffd" in post["text"]
    assert base64.b64decode(post["_base64"]) == NOT_UTF8


def test_a_leg_without_response_has_status_0(tmp_path: Path) -> None:
    capture = write_capture(tmp_path, _items())
    failed = _export(capture, output=str(tmp_path / "out.har"))["log"]["entries"][3]
    assert failed["response"]["status"] == 0
    assert failed["_end"] == "no_response"
    assert failed["_error"] == "ConnectError"


def test_no_secret_reaches_the_har(tmp_path: Path) -> None:
    capture = write_capture(tmp_path, _items())
    _export(capture, output=str(tmp_path / "out.har"))
    text = (tmp_path / "out.har").read_text(encoding="utf-8")
    for secret in (KEY_SECRET, CLIENT_TOKEN):
        for i in range(len(secret) - 7):
            assert secret[i : i + 8] not in text, f"8 characters of a secret: {secret[i : i + 8]}"


def test_the_file_is_0600_and_named_after_the_request_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture = write_capture(tmp_path, _items())
    work = tmp_path / "here"
    work.mkdir()
    monkeypatch.chdir(work)
    lax = os.umask(0)  # a file made 0666 & ~umask would show here as 0666
    try:
        _export(capture)
    finally:
        os.umask(lax)
    path = work / "req-har.har"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_existing_file_is_made_0600(tmp_path: Path) -> None:
    capture = write_capture(tmp_path, _items())
    out = tmp_path / "shared.har"
    out.write_text("old")
    out.chmod(0o644)
    _export(capture, output=str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_dash_writes_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capture = write_capture(tmp_path, _items())
    call_command("capture_export", str(capture), request_id="req-har", output="-")
    _check_har(json.loads(capsys.readouterr().out))


def test_an_unknown_request_id_is_a_clear_error(tmp_path: Path) -> None:
    capture = write_capture(tmp_path, _items())
    with pytest.raises(CommandError, match=r"request req-nope is not in .*capture_inspect"):
        call_command("capture_export", str(capture), request_id="req-nope", output="-")
