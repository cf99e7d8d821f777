"""Wire capture end to end: the official SDKs through the live gateway to the fake upstream,
with capture rules, and the capture files read back (usage.capture.format)."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from django.utils import timezone

from keys.models import CaptureRule, Route
from keys.routing import invalidate_routing_cache
from tests.e2e.conftest import KEY_SECRETS, ROUTE, LiveGateway, call_records, wait_for
from tests.e2e.test_anthropic_sdk import CLAUDE, SECRETS, Claude
from usage.capture.format import Exchange, capture_files, find_request, read_exchanges

pytestmark = pytest.mark.timeout(60)

MESSAGES = [{"role": "user", "content": "Say hi"}]


def capture_all(**fields: Any) -> CaptureRule:
    rule = CaptureRule.objects.create(**fields)
    invalidate_routing_cache()
    return rule


def legs(folder: Path, request_id: str, count: int) -> list[Exchange]:
    """The request's captured legs, once `count` of them are on disk."""
    return wait_for(
        lambda: (
            (found := find_request(request_id, directory=folder, when=None))
            and len(found) >= count
            and found
        ),
        message=f"{count} captured legs of {request_id}",
    )


def request_id_of(response: Any) -> str:
    return response.headers["x-llmrotate-request-id"]


def test_a_json_call_is_captured_on_both_legs(live_gateway: LiveGateway, captures: Path):
    capture_all()
    client = live_gateway.openai()
    raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
    completion = raw.parse()
    client_leg, upstream = legs(captures, request_id_of(raw), 2)
    assert (client_leg.leg, client_leg.attempt, upstream.leg, upstream.attempt) == (
        "client",
        0,
        "upstream",
        1,
    )
    assert client_leg.request.raw["method"] == "POST"
    assert client_leg.request.raw["url"] == "/v1/chat/completions"
    assert json.loads(client_leg.request.body)["messages"] == MESSAGES
    assert client_leg.response.status == 200
    assert json.loads(client_leg.response.body)["choices"][0]["message"]["content"] == (
        completion.choices[0].message.content
    )
    # What went upstream: the deployment's URL and the forwarded body, and its answer.
    assert upstream.request.raw["url"] == live_gateway.upstream.base_url + "/chat/completions"
    assert json.loads(upstream.request.body)["model"] == ROUTE
    assert json.loads(upstream.response.body)["usage"]["completion_tokens"] == (
        completion.usage.completion_tokens
    )
    assert upstream.get("key") in KEY_SECRETS and upstream.end == "complete"
    assert upstream.response.chunks[0][0] >= upstream.request.raw["t"]
    [record] = call_records(1)
    assert record.captured and record.request_id == request_id_of(raw)


def test_a_stream_is_captured_chunk_by_chunk_with_arrival_times(
    live_gateway: LiveGateway, captures: Path
):
    capture_all()
    live_gateway.upstream.script({"default": {"token_delay_ms": 20}})
    client = live_gateway.openai()
    raw = client.chat.completions.with_raw_response.create(
        model=ROUTE, messages=MESSAGES, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    client_leg, upstream = legs(captures, request_id_of(raw), 2)
    for leg in (client_leg, upstream):
        times = [t for t, _ in leg.response.chunks]
        assert len(times) > 10 and times == sorted(times)
        assert leg.end == "complete" and leg.stream
    upstream_times = [t for t, _ in upstream.response.chunks]
    # The fake upstream spaces its chunks by 20 ms: the capture keeps the gaps it saw.
    assert upstream_times[-1] - upstream_times[0] >= 200
    assert b"data: [DONE]" in upstream.response.body
    assert text.split()[0].encode() in client_leg.response.body


def test_a_failover_captures_both_attempts_under_one_request_id(
    live_gateway: LiveGateway, captures: Path
):
    capture_all()
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "429", "retry_after": 5}])
    raw = live_gateway.openai().chat.completions.with_raw_response.create(
        model=ROUTE, messages=MESSAGES
    )
    client_leg, first, second = legs(captures, request_id_of(raw), 3)
    assert [(e.leg, e.attempt, e.get("key")) for e in (client_leg, first, second)] == [
        ("client", 0, None),
        ("upstream", 1, "key-a"),
        ("upstream", 2, "key-b"),
    ]
    assert (first.response.status, first.response.header("retry-after")) == (429, "5")
    assert second.response.status == 200 and client_leg.response.status == 200
    records = call_records(2)
    assert all(r.captured for r in records)


def test_a_stream_cut_midway_is_captured_as_cut(live_gateway: LiveGateway, captures: Path):
    capture_all()
    cut = [{"fault": "cut", "cut_after": 3}]
    live_gateway.script(key_a=cut, key_b=cut)
    client = live_gateway.openai()
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model=ROUTE, messages=MESSAGES, stream=True):
            pass
    [record] = call_records(1)
    client_leg, upstream = legs(captures, record.request_id, 2)
    assert upstream.end in ("cut", "upstream_reset")
    assert upstream.response.raw["error"]
    # The client got the gateway's error event, and the capture shows it as sent.
    assert b"stream_interrupted" in client_leg.response.body or (
        b"stream_truncated" in client_leg.response.body
    )


def test_a_client_that_leaves_mid_stream_is_captured_as_disconnected(
    live_gateway: LiveGateway, captures: Path
):
    capture_all()
    live_gateway.script(key_a=[{"token_delay_ms": 300}], key_b=[{"token_delay_ms": 300}])
    stream = live_gateway.openai().chat.completions.create(
        model=ROUTE, messages=MESSAGES, stream=True
    )
    next(iter(stream))
    stream.close()
    [record] = call_records(1)
    client_leg, upstream = legs(captures, record.request_id, 2)
    assert client_leg.end == "client_disconnected"
    assert upstream.end == "client_disconnected"


