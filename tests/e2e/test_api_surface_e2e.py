"""The rest of the API through the running gateway, with the official SDKs, to real fake
upstreams on 127.0.0.1: embeddings, the Responses API, legacy completions, one model, a
pass-through route in front of a keyless local server, and failover across dialects in both
directions (the first deployment answers 429, the next speaks the other API)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import pytest

from fake_upstream import FakeUpstream
from fake_upstream.wire import embedding_vector
from tests.conftest import free_port
from tests.e2e.conftest import KEY_SECRETS, ROUTE, GatewayThread, RawCapture, call_records

pytestmark = pytest.mark.timeout(60)

PROMPT = [{"role": "user", "content": "Say hi"}]
REPLY = "This is a fake reply to: Say hi lorem ipsum dolor sit amet consectetur adipiscing elit"
ANTHROPIC_SECRETS = {
    "claude-a": "sk-ant-e2e-alpha-9Xc3vN7qLm2Pw5Rt3333",
    "claude-b": "sk-ant-e2e-bravo-2Kf8uJ4hGd6Sb1Yo4444",
}
EMBED = "text-embedding-3-small"
TO_CLAUDE = "mixed-openai-first"  # an OpenAI deployment, then an Anthropic one
TO_OPENAI = "mixed-anthropic-first"  # the reverse
CLAUDE_ONLY = "claude-only"
UPSTREAM_CLAUDE = "claude-3-5-haiku-latest"
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}


def surface_config(base_url: str, local_url: str) -> dict[str, Any]:
    openai_dep = {"provider": "fake", "model": ROUTE}
    claude_dep = {"provider": "fake-anthropic", "model": UPSTREAM_CLAUDE}
    return {
        "providers": {
            "fake": {"kind": "openai", "base_url": base_url},
            "fake-anthropic": {"kind": "anthropic", "base_url": base_url},
            "local": {"kind": "openai_compatible", "base_url": local_url, "requires_key": False},
        },
        "keys": [
            *(
                {"id": key_id, "provider": "fake", "secret": f"literal://{secret}"}
                for key_id, secret in KEY_SECRETS.items()
            ),
            *(
                {"id": key_id, "provider": "fake-anthropic", "secret": f"literal://{secret}"}
                for key_id, secret in ANTHROPIC_SECRETS.items()
            ),
        ],
        "routes": {
            ROUTE: {"deployments": [openai_dep]},
            EMBED: {"deployments": [{"provider": "fake", "model": EMBED}]},
            TO_CLAUDE: {"strategy": "health_aware", "deployments": [openai_dep, claude_dep]},
            TO_OPENAI: {"strategy": "health_aware", "deployments": [claude_dep, openai_dep]},
            CLAUDE_ONLY: {"deployments": [claude_dep]},
            "ollama/*": {"deployments": [{"provider": "local", "model": "*"}]},
        },
        "clients": [{"name": "e2e", "routes": ["*"], "scopes": ["proxy"]}],
    }


@dataclass
class Surface:
    base_url: str
    token: str
    upstream: FakeUpstream
    local: FakeUpstream
    _clients: list[Any] = field(default_factory=list)

    def openai(self) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.token, max_retries=0, timeout=20
        )
        self._clients.append(client)
        return client

    def anthropic(self) -> anthropic.Anthropic:
        client = anthropic.Anthropic(
            base_url=self.base_url, api_key=self.token, max_retries=0, timeout=20
        )
        self._clients.append(client)
        return client

    def fail_first(self, secrets: list[str], fault: str = "429") -> None:
        """Every key of the first deployment answers `fault` once."""
        self.upstream.script(
            {"keys": {s: {"queue": [{"fault": fault, "retry_after": 20}]} for s in secrets}}
        )


@pytest.fixture(scope="module")
def _local_server() -> Iterator[FakeUpstream]:
    # A local model server (Ollama, vLLM): it takes no key.
    local = FakeUpstream(require_key=False, models=["llama3.2:1b", "qwen2.5:0.5b"])
    local.start_in_thread("127.0.0.1")
    yield local
    local.stop()


@pytest.fixture
def surface(
    transactional_db: None, fake_upstream: FakeUpstream, _local_server: FakeUpstream
) -> Iterator[Surface]:
    from keys.config_io import config_import
    from usage.recorder import get_recorder

    _local_server.reset()
    report = config_import(data=surface_config(fake_upstream.base_url, _local_server.base_url))
    server = GatewayThread(free_port())
    server.start()
    helper = Surface(
        base_url=f"http://127.0.0.1:{server.port}",
        token=report.generated_tokens["e2e"],
        upstream=fake_upstream,
        local=_local_server,
    )
    try:
        yield helper
    finally:
        for client in helper._clients:
            client.close()
        server.stop()
        assert get_recorder().stop(timeout=10), "call records were not written in time"


def paths(fake: FakeUpstream) -> list[str]:
    return [r.path for r in fake.requests()]


# --- embeddings ---------------------------------------------------------------------------------


def test_embeddings_batched_in_floats_and_base64(surface: Surface):
    client = surface.openai()
    # The SDK asks for base64 by default and decodes it: the gateway passes encoding_format on.
    default = client.embeddings.create(model=EMBED, input=["first text", "second text"])
    floats = client.embeddings.create(model=EMBED, input="first text", encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert floats.data[0].embedding == pytest.approx(embedding_vector("first text", 8), abs=1e-6)
    sent = [r.body for r in surface.upstream.requests() if r.path == "/v1/embeddings"]
    assert [b["encoding_format"] for b in sent if b] == ["base64", "float"]
    records = call_records(2)
    assert {r.operation for r in records} == {"embeddings"}
    assert all(r.prompt_tokens > 0 and r.completion_tokens == 0 for r in records)
    assert all(r.cost_usd is not None and r.cost_usd > 0 for r in records)


def test_embeddings_bad_input_is_a_400_and_unknown_fields_pass(surface: Surface):
    client = surface.openai()
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model=EMBED, input=42)  # type: ignore[arg-type]
    assert bad.value.body["code"] == "invalid_type"  # type: ignore[index]
    assert bad.value.body["param"] == "input"  # type: ignore[index]
    client.embeddings.create(
        model=EMBED, input="x", encoding_format="float", extra_body={"x_vendor_option": 7}
    )
    [sent] = [r.body for r in surface.upstream.requests() if r.path == "/v1/embeddings"]
    assert sent is not None and sent["x_vendor_option"] == 7


# --- the Responses API --------------------------------------------------------------------------


def test_a_response_as_json(surface: Surface):
    response = surface.openai().responses.create(model=ROUTE, input="Say hi")
    assert response.output_text == REPLY
    assert response.usage is not None and response.usage.output_tokens == 16
    [record] = call_records(1)
    assert (record.operation, record.outcome) == ("responses", "success")
    assert (record.prompt_tokens, record.completion_tokens) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
    )
    assert paths(surface.upstream) == ["/v1/responses"]


def test_a_response_streamed_event_by_event(surface: Surface):
    events = list(surface.openai().responses.create(model=ROUTE, input="Say hi", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == REPLY
    [record] = call_records(1)
    assert (record.operation, record.stream, record.outcome) == ("responses", True, "success")
    assert record.ttft_ms is not None and record.ttft_ms <= record.latency_ms
    assert record.completion_tokens == 16 and record.usage_source == "reported"


def test_stateful_responses_are_refused_by_name(surface: Surface):
    client = surface.openai()
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=ROUTE, input="again", previous_response_id="resp_1")
    assert bad.value.body["code"] == "stateful_response_not_supported"  # type: ignore[index]
    assert bad.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_1")
    assert surface.upstream.requests() == []


# --- legacy completions and models ---------------------------------------------------------------


def test_legacy_completions_json_and_stream(surface: Surface):
    client = surface.openai()
    whole = client.completions.create(model=ROUTE, prompt="Say hi")
    assert whole.choices[0].text == REPLY
    chunks = list(client.completions.create(model=ROUTE, prompt="Say hi", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    # The gateway asked for usage and removed it again: the client did not.
    assert all(c.usage is None for c in chunks)
    records = call_records(2)
    assert {r.operation for r in records} == {"text_completion"}
    streamed = next(r for r in records if r.stream)
    assert streamed.usage_source == "reported" and streamed.ttft_ms is not None


def test_models_list_pattern_routes_and_retrieve_one(surface: Surface):
    client = surface.openai()
    ids = [m.id for m in client.models.list()]
    assert {ROUTE, EMBED, TO_CLAUDE, TO_OPENAI, CLAUDE_ONLY} <= set(ids)
    # The keyless local server's own list, under the names clients send for it.
    assert {"ollama/llama3.2:1b", "ollama/qwen2.5:0.5b"} <= set(ids)
    assert client.models.retrieve(ROUTE).id == ROUTE
    assert client.models.retrieve("ollama/anything").id == "ollama/anything"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# --- pass-through --------------------------------------------------------------------------------


def test_a_model_never_configured_passes_through_to_the_keyless_server(surface: Surface):
    completion = surface.openai().chat.completions.create(
        model="ollama/brand-new-model:7b", messages=PROMPT
    )
    assert completion.choices[0].message.content == REPLY
    [sent] = surface.local.requests()
    assert (sent.path, sent.key) == ("/v1/chat/completions", "")  # no credential at all
    assert sent.body is not None and sent.body["model"] == "brand-new-model:7b"
    [record] = call_records(1)
    assert record.requested_model == "ollama/brand-new-model:7b"
    assert record.upstream_model == "brand-new-model:7b"
    assert (record.provider, record.key_id) == ("local", "local:keyless")


# --- failover across dialects --------------------------------------------------------------------


def test_a_chat_completion_fails_over_to_anthropic(surface: Surface):
    surface.fail_first(list(KEY_SECRETS.values()))
    completion = surface.openai().chat.completions.create(model=TO_CLAUDE, messages=PROMPT)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert paths(surface.upstream)[-1] == "/v1/messages"
    records = sorted(call_records(3), key=lambda r: r.attempt)
    assert [r.upstream_dialect for r in records] == ["openai", "openai", "anthropic"]
    assert {r.client_dialect for r in records} == {"openai"}
    assert [r.outcome for r in records] == ["rate_limited", "rate_limited", "success"]
    assert records[-1].final and records[-1].completion_tokens == 16


def test_a_chat_stream_is_served_by_anthropic_in_openai_chunks(surface: Surface):
    surface.fail_first(list(KEY_SECRETS.values()))
    chunks = list(
        surface.openai().chat.completions.create(
            model=TO_CLAUDE, messages=PROMPT, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    final = next(r for r in call_records(3) if r.final)
    assert (final.upstream_dialect, final.stream, final.outcome) == ("anthropic", True, "success")
    assert final.ttft_ms is not None and final.usage_source == "reported"
    assert (final.prompt_tokens, final.completion_tokens) == (2, 16)


def test_a_message_fails_over_to_an_openai_deployment(surface: Surface):
    surface.fail_first(list(ANTHROPIC_SECRETS.values()))
    message = surface.anthropic().messages.create(model=TO_OPENAI, max_tokens=64, messages=PROMPT)
    assert message.type == "message" and message.content[0].type == "text"
    assert message.content[0].text == REPLY
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 16
    records = sorted(call_records(3), key=lambda r: r.attempt)
    assert [r.upstream_dialect for r in records] == ["anthropic", "anthropic", "openai"]
    assert {r.client_dialect for r in records} == {"anthropic"}


def test_an_anthropic_stream_with_tools_from_an_openai_deployment(surface: Surface):
    surface.upstream.script(
        {
            "keys": {
                **{s: {"queue": ["429"]} for s in ANTHROPIC_SECRETS.values()},
                **{s: {"queue": [{"fault": "tool_call", "tool_calls": [WEATHER]}]}
                   for s in KEY_SECRETS.values()},
            }
        }
    )  # fmt: skip
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    with surface.anthropic().messages.stream(
        model=TO_OPENAI, max_tokens=64, messages=PROMPT, tools=tools
    ) as stream:
        final = stream.get_final_message()
    [block] = [b for b in final.content if b.type == "tool_use"]
    assert (block.name, block.input) == ("get_weather", {"city": "Paris"})
    assert final.stop_reason == "tool_use"
    sent = [r.body for r in surface.upstream.requests() if r.path == "/v1/chat/completions"]
    assert sent and sent[-1] is not None
    assert sent[-1]["tools"][0]["function"]["name"] == "get_weather"
    record = next(r for r in call_records(3) if r.final)
    assert (record.tool_calls, record.tool_names) == (1, ["get_weather"])


def test_an_untranslatable_feature_is_a_400_naming_it(surface: Surface):
    with pytest.raises(openai.BadRequestError) as bad:
        surface.openai().chat.completions.create(model=CLAUDE_ONLY, messages=PROMPT, logprobs=True)
    error = bad.value.body
    assert error["code"] == "untranslatable_feature"  # type: ignore[index]
    assert "logprobs" in error["message"]  # type: ignore[index]
    assert surface.upstream.requests() == []


def test_no_secret_reaches_an_answer_a_record_or_a_log_on_the_new_paths(
    surface: Surface,
    usage_log: Callable[[], list[dict[str, Any]]],
    raw_log: RawCapture,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.DEBUG)
    # A rejected key and a failing one on the way to every translated answer.
    surface.upstream.script(
        {
            "keys": {
                KEY_SECRETS["key-a"]: {"default": {"fault": "401"}},
                KEY_SECRETS["key-b"]: {"queue": ["500", "500"]},
            }
        }
    )
    oa, an = surface.openai(), surface.anthropic()
    texts = [
        oa.chat.completions.with_raw_response.create(model=TO_CLAUDE, messages=PROMPT).text,
        json.dumps(
            [c.model_dump() for c in oa.chat.completions.create(
                model=TO_CLAUDE, messages=PROMPT, stream=True)]
        ),
        an.messages.with_raw_response.create(
            model=TO_OPENAI, max_tokens=16, messages=PROMPT
        ).http_response.text,
        oa.with_raw_response.models.list().text,
        oa.embeddings.with_raw_response.create(model=EMBED, input="x").text,
    ]  # fmt: skip
    records = call_records(7)
    dumped = [
        json.dumps({f: str(getattr(r, f)) for f in ("key_id", "error_type")}) for r in records
    ]
    assert raw_log.lines, "nothing was logged: the capture is not working"
    text = "\n".join([*texts, *dumped, caplog.text, *raw_log.lines, *map(json.dumps, usage_log())])
    for secret in [*KEY_SECRETS.values(), *ANTHROPIC_SECRETS.values(), surface.token]:
        assert secret not in text
