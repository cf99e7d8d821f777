"""Replacement through the engine, with a MockTransport upstream: the target first, the route's
own deployment behind it, the headers that say so (on answers and on errors), streams, and
what the records carry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async

from tests.proxy.conftest import SECRETS, Gateway, base_config, gateway_serving, ok, status
from tests.proxy.test_request_records import HI, post, records

pytestmark = pytest.mark.asyncio
BACKUP = SECRETS["f1"]


def replacing(model: str = "llama-3", *, backup_models: list[str] | None = None) -> Any:
    config = base_config()
    if backup_models is not None:
        config["keys"][2]["models"] = backup_models
    config["replacement"] = [
        {
            "name": "to-llama",
            "route": "gpt-4o-mini",
            "target": {"provider": "backup", "model": model},
            "probability": 1.0,
        }
    ]
    return config


@pytest.fixture
def gateway(transactional_db: None, mock_upstream: Callable[..., None]) -> Iterator[Gateway]:
    yield from gateway_serving(replacing(), mock_upstream)


async def test_a_rule_whose_target_has_no_key_for_its_model_does_not_run(
    transactional_db: None, mock_upstream: Callable[..., None], flush_records: Callable[[], None]
) -> None:
    serving = gateway_serving(replacing("mistral", backup_models=["llama-3"]), mock_upstream)
    gateway = await sync_to_async(next)(serving)
    response = await post(gateway)
    assert response.status_code == 200
    assert "x-llmrotate-replacement" not in response
    assert gateway.upstream.keys_used() in (["openai-1"], ["openai-2"])
    [record] = await records(flush_records)
    assert (record.experiment, record.arm) == ("", "")  # not eligible: not compared either


def fails_on_backup(request: httpx.Request) -> httpx.Response:
    secret = request.headers["authorization"].removeprefix("Bearer ")
    return status(503)(request) if secret == BACKUP else ok(request)


async def test_a_replaced_request_is_answered_by_the_target_in_the_client_dialect(
    gateway: Gateway, flush_records: Callable[[], None]
) -> None:
    response = await post(gateway)
    assert response.status_code == 200
    assert response.json()["model"] == "llama-3"  # the model that answered
    assert response["x-llmrotate-replacement"] == "to-llama"
    assert "x-llmrotate-replacement-fallback" not in response
    assert gateway.upstream.keys_used() == ["backup-1"]
    assert gateway.upstream.bodies()[0]["model"] == "llama-3"
    [record] = await records(flush_records)
    assert (record.experiment, record.arm, record.replacement_attempt) == (
        "to-llama",
        "replaced",
        True,
    )
    assert (record.provider, record.upstream_model, record.final) == ("backup", "llama-3", True)


async def test_a_failing_target_falls_back_to_the_route_with_both_attempts_recorded(
    gateway: Gateway, flush_records: Callable[[], None]
) -> None:
    gateway.upstream.default = fails_on_backup
    response = await post(gateway)
    assert response.status_code == 200
    assert response.json()["model"] == "gpt-4o-mini"
    assert response["x-llmrotate-replacement"] == "to-llama"
    assert response["x-llmrotate-replacement-fallback"] == "true"
    first, second = await records(flush_records)
    assert (first.provider, first.replacement_attempt, first.final) == ("backup", True, False)
    assert first.outcome == "upstream_error"
    assert (second.provider, second.replacement_attempt, second.final) == ("openai", False, True)
    assert {first.arm, second.arm} == {"replaced"}


async def test_an_error_after_every_deployment_failed_still_names_the_rule(
    gateway: Gateway,
) -> None:
    gateway.upstream.default = status(500)
    response = await post(gateway)
    assert response.status_code == 502
    assert response["x-llmrotate-replacement"] == "to-llama"
    assert response["x-llmrotate-replacement-fallback"] == "true"


async def test_a_replaced_stream_carries_the_header_and_the_target_model(
    gateway: Gateway, flush_records: Callable[[], None]
) -> None:
    response = await post(gateway, {**HI, "stream": True})
    assert response.status_code == 200
    assert response["x-llmrotate-replacement"] == "to-llama"
    body = b"".join([chunk async for chunk in response.streaming_content])
    assert b"[DONE]" in body
    assert gateway.upstream.bodies()[0]["model"] == "llama-3"
    [record] = await records(flush_records)
    assert (record.arm, record.replacement_attempt, record.stream) == ("replaced", True, True)


async def test_the_opt_out_body_field_is_never_forwarded(gateway: Gateway) -> None:
    response = await post(gateway, {**HI, "llmrotate_no_replace": True})
    assert response.status_code == 200
    assert "x-llmrotate-replacement" not in response
    [sent] = gateway.upstream.bodies()
    assert "llmrotate_no_replace" not in sent and sent["model"] == "gpt-4o-mini"


async def test_a_malformed_opt_out_header_is_a_400_and_recorded(
    gateway: Gateway, flush_records: Callable[[], None]
) -> None:
    response = await post(gateway, **{"X-LLMRotate-No-Replace": "maybe"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-llmrotate-no-replace"
    assert gateway.upstream.requests == []
    [record] = await records(flush_records)
    assert (record.attempt, record.client_status, record.outcome) == (0, 400, "refused")