def test_an_anthropic_stream_is_captured(claude: Claude, captures: Path):
    capture_all()
    client = claude.client()
    with client.messages.stream(model=CLAUDE, max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    [record] = call_records(1)
    client_leg, upstream = legs(captures, record.request_id, 2)
    assert client_leg.request.raw["url"] == "/v1/messages"
    assert b"event: message_stop" in upstream.response.body
    assert client_leg.get("api") == "anthropic" and final.usage.output_tokens > 0
    assert upstream.request.header("x-api-key") not in SECRETS.values()


def test_nothing_is_captured_without_a_rule(live_gateway: LiveGateway, captures: Path):
    live_gateway.openai().chat.completions.create(model=ROUTE, messages=MESSAGES)
    [record] = call_records(1)
    assert not record.captured
    assert not captures.exists() or capture_files(captures) == []


def test_a_rule_for_one_client_captures_only_that_client(live_gateway: LiveGateway, captures: Path):
    from keys.services import client_token_create

    other, other_token = client_token_create(name="other", routes=["*"], scopes=["proxy"])
    capture_all(client=other, route=Route.objects.get(name=ROUTE))
    live_gateway.openai().chat.completions.create(model=ROUTE, messages=MESSAGES)
    live_gateway.openai(other_token).chat.completions.create(model=ROUTE, messages=MESSAGES)
    records = call_records(2)
    captured = {r.client: r.captured for r in records}
    assert captured == {"e2e": False, "other": True}
    [request_id] = [r.request_id for r in records if r.client == "other"]
    assert {e.get("client") for e in legs(captures, request_id, 2)} == {"other"}


def test_an_expired_rule_captures_nothing(live_gateway: LiveGateway, captures: Path):
    capture_all(until=timezone.now() - timedelta(seconds=1))
    live_gateway.openai().chat.completions.create(model=ROUTE, messages=MESSAGES)
    [record] = call_records(1)
    assert not record.captured


def test_a_sample_rate_captures_a_share(live_gateway: LiveGateway, captures: Path):
    capture_all(sample_rate=0.5)
    client = live_gateway.openai()
    for _ in range(40):
        client.chat.completions.create(model=ROUTE, messages=MESSAGES)
    captured = sum(r.captured for r in call_records(40))
    # Binomial(40, 0.5): outside 8..32 once in about 10^5 runs.
    assert 8 <= captured <= 32


def _runs(secret: str, size: int = 8) -> set[bytes]:
    return {secret[i : i + size].encode() for i in range(len(secret) - size + 1)}


def test_no_seeded_secret_reaches_a_capture_file(
    live_gateway: LiveGateway, claude: Claude, captures: Path
):
    capture_all()
    live_gateway.prefer("key-a")
    live_gateway.script(key_a=[{"fault": "401"}])  # a failover: both keys go upstream
    # The client's token also travels in a body and a custom header, where only the
    # capture's scrubbing can catch it.
    client = live_gateway.openai()
    client.chat.completions.create(
        model=ROUTE,
        messages=[{"role": "user", "content": f"my token is {live_gateway.token}"}],
        extra_headers={"x-debug-auth": live_gateway.token, "cookie": "session=s3cr3t-cookie-val"},
    )
    with claude.client().messages.stream(model=CLAUDE, max_tokens=64, messages=MESSAGES) as stream:
        stream.get_final_message()
    call_records(3)  # two attempts, then the Anthropic stream
    wait_for(lambda: sum(1 for _ in read_exchanges(capture_files(captures))) >= 5)
    data = b"".join(p.read_bytes() for p in capture_files(captures))
    secrets = [*KEY_SECRETS.values(), *SECRETS.values(), live_gateway.token, "s3cr3t-cookie-val"]
    leaked = [s for s in secrets if any(run in data for run in _runs(s))]
    assert leaked == []
    assert b"my token is " in data  # the prompt itself is captured: capture is text


def test_capture_files_are_private(live_gateway: LiveGateway, captures: Path):
    capture_all()
    live_gateway.openai().chat.completions.create(model=ROUTE, messages=MESSAGES)
    [path] = wait_for(lambda: capture_files(captures))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(captures).st_mode) == 0o700


def test_a_read_only_capture_folder_stops_capturing_and_proxying_goes_on(
    live_gateway: LiveGateway, captures: Path, caplog: pytest.LogCaptureFixture
):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    captures.mkdir(mode=0o500)
    capture_all()
    client = live_gateway.openai()
    for _ in range(3):
        assert client.chat.completions.create(model=ROUTE, messages=MESSAGES).choices
    wait_for(lambda: "wire capture paused" in caplog.text, message="the logged capture error")
    assert capture_files(captures) == []
    assert len(call_records(3)) == 3


def test_an_unwritable_capture_path_is_logged_and_proxying_goes_on(
    live_gateway: LiveGateway, settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # A file where the folder should be: mkdir fails for root too.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    settings.LLMROTATE_CAPTURE_DIR = blocker / "captures"
    capture_all()
    client = live_gateway.openai()
    for _ in range(3):
        assert client.chat.completions.create(model=ROUTE, messages=MESSAGES).choices
    wait_for(lambda: "wire capture paused" in caplog.text, message="the logged capture error")
    assert len(call_records(3)) == 3


def test_capture_can_be_forbidden_by_the_operator(
    live_gateway: LiveGateway, captures: Path, settings: Any
):
    settings.LLMROTATE_CAPTURE_ALLOWED = False
    capture_all()
    live_gateway.openai().chat.completions.create(model=ROUTE, messages=MESSAGES)
    [record] = call_records(1)
    assert not record.captured
    # The decision is taken before the call: had it been captured, the record would say so.
    assert capture_files(captures) == []
