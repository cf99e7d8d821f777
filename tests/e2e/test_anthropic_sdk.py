"""The official anthropic SDK through the running gateway to the fake upstream's Messages API,
all over loopback: the same rotation, failover, recording and secrecy as the OpenAI path."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import pytest

from keys.state_store import get_key_state_store
from tests.e2e.conftest import ROUTE, LiveGateway, RawCapture, call_records

pytestmark = pytest.mark.timeout(60)

CLAUDE = "claude-haiku"  # the route
UPSTREAM_MODEL = "claude-3-5-haiku-latest"
SECRETS = {
    "claude-a": "sk-ant-e2e-alpha-9Xc3vN7qLm2Pw5Rt3333",
    "claude-b": "sk-ant-e2e-bravo-2Kf8uJ4hGd6Sb1Yo4444",
}
PROMPT = [{"role": "user", "content": "Say hi"}]
# The fake upstream's deterministic answer to PROMPT (one word per token, 16 by default).
REPLY = "This is a fake reply to: Say hi lorem ipsum dolor sit amet consectetur adipiscing elit"
INPUT_TOKENS, OUTPUT_TOKENS = 2, 16


def anthropic_config(base_url: str, *, first: str | None = None) -> dict[str, Any]:
    return {
        "providers": {"fake-anthropic": {"kind": "anthropic", "base_url": base_url}},
        "keys": [
            {
                "id": key_id,
                "provider": "fake-anthropic",
                "secret": f"literal://{secret}",
                "priority": 0 if first in (None, key_id) else 1,
            }
            for key_id, secret in SECRETS.items()
        ],
        "routes": {
            CLAUDE: {
                "strategy": "health_aware" if first else "round_robin",
                "deployments": [{"provider": "fake-anthropic", "model": UPSTREAM_MODEL}],
            }
        },
    }


@dataclass
class Claude:
    """The live gateway with an Anthropic provider on the same fake server, next to the
    OpenAI one."""

    live: LiveGateway
    _clients: list[anthropic.Anthropic] = field(default_factory=list)

    def client(self, **options: Any) -> anthropic.Anthropic:
        options.setdefault("api_key", self.live.token)
        client = anthropic.Anthropic(
            base_url=self.live.base_url, max_retries=0, timeout=20, **options
        )
        self._clients.append(client)
        return client

    def prefer(self, key_id: str) -> None:
        from keys.config_io import config_import

        config_import(data=anthropic_config(self.live.upstream.base_url, first=key_id))

    def script(self, **per_key: list[dict[str, Any]] | dict[str, Any]) -> None:
        keys = {
            SECRETS[name.replace("_", "-")]: spec if isinstance(spec, dict) else {"queue": spec}
            for name, spec in per_key.items()
        }
        self.live.upstream.script({"keys": keys})

    def requests_per_key(self) -> dict[str, int]:
        counts = self.live.upstream.stats()["requests"]
        return {key_id: counts.get(secret, 0) for key_id, secret in SECRETS.items()}


def create(client: anthropic.Anthropic, model: str = CLAUDE) -> Any:
    return client.messages.create(model=model, max_tokens=64, messages=PROMPT)


def stream_into(client: anthropic.Anthropic, received: list[str]) -> Any:
    """Stream PROMPT, appending each text delta to `received` as it comes; the final message."""
    with client.messages.stream(model=CLAUDE, max_tokens=64, messages=PROMPT) as stream:
        for text in stream.text_stream:
            received.append(text)
        return stream.get_final_message()


# --- the happy path -----------------------------------------------------------------------------


def test_a_message_comes_back_through_the_gateway(claude: Claude):
    raw = claude.client().messages.with_raw_response.create(
        model=CLAUDE, max_tokens=64, messages=PROMPT
    )
    message = raw.parse()
    assert message.content[0].type == "text" and message.content[0].text == REPLY
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        INPUT_TOKENS,
        OUTPUT_TOKENS,
    )
    [record] = call_records(1)
    assert record.request_id == raw.headers["x-llmrotate-request-id"]
    assert (record.outcome, record.status_code, record.stream) == ("success", 200, False)
    assert (record.prompt_tokens, record.completion_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert (record.provider, record.upstream_model, record.usage_source) == (
        "fake-anthropic",
        UPSTREAM_MODEL,
        "reported",
    )
    assert record.cost_usd is not None and record.cost_usd > 0
    # The fake upstream got the upstream model, and the key in x-api-key.
    assert claude.live.upstream.stats()["last_request_bodies"][-1]["model"] == UPSTREAM_MODEL
    assert sum(claude.requests_per_key().values()) == 1


def test_a_stream_arrives_text_by_text_with_its_final_message(claude: Claude):
    with claude.client().messages.stream(model=CLAUDE, max_tokens=64, messages=PROMPT) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == REPLY
    assert len(pieces) == OUTPUT_TOKENS, "text deltas were merged instead of passed through"
    assert final.content[0].text == REPLY  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
    [record] = call_records(1)
    assert (record.outcome, record.stream, record.usage_source) == ("success", True, "reported")
    assert (record.prompt_tokens, record.completion_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert record.ttft_ms is not None and 0 < record.ttft_ms <= record.ttlt_ms


def test_a_bearer_token_works_too(claude: Claude):
    client = claude.client(api_key=None, auth_token=claude.live.token)
    assert create(client).content[0].text == REPLY


def test_calls_rotate_over_both_keys(claude: Claude):
    client = claude.client()
    for _ in range(4):
        create(client)
    assert claude.requests_per_key() == {"claude-a": 2, "claude-b": 2}


def test_models_list_shows_the_routes_in_anthropics_shape(claude: Claude):
    models = list(claude.client().models.list())
    # ROUTE has only an OpenAI-format deployment: /v1/messages answers it through chat
    # completions, so it is listed too.
    assert [m.id for m in models] == [CLAUDE, ROUTE]
    assert all(m.type == "model" and m.display_name == m.id for m in models)
    assert claude.live.upstream.stats()["total"] == 0


def test_count_tokens_is_passed_through_and_not_recorded(claude: Claude):
    from usage.models import CallRecord
    from usage.recorder import get_recorder

    counted = claude.client().messages.count_tokens(model=CLAUDE, messages=PROMPT)
    assert counted.input_tokens == INPUT_TOKENS
    assert sum(claude.requests_per_key().values()) == 1
    assert get_recorder().flush(timeout=10)
    assert CallRecord.objects.count() == 0


# --- failover and errors ------------------------------------------------------------------------


def test_a_429_cools_the_key_and_the_other_one_answers(claude: Claude):
    claude.prefer("claude-a")
    claude.script(claude_a=[{"fault": "429", "retry_after": 20}])
    raw = claude.client().messages.with_raw_response.create(
        model=CLAUDE, max_tokens=64, messages=PROMPT
    )
    assert raw.parse().content[0].text == REPLY
    assert (raw.headers["x-llmrotate-attempts"], raw.headers["x-llmrotate-key"]) == (
        "2",
        "claude-b",
    )
    assert [(r.key_id, r.outcome, r.status_code) for r in call_records(2)] == [
        ("claude-a", "rate_limited", 429),
        ("claude-b", "success", 200),
    ]
    state, _ = get_key_state_store().get_many(["claude-a"], now=time.time())["claude-a"]
    assert state.status == "cooldown" and state.cooldown_until >= time.time() + 18


def test_an_overloaded_key_fails_over_and_an_empty_balance_exhausts_it(claude: Claude):
    claude.prefer("claude-a")
    claude.script(claude_a=[{"fault": "529"}, {"fault": "quota"}])
    client = claude.client()
    create(client)
    create(client)
    assert [(r.key_id, r.outcome) for r in call_records(4)] == [
        ("claude-a", "upstream_error"),
        ("claude-b", "success"),
        ("claude-a", "quota_exhausted"),
        ("claude-b", "success"),
    ]
    state, _ = get_key_state_store().get_many(["claude-a"], now=time.time())["claude-a"]
    assert state.status == "exhausted"


def test_a_stream_cut_midway_raises_in_the_sdk_and_is_not_replayed(claude: Claude):
    cut = [{"fault": "cut", "cut_after": 6}]  # message_start, block start, ping, three words
    claude.script(claude_a=cut, claude_b=cut)
    received: list[str] = []
    with pytest.raises(anthropic.APIError) as caught:
        stream_into(claude.client(), received)
    assert "stream_interrupted" in str(caught.value.body)
    partial = "".join(received)
    assert partial and REPLY.startswith(partial) and partial != REPLY
    assert claude.live.upstream.stats()["total"] == 1
    [record] = call_records(1)
    assert (record.outcome, record.stream) == ("stream_error", True)
    assert record.prompt_tokens == INPUT_TOKENS  # reported at the start of the stream


def test_gateway_errors_are_what_the_sdk_expects(claude: Claude):
    with pytest.raises(anthropic.AuthenticationError) as auth:
        create(claude.client(api_key=claude.live.token + "x"))
    assert auth.value.body["type"] == "error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        # An OpenAI-format route, and a feature chat completions cannot express.
        claude.client().messages.create(
            model=ROUTE, max_tokens=64, messages=PROMPT, extra_body={"top_k": 5}
        )
    assert bad.value.body["error"]["code"] == "untranslatable_feature"  # type: ignore[index]
    assert "top_k" in bad.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        create(claude.client(), model="nope")
    assert claude.live.upstream.stats()["total"] == 0


def test_no_secret_reaches_a_response_or_any_log(
    claude: Claude, usage_log: Callable[[], list[dict[str, Any]]], raw_log: RawCapture, caplog
):
    caplog.set_level(logging.DEBUG)
    claude.prefer("claude-a")
    claude.script(claude_a=[{"fault": "401"}], claude_b=[{"fault": "500"}])
    client = claude.client()
    texts: list[str] = []

    def fails(status: int, call: Callable[[], Any]) -> None:
        with pytest.raises(anthropic.APIStatusError) as caught:
            call()
        assert caught.value.status_code == status
        texts.append(caught.value.response.text)

    fails(502, lambda: create(client))  # 401 on claude-a (quarantined), 500 on claude-b
    raw = client.messages.with_raw_response.create(model=CLAUDE, max_tokens=64, messages=PROMPT)
    texts.append(raw.http_response.text)
    texts.append(json.dumps(dict(raw.headers)))
    claude.script(claude_b=[{"fault": "cut", "cut_after": 4}])
    with pytest.raises(anthropic.APIError):
        stream_into(client, texts)
    fails(401, lambda: create(claude.client(api_key="llmr_" + "0" * 40)))
    # Four attempts, and the refused request (401): a record of its own, attempt 0.
    assert len(call_records(5)) == 5
    lines = usage_log()
    assert len(lines) == 5
    assert raw_log.lines, "nothing was logged: the capture is not working"
    text = "\n".join([*texts, caplog.text, *raw_log.lines, *map(json.dumps, lines)])
    for secret in [*SECRETS.values(), claude.live.token]:
        assert secret not in text
