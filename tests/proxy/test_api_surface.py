"""Embeddings, legacy completions, the Responses API, one model, pass-through routes and keyless
providers, against an injected upstream (httpx.MockTransport): what the gateway checks, where
it sends each call, what it records."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from django.test import AsyncClient

from tests.proxy import anthropic_wire as wire
from tests.proxy.conftest import Gateway, base_config, gateway_serving, status, streaming
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio


def embedding_ok(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return httpx.Response(
        200,
        json={
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2]}
                for i in range(len(inputs))
            ],
            "model": body["model"],
            "usage": {"prompt_tokens": 7, "total_tokens": 7},
        },
    )


def response_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "resp_1",
            "object": "response",
            "status": "completed",
            "model": json.loads(request.content)["model"],
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi!", "annotations": []}],
                },
                {"type": "function_call", "name": "lookup", "call_id": "c1", "arguments": "{}"},
            ],
            "usage": {
                "input_tokens": 11,
                "input_tokens_details": {"cached_tokens": 3},
                "output_tokens": 5,
                "output_tokens_details": {"reasoning_tokens": 2},
                "total_tokens": 16,
            },
        },
    )


def models_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, json={"object": "list", "data": [{"id": "llama3"}, {"id": "qwen2"}, {"nope": 1}]}
    )


def surface_config() -> dict[str, Any]:
    config = base_config()
    config["providers"]["local"] = {
        "kind": "openai_compatible",
        "base_url": "https://local.test/v1",
        "requires_key": False,
    }
    config["providers"]["claude"] = {"kind": "anthropic", "base_url": "https://claude.test/v1"}
    config["keys"].append({"id": "claude-1", "provider": "claude", "secret": "literal://sk-ant-x1"})
    config["routes"].update(
        {
            "ollama/*": {"deployments": [{"provider": "local", "model": "*"}]},
            "ollama/llama*": {"deployments": [{"provider": "local", "model": "llama*"}]},
            "*": {"deployments": [{"provider": "openai", "model": "*"}]},
            "claude-only": {"deployments": [{"provider": "claude", "model": "claude-x"}]},
            "openai-then-claude": {
                "deployments": [
                    {"provider": "openai", "model": "gpt-4o-mini"},
                    {"provider": "claude", "model": "claude-x"},
                ]
            },
        }
    )
    config["clients"] = [{"name": "app", "routes": ["*"], "scopes": ["proxy"]}]
    return config


@pytest.fixture
def surface(transactional_db: None, mock_upstream: Callable[..., None]) -> Iterator[Gateway]:
    yield from gateway_serving(surface_config(), mock_upstream)


async def post(gateway: Gateway, path: str, body: Any) -> Any:
    return await AsyncClient().post(
        path,
        data=body if isinstance(body, str) else json.dumps(body),
        content_type="application/json",
        headers=gateway.headers(),
    )


async def final_record(request_id: str) -> CallRecord:
    from asgiref.sync import sync_to_async

    from usage.recorder import get_recorder

    assert get_recorder().flush(timeout=10)
    return await sync_to_async(CallRecord.objects.get)(request_id=request_id, final=True)


# --- embeddings ---------------------------------------------------------------------------------


async def test_embeddings_go_to_the_embeddings_path_and_record_input_tokens(surface: Gateway):
    surface.upstream.default = embedding_ok
    response = await post(
        surface, "/v1/embeddings", {"model": "gpt-4o-mini", "input": ["a", "b"], "extra": 1}
    )
    assert response.status_code == 200
    assert len(response.json()["data"]) == 2
    [sent] = surface.upstream.requests
    assert str(sent.url) == "https://upstream.test/v1/embeddings"
    assert json.loads(sent.content) == {"model": "gpt-4o-mini", "input": ["a", "b"], "extra": 1}
    record = await final_record(response["x-llmrotate-request-id"])
    assert (record.operation, record.prompt_tokens, record.completion_tokens) == (
        "embeddings",
        7,
        0,
    )
    assert (record.client_dialect, record.upstream_dialect) == ("openai", "openai")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"model": "gpt-4o-mini"}, "missing_required_parameter", "input"),
        ({"model": "gpt-4o-mini", "input": 3}, "invalid_type", "input"),
        ({"model": "gpt-4o-mini", "input": []}, "invalid_type", "input"),
        ({"model": "gpt-4o-mini", "input": [[1], "x"]}, "invalid_type", "input"),
        ({"model": "gpt-4o-mini", "input": "x", "encoding_format": "hex"}, "invalid_value", None),
        ({"model": "gpt-4o-mini", "input": "x", "stream": True}, "invalid_value", "stream"),
        ({"input": "x"}, "missing_required_parameter", "model"),
    ],
)
async def test_bad_embeddings_bodies_are_400s_naming_the_field(surface: Gateway, body, code, param):
    response = await post(surface, "/v1/embeddings", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    if param:
        assert error["param"] == param
    assert surface.upstream.requests == []


async def test_an_anthropic_only_route_cannot_embed(surface: Gateway):
    response = await post(surface, "/v1/embeddings", {"model": "claude-only", "input": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "dialect_not_supported"


async def test_a_refused_embedding_is_recorded_as_one(surface: Gateway):
    response = await post(surface, "/v1/embeddings", {"model": "claude-only", "input": "x"})
    assert response.status_code == 400
    from asgiref.sync import sync_to_async

    from usage.recorder import get_recorder

    assert get_recorder().flush(timeout=10)
    [record] = await sync_to_async(list)(CallRecord.objects.all())
    assert (record.operation, record.attempt, record.outcome) == ("embeddings", 0, "refused")


# --- completions and responses ------------------------------------------------------------------


async def test_legacy_completions_record_their_text_kind(surface: Gateway):
    surface.upstream.default = lambda request: httpx.Response(
        200,
        json={
            "object": "text_completion",
            "choices": [{"text": "Hi", "index": 0, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        },
    )
    response = await post(surface, "/v1/completions", {"model": "gpt-4o-mini", "prompt": "Say"})
    assert response.status_code == 200
    assert str(surface.upstream.requests[0].url).endswith("/v1/completions")
    record = await final_record(response["x-llmrotate-request-id"])
    assert (record.operation, record.completion_tokens) == ("text_completion", 1)


async def test_a_response_records_its_usage_and_tool_calls(surface: Gateway):
    surface.upstream.default = response_ok
    response = await post(surface, "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"})
    assert response.status_code == 200
    assert str(surface.upstream.requests[0].url).endswith("/v1/responses")
    record = await final_record(response["x-llmrotate-request-id"])
    assert record.operation == "responses"
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (11, 5, 3)
    assert (record.reasoning_tokens, record.tool_calls, record.tool_names) == (2, 1, ["lookup"])


@pytest.mark.parametrize("field", ["previous_response_id", "conversation", "background"])
async def test_stateful_response_fields_are_refused(surface: Gateway, field):
    body = {
        "model": "gpt-4o-mini",
        "input": "hi",
        field: "resp_1" if field != "background" else True,
    }
    response = await post(surface, "/v1/responses", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("stateful_response_not_supported", field)
    assert surface.upstream.requests == []


async def test_a_stored_response_cannot_be_fetched(surface: Gateway):
    response = await AsyncClient().get("/v1/responses/resp_1", headers=surface.headers())
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "stateful_response_not_supported"


# --- pass-through routes, keyless providers, models ---------------------------------------------


async def test_the_most_specific_pattern_serves_and_a_keyless_call_carries_no_key(
    surface: Gateway,
):
    for model, upstream_model in (
        ("ollama/llama3:8b", "llama3:8b"),  # ollama/llama* (longer literal) wins over ollama/*
        ("ollama/qwen2", "qwen2"),
        ("something-else", "something-else"),  # `*` on the OpenAI provider
        ("gpt-4o-mini", "gpt-4o-mini"),  # the exact route wins over every pattern
    ):
        surface.upstream.requests.clear()
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        response = await post(surface, "/v1/chat/completions", body)
        assert response.status_code == 200, response.content
        [sent] = surface.upstream.requests
        assert json.loads(sent.content)["model"] == upstream_model
        record = await final_record(response["x-llmrotate-request-id"])
        assert (record.requested_model, record.upstream_model) == (model, upstream_model)
        if model.startswith("ollama/"):
            assert sent.url.host == "local.test"
            assert "authorization" not in sent.headers
            assert record.key_id == "local:keyless"


async def test_models_lists_routes_and_what_pattern_upstreams_list(surface: Gateway):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            if request.url.host == "local.test":
                return models_ok(request)
            return httpx.Response(500, json={"error": {"message": "down"}})
        raise AssertionError(request.url)

    surface.upstream.default = answer
    response = await AsyncClient().get("/v1/models", headers=surface.headers())
    assert response.status_code == 200
    ids = [m["id"] for m in response.json()["data"]]
    assert {"gpt-4o-mini", "with-fallback", "claude-only"} <= set(ids)
    # ollama/* maps the local list back to client names; ollama/llama* only its own matches;
    # the OpenAI `*` upstream could not be listed (500), and the rest of the list still came.
    assert [i for i in ids if i.startswith("ollama/")] == ["ollama/llama3", "ollama/qwen2"]
    retrieved = await AsyncClient().get("/v1/models/ollama/qwen2", headers=surface.headers())
    assert retrieved.json() == {
        "id": "ollama/qwen2",
        "object": "model",
        "created": retrieved.json()["created"],
        "owned_by": "llmrotate",
    }


async def test_an_unknown_model_is_a_404_when_no_pattern_matches(gateway: Gateway):
    response = await AsyncClient().get("/v1/models/nope", headers=gateway.headers())
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


# --- what cannot be translated -------------------------------------------------------------------

CHAT_LOGPROBS = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}


async def test_an_untranslatable_request_is_a_400_naming_the_feature(surface: Gateway):
    response = await post(
        surface, "/v1/chat/completions", {"model": "claude-only", **CHAT_LOGPROBS}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("untranslatable_feature", "logprobs")
    assert "logprobs" in error["message"]
    assert surface.upstream.requests == []


async def test_a_native_deployment_still_serves_what_the_other_cannot_take(surface: Gateway):
    response = await post(
        surface, "/v1/chat/completions", {"model": "openai-then-claude", **CHAT_LOGPROBS}
    )
    assert response.status_code == 200
    assert [r.url.host for r in surface.upstream.requests] == ["upstream.test"]


async def test_when_the_native_deployment_fails_the_answer_says_so_not_the_translation(
    surface: Gateway,
):
    surface.upstream.default = status(429)
    response = await post(
        surface, "/v1/chat/completions", {"model": "openai-then-claude", **CHAT_LOGPROBS}
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_key_available"
    assert {r.url.host for r in surface.upstream.requests} == {"upstream.test"}


# --- hostile shapes on a translated path ---------------------------------------------------------


async def test_a_request_of_the_wrong_shape_for_translation_is_a_400(surface: Gateway):
    body = {"model": "claude-only", "messages": [{"role": "user", "content": [1, 2]}]}
    response = await post(surface, "/v1/chat/completions", body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_type"
    assert surface.upstream.requests == []


async def test_an_answer_shaped_unlike_anthropics_is_a_bad_response_not_a_500(surface: Gateway):
    surface.upstream.default = lambda request: httpx.Response(
        200, json={"type": "message", "content": "not a list of blocks", "usage": {}}
    )
    body = {"model": "claude-only", "messages": [{"role": "user", "content": "hi"}]}
    response = await post(surface, "/v1/chat/completions", body)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    record = await final_record(response["x-llmrotate-request-id"])
    assert (record.outcome, record.error_type) == ("bad_response", "untranslatable")


async def test_a_stream_event_shaped_unlike_anthropics_ends_with_the_clients_error_event(
    surface: Gateway,
):
    bad_delta = wire.event({"type": "content_block_delta", "index": 0, "delta": "zzz"})
    surface.upstream.default = streaming(
        wire.message_start(), wire.BLOCK_START, wire.text_delta("Hi"), bad_delta,
        wire.text_delta("never sent"), wire.message_delta(), wire.MESSAGE_STOP,
    )  # fmt: skip
    body = {"model": "claude-only", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    response = await post(surface, "/v1/chat/completions", body)
    assert response.status_code == 200
    text = b"".join([chunk async for chunk in response.streaming_content]).decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "untranslatable_event"
    assert "never sent" not in text and "[DONE]" not in text
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") == "Hi" for e in events)
    record = await final_record(response["x-llmrotate-request-id"])
    assert (record.outcome, record.error_type) == ("stream_error", "untranslatable_event")


async def test_metrics_label_a_pass_through_call_by_its_pattern_and_a_refusal_by_a_dash(
    surface: Gateway, monkeypatch: pytest.MonkeyPatch
):
    # Model names a client sends to a pattern route (or with a bad token) are unbounded: the
    # series take the pattern, or "-" (usage.call_metrics reads these two fields).
    seen: list[Any] = []
    monkeypatch.setattr("proxy.calls.record_call", seen.append)
    body = {"model": "ollama/anything-at-all", "messages": [{"role": "user", "content": "hi"}]}
    assert (await post(surface, "/v1/chat/completions", body)).status_code == 200
    refused = await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": "Bearer llmr_nope_0000000000000000000000000000"},
    )
    assert refused.status_code == 401
    assert [(d.requested_model, d.metric_route, d.metric_model) for d in seen] == [
        ("ollama/anything-at-all", "ollama/*", "*"),
        ("", "-", None),  # refused before the body was read
    ]
