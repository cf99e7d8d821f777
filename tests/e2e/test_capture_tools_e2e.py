"""The capture tools on captures the gateway itself made: the official SDK through the live
gateway to the fake upstream, then `capture_inspect`, `capture_replay` and `capture_export`
on the files it wrote."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from django.core.management import call_command

from tests.e2e.conftest import ROUTE, LiveGateway, call_records
from tests.e2e.test_capture_e2e import MESSAGES, capture_all, legs

pytestmark = pytest.mark.timeout(60)


def command(*args: Any) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def inspected(folder: Path, request_id: str) -> dict[str, list[str]]:
    """Issue codes per leg ("client", "upstream 1", …) of one request."""
    report = json.loads(
        command(
            "capture_inspect", str(folder), "--detect-issues", "--json", "--request-id", request_id
        )
    )
    return {
        ("client" if e["leg"] == "client" else f"upstream {e['attempt']}"): sorted(
            i["code"] for i in e["issues"]
        )
        for e in report["exchanges"]
    }


def stream_once(live_gateway: LiveGateway) -> str:
    client = live_gateway.openai()
    for _ in client.chat.completions.create(
        model=ROUTE, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ):
        pass
    [record] = call_records(1)
    return record.request_id


def test_a_clean_captured_stream_has_no_issues(live_gateway: LiveGateway, captures: Path):
    capture_all()
    request_id = stream_once(live_gateway)
    legs(captures, request_id, 2)
    assert inspected(captures, request_id) == {"client": [], "upstream 1": []}


def test_an_upstream_stream_without_its_end_is_found_in_the_gateways_capture(
    live_gateway: LiveGateway, captures: Path
):
    capture_all()
    live_gateway.upstream.script({"default": {"fault": "no_done"}})
    request_id = stream_once(live_gateway)
    legs(captures, request_id, 2)
    issues = inspected(captures, request_id)
    assert "no_stream_end" in issues["upstream 1"]


def test_a_replay_through_the_gateway_shows_the_same_usage(
    live_gateway: LiveGateway, captures: Path
):
    capture_all()
    live_gateway.openai().chat.completions.create(model=ROUTE, messages=MESSAGES)
    [record] = call_records(1)
    legs(captures, record.request_id, 2)
    out = command(
        "capture_replay",
        str(captures),  # a folder: every capture file in it, as the README shows
        "--request-id",
        record.request_id,
        "--target",
        live_gateway.base_url,
        "--token",
        live_gateway.token,
        "--json",
    )
    report = json.loads(out)
    assert report["same_status"] and report["replay"]["status"] == 200
    assert report["replay"]["usage"] == report["captured"]["usage"]
    assert report["captured"]["usage"]["completion"] == record.completion_tokens
    assert live_gateway.token not in out


def test_a_failover_exports_to_har_with_every_leg(
    live_gateway: LiveGateway, captures: Path, tmp_path: Path
):
    capture_all()
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "500"}])
    live_gateway.openai().chat.completions.create(model=ROUTE, messages=MESSAGES)
    request_id = call_records(2)[0].request_id
    legs(captures, request_id, 3)
    target = tmp_path / "out.har"
    command(
        "capture_export",
        str(captures),
        "--request-id",
        request_id,
        "--format",
        "har",
        "--output",
        str(target),
    )
    har = json.loads(target.read_text())
    entries = har["log"]["entries"]
    assert [(e["_leg"], e["_attempt"], e["response"]["status"]) for e in entries] == [
        ("client", 0, 200),
        ("upstream", 1, 500),
        ("upstream", 2, 200),
    ]
    assert all(secret not in target.read_text() for secret in live_gateway.secrets.values())


# Each problem the inspector claims to find, made by scripting the fake upstream behind the
# gateway: the upstream leg of the gateway's own capture must show it. (A 200 carrying an error
# fails over inside the gateway, and its leg is still captured as the upstream sent it.)
UPSTREAM_PROBLEMS = [
    ({"fault": "no_usage"}, "no_usage"),
    ({"fault": "bad_sse"}, "malformed_sse"),
    ({"fault": "bad_tool_args"}, "tool_args_invalid"),
    ({"usage_completion_tokens": 400}, "usage_mismatch"),
    ({"token_delay_ms": 60}, "chunk_gap"),
]


@pytest.mark.parametrize(
    ("behaviour", "code"), UPSTREAM_PROBLEMS, ids=[c for _, c in UPSTREAM_PROBLEMS]
)
def test_each_scripted_upstream_problem_is_found_in_the_gateways_capture(
    live_gateway: LiveGateway, captures: Path, behaviour: dict[str, Any], code: str
):
    capture_all()
    live_gateway.upstream.script({"default": behaviour})
    client = live_gateway.openai()
    # A malformed stream may fail in the SDK: the capture is what is checked.
    with contextlib.suppress(openai.APIError, ValueError):
        for _ in client.chat.completions.create(
            model=ROUTE,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        ):
            pass
    [record] = call_records(1)
    legs(captures, record.request_id, 2)
    report = json.loads(
        command(
            "capture_inspect",
            str(captures),
            "--detect-issues",
            "--json",
            "--gap-ms",
            "50",
            "--request-id",
            record.request_id,
        )
    )
    upstream = [e for e in report["exchanges"] if e["leg"] == "upstream"]
    assert code in {i["code"] for e in upstream for i in e["issues"]}, upstream
