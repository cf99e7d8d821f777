"""`manage.py capture_replay`: a captured call sent again reproduces its usage, and a replay
to a real provider needs --to-provider, says which key it uses, and never shows its secret.

The captures are made from real calls to the fake upstream on 127.0.0.1, which also stands in
for the gateway (it speaks the same paths)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from common.redaction import mask_secret
from fake_upstream import FakeUpstream
from keys.models import Provider
from tests.factories import ApiKeyFactory, ProviderFactory
from tests.usage.capture_make import exchange, real_call, write_capture
from usage.capture.format import read_file

pytestmark = [pytest.mark.embedded, pytest.mark.django_db]

CLIENT_TOKEN = "llmr_capturedclienttoken0123456789"
REPLAY_TOKEN = "llmr_replaytoken9876543210abcdef"
MODEL = "gpt-4o-mini"


def _origin(fake: FakeUpstream) -> str:
    return fake.base_url.removesuffix("/v1")


CASES: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "chat-json": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "say three short words"}]},
        {},
    ),
    "chat-stream": (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "count from one to five please"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {},
    ),
    "anthropic-stream": (
        "/v1/messages",
        {
            "model": "claude-3-5-haiku",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello there from the test"}],
            "stream": True,
        },
        {"anthropic-version": "2023-06-01"},
    ),
    "responses-stream": (
        "/v1/responses",
        {"model": MODEL, "input": "four words of input", "stream": True},
        {},
    ),
}


def _capture(fake: FakeUpstream, tmp_path: Path, case: str, request_id: str) -> Path:
    """A capture of one request made for real: the client leg (with the client's token,
    which the writer masks) and the upstream leg, both carrying the real answer."""
    path, body, extra_headers = CASES[case]
    headers = {"content-type": "application/json", **extra_headers}
    if path == "/v1/messages":
        headers["x-api-key"] = CLIENT_TOKEN
    else:
        headers["authorization"] = f"Bearer {CLIENT_TOKEN}"
    request, response = real_call(_origin(fake) + path, body, headers)
    client_request = {**request, "url": path}
    stream = bool(body.get("stream"))
    items = [
        exchange(
            request_id,
            leg="client",
            attempt=0,
            request=client_request,
            response=response,
            stream=stream,
            secrets=[CLIENT_TOKEN],
        ),
        exchange(
            request_id,
            leg="upstream",
            attempt=1,
            request=request,
            response=dict(response),
            stream=stream,
            provider="fake",
            key="fake-1",
            secrets=[CLIENT_TOKEN],
        ),
    ]
    return write_capture(tmp_path, items)


def _body_of(capture: Path) -> bytes:
    return read_file(capture).exchanges[0].response.body


def _replay(*args: str, **options: Any) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("capture_replay", *args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_replay_to_the_gateway_reproduces_the_captured_usage(
    fake: FakeUpstream, tmp_path: Path, case: str
) -> None:
    capture = _capture(fake, tmp_path, case, f"req-{case}")
    before = fake.stats()["total"]

    out, _ = _replay(
        str(capture),
        request_id=f"req-{case}",
        target=fake.base_url,
        token=REPLAY_TOKEN,
        json=True,
    )

    result = json.loads(out)
    captured, replay = result["captured"], result["replay"]
    assert result["leg"] == "client"
    assert fake.stats()["total"] == before + 1  # the replay did reach the server
    assert replay["status"] == captured["status"] == 200
    usage = captured["usage"]
    assert usage["prompt"] > 0 and usage["completion"] > 0
    assert usage["total"] == usage["prompt"] + usage["completion"]
    assert replay["usage"] == captured["usage"]
    assert replay["end"] == "complete"
    if case == "chat-json":  # what the server said, read apart from the meter
        said = json.loads(_body_of(capture))["usage"]
        assert usage == {
            "prompt": said["prompt_tokens"],
            "completion": said["completion_tokens"],
            "total": said["total_tokens"],
        }
    if CASES[case][1].get("stream"):
        assert replay["ttft_ms"] is not None and captured["ttft_ms"] is not None
        assert replay["chunks"] == captured["chunks"] > 1
    # The operator's token went out, never the captured (masked) one.
    assert fake.requests()[-1].key == REPLAY_TOKEN


def test_text_output_is_a_side_by_side_comparison(fake: FakeUpstream, tmp_path: Path) -> None:
    capture = _capture(fake, tmp_path, "chat-stream", "req-text")
    out, _ = _replay(str(capture), request_id="req-text", target=fake.base_url, token=REPLAY_TOKEN)
    lines = out.splitlines()
    assert lines[0].split() == ["captured", "replay"]
    labels = [line.split("  ")[0] for line in lines[1:]]
    for label in (
        "status",
        "duration ms",
        "TTFT ms",
        "chunks",
        "prompt tokens",
        "completion tokens",
        "total tokens",
        "end",
    ):
        assert label in labels
    total = next(line for line in lines if line.startswith("total tokens")).split()
    assert total[-1] == total[-2]


def test_a_different_status_exits_1(fake: FakeUpstream, tmp_path: Path) -> None:
    capture = _capture(fake, tmp_path, "chat-json", "req-500")
    fake.script({"keys": {REPLAY_TOKEN: {"queue": [{"fault": "500"}]}}})
    with pytest.raises(CommandError, match="differs") as info:
        _replay(str(capture), request_id="req-500", target=fake.base_url, token=REPLAY_TOKEN)
    assert info.value.returncode == 1


def test_replay_without_a_token_is_refused(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMROTATE_REPLAY_TOKEN", raising=False)
    capture = _capture(fake, tmp_path, "chat-json", "req-notoken")
    before = fake.stats()["total"]
    with pytest.raises(CommandError, match="--token"):
        _replay(str(capture), request_id="req-notoken", target=fake.base_url)
    assert fake.stats()["total"] == before


def test_unknown_request_id_is_a_clear_error(fake: FakeUpstream, tmp_path: Path) -> None:
    capture = _capture(fake, tmp_path, "chat-json", "req-known")
    with pytest.raises(CommandError, match="req-unknown is not in"):
        _replay(str(capture), request_id="req-unknown", target=fake.base_url, token="t")


@pytest.mark.parametrize("target", ["{base}", "{origin}", "{base}/chat/completions"])
def test_a_provider_target_is_refused_without_to_provider_before_any_traffic(
    fake: FakeUpstream, tmp_path: Path, target: str
) -> None:
    ProviderFactory(name="fake", base_url=fake.base_url)
    capture = _capture(fake, tmp_path, "chat-json", "req-provider")
    before = fake.stats()["total"]
    url = target.format(base=fake.base_url, origin=_origin(fake))
    with pytest.raises(CommandError, match="--to-provider") as info:
        _replay(str(capture), request_id="req-provider", target=url, token=REPLAY_TOKEN)
    assert "provider fake" in str(info.value)
    assert fake.stats()["total"] == before


def test_a_remote_target_is_refused_without_to_provider(fake: FakeUpstream, tmp_path: Path) -> None:
    capture = _capture(fake, tmp_path, "chat-json", "req-remote")
    with pytest.raises(CommandError, match=r"not on this machine.*--to-provider"):
        _replay(
            str(capture),
            request_id="req-remote",
            target="https://llm.example.test/v1",
            token=REPLAY_TOKEN,
        )


@pytest.mark.parametrize("case", ["chat-json", "chat-stream", "anthropic-stream"])
def test_to_provider_uses_the_named_key_and_prints_it_masked(
    fake: FakeUpstream, tmp_path: Path, case: str
) -> None:
    kind = Provider.Kind.ANTHROPIC if case.startswith("anthropic") else Provider.Kind.OPENAI
    provider = ProviderFactory(name="fake", base_url=fake.base_url, kind=kind)
    ApiKeyFactory(key_id="fake-0", provider=provider, priority=0)  # the default; not asked for
    key = ApiKeyFactory(key_id="fake-2", provider=provider, priority=5)
    capture = _capture(fake, tmp_path, case, "req-to-provider")

    out, err = _replay(
        str(capture), request_id="req-to-provider", to_provider=True, key="fake-2", json=True
    )

    assert f"fake-2 ({mask_secret(key.raw_secret)})" in err
    assert key.raw_secret not in out + err
    assert fake.requests()[-1].key == key.raw_secret
    result = json.loads(out)
    assert result["leg"] == "upstream" and result["attempt"] == 1
    assert result["replay"]["usage"] == result["captured"]["usage"]
    assert result["replay"]["usage"]["total"]


def test_to_provider_defaults_to_the_providers_first_enabled_key(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    provider = ProviderFactory(name="fake", base_url=fake.base_url)
    ApiKeyFactory(key_id="fake-off", provider=provider, priority=0, enabled=False)
    first = ApiKeyFactory(key_id="fake-first", provider=provider, priority=1)
    ApiKeyFactory(key_id="fake-later", provider=provider, priority=2)
    capture = _capture(fake, tmp_path, "chat-json", "req-default-key")

    out, err = _replay(str(capture), request_id="req-default-key", to_provider=True)

    assert "fake-first" in err
    assert fake.requests()[-1].key == first.raw_secret
    assert first.raw_secret not in out + err


def test_to_provider_refuses_an_attempt_that_was_not_captured(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    provider = ProviderFactory(name="fake", base_url=fake.base_url)
    ApiKeyFactory(provider=provider)
    capture = _capture(fake, tmp_path, "chat-json", "req-attempt")
    before = fake.stats()["total"]
    with pytest.raises(CommandError, match=r"no attempt 4 in the capture \(attempts: 1\)"):
        _replay(str(capture), request_id="req-attempt", to_provider=True, attempt=4)
    assert fake.stats()["total"] == before


def test_target_and_token_come_from_the_environment(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMROTATE_REPLAY_TARGET", _origin(fake))
    monkeypatch.setenv("LLMROTATE_REPLAY_TOKEN", REPLAY_TOKEN)
    capture = _capture(fake, tmp_path, "chat-json", "req-env")
    out, _ = _replay(str(capture), request_id="req-env", json=True)
    assert json.loads(out)["replay"]["status"] == 200
    assert fake.requests()[-1].key == REPLAY_TOKEN


def test_a_pool_key_is_not_sent_to_a_url_outside_its_provider(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    # The capture file names the fake's URL; the key belongs to another provider. A file can
    # be edited, so the key only goes where the operator says (--target).
    other = ProviderFactory(name="elsewhere", base_url="http://127.0.0.1:9/v1")
    key = ApiKeyFactory(key_id="other-1", provider=other)
    capture = _capture(fake, tmp_path, "chat-json", "req-foreign")
    before = fake.stats()["total"]
    with pytest.raises(CommandError, match="not under the base URL of other-1's provider"):
        _replay(str(capture), request_id="req-foreign", to_provider=True, key="other-1")
    assert fake.stats()["total"] == before
    assert all(r.key != key.raw_secret for r in fake.requests())
