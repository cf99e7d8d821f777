"""/api/health, /api/keys and /api/config; and no endpoint ever shows a secret."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from common.redaction import base_url_masked
from healthchecks.models import Endpoint, ProbeStatus
from keys.health import CallResult, KeyPolicy, KeyStatus
from keys.models import ApiKey
from keys.state_store import get_key_state_store
from keys.strategies import DEFAULT_STRATEGY
from llmrotate_site.api import api as ninja_api
from tests.factories import ApiKeyFactory, ClientTokenFactory, ProviderFactory, RouteFactory
from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls

# Fixtures shared by the monitoring API tests.
api = monitoring.api
monitor_token = monitoring.monitor_token

pytestmark = pytest.mark.django_db


@pytest.fixture
def pool() -> dict[str, Any]:
    openai = ProviderFactory(name="openai")
    anthropic = ProviderFactory(name="anthropic", kind="anthropic")
    keys = {
        "o1": ApiKeyFactory(key_id="o1", provider=openai),
        "o2": ApiKeyFactory(key_id="o2", provider=openai),
        "o3": ApiKeyFactory(key_id="o3", provider=openai, enabled=False),
        "a1": ApiKeyFactory(key_id="a1", provider=anthropic),
    }
    RouteFactory(name="gpt-4o-mini", deployments=[(openai, "gpt-4o-mini"),
                                                   (anthropic, "claude-3-5-haiku")])  # fmt: skip
    return keys


def test_health_counts_keys_per_provider_and_state(api: Client, pool: dict[str, Any]) -> None:
    store = get_key_state_store()
    store.manual("o2", "disable", now=time.time())
    body = api.get("/api/health").json()
    assert body["status"] == "degraded"
    assert (body["total_keys"], body["available_keys"]) == (4, 2)
    providers = {p["provider"]: p for p in body["providers"]}
    assert providers["openai"]["total"] == 3
    assert providers["openai"]["available"] == 1
    assert providers["openai"]["states"]["disabled"] == 2
    assert providers["anthropic"]["states"]["active"] == 1


def test_health_is_down_without_keys(api: Client) -> None:
    assert api.get("/api/health").json()["status"] == "down"


def test_keys_show_live_state_with_llm_rotate_field_names(
    api: Client, pool: dict[str, Any]
) -> None:
    from keys.health import Outcome
    from keys.ratelimits import Headroom

    store = get_key_state_store()
    now = time.time()
    import asyncio

    limited = CallResult(
        Outcome.RATE_LIMITED,
        now=now,
        policy=KeyPolicy(),
        retry_after=30,
        headroom=Headroom(remaining_requests=0, remaining_tokens=1200),
        error_type="rate_limit_exceeded",
    )
    asyncio.run(store.record("o1", limited))
    keys = {k["key_id"]: k for k in api.get("/api/keys").json()["keys"]}
    o1 = keys["o1"]
    assert o1["health"] == KeyStatus.COOLDOWN
    assert o1["available"] is False
    assert o1["cooldown_until"] is not None
    assert o1["consecutive_failures"] == 1
    assert o1["total_failures"] == 1
    assert o1["last_error_type"] == "rate_limit_exceeded"
    assert (o1["remaining_requests"], o1["remaining_tokens"]) == (0, 1200)
    assert o1["last_used_at"] is not None
    assert o1["secret_hint"] == pool["o1"].secret_hint
    assert keys["o3"]["health"] == "disabled" and keys["o3"]["available"] is False
    assert keys["a1"]["health"] == "active" and keys["a1"]["quarantine_until"] is None


def test_config_shows_routes_with_their_fallback_chains(api: Client, pool: dict[str, Any]) -> None:
    ClientTokenFactory(name="ci", scopes=["proxy"])
    body = api.get("/api/config").json()
    assert body["strategy"] == DEFAULT_STRATEGY
    route = next(r for r in body["routes"] if r["name"] == "gpt-4o-mini")
    assert route["fallback_chain"] == [
        {"provider": "openai", "model": "gpt-4o-mini"},
        {"provider": "anthropic", "model": "claude-3-5-haiku"},
    ]
    keys = {k["key_id"]: k for k in body["keys"]}
    assert keys["o1"]["secret_source"] == "encrypted"
    assert {c["name"] for c in body["clients"]} >= {"ci", "monitoring"}


def test_a_key_given_as_a_reference_shows_only_the_kind(api: Client) -> None:
    key = ApiKeyFactory(key_id="ref")
    ApiKey.objects.filter(pk=key.pk).update(secret_ref="env://SECRET_NAME", secret_encrypted="")
    keys = {k["key_id"]: k for k in api.get("/api/config").json()["keys"]}
    assert keys["ref"]["secret_source"] == "env"
    assert "SECRET_NAME" not in api.get("/api/config").content.decode()


@pytest.mark.parametrize(
    ("url", "shown"),
    [("https://api.openai.com/v1", "https://api.openai.com/v1"),
     ("https://user:s3cret-token@proxy.example:8443/v1", "https://***@proxy.example:8443/v1"),
     ("https://s3cret-token@proxy.example/v1", "https://***@proxy.example/v1"),
     ("https://x.openai.azure.com/openai?api-version=2024-06-01&api-key=s3cret",
      "https://x.openai.azure.com/openai?api-version=2024-06-01&api-key=***"),
     ("https://h.example/v1?key=s3cret&Token=s3cret&sig=s3cret&region=eu",
      "https://h.example/v1?key=***&Token=***&sig=***&region=eu"),
     ("https://h.example/v1?access%5Ftoken=s3cret", "https://h.example/v1?access%5Ftoken=***"),
     ("https://h.example/v1#access_token=s3cret", "https://h.example/v1#***"),
     ("http://[::1:11434/v1?s3cret", "***"),
     # Credentials under names no list would guess: every value but a known setting is masked.
     ("https://fn.azurewebsites.net/api/v1?code=s3cret", "https://fn.azurewebsites.net/api/v1?code=***"),
     ("https://h.example/v1?jwt=eyJhbGciOi.s3cret", "https://h.example/v1?jwt=***"),
     ("https://h.example/v1?s3cret-token", "https://h.example/v1?***"),
     ("https://h.example/v1?region=eu;key=s3cret", "https://h.example/v1?region=eu&key=***"),
     ("https://h.example/k/sk-proj-s3cretPathKey0123456789/v1",
      "https://h.example/k/sk-proj-…6789/v1")],
)  # fmt: skip
def test_base_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    assert base_url_masked(url) == shown


def test_config_masks_credentials_in_provider_base_urls(api: Client) -> None:
    ProviderFactory(name="relay", base_url="https://me:s3cret-pass@relay.example/v1?token=s3cret-t")
    body = api.get("/api/config")
    provider = next(p for p in body.json()["providers"] if p["name"] == "relay")
    assert provider["base_url"] == "https://***@relay.example/v1?token=***"
    assert "s3cret" not in body.content.decode()


def _get_routes() -> list[str]:
    schema = ninja_api.get_openapi_schema()
    paths = []
    for path, operations in schema["paths"].items():
        if "get" in operations and path.startswith("/api/"):
            paths.append(re.sub(r"\{[^}]+\}", "req-secret", path))
    return paths


def test_no_endpoint_ever_outputs_a_secret_or_a_token(
    api: Client, monitor_token: str, pool: dict[str, Any]
) -> None:
    tokens = [ClientTokenFactory(name=n, scopes=["proxy"]).raw_token for n in ("web", "batch")]
    # A provider whose base URL carries credentials, with its probed endpoint.
    relay_url = "https://u:s3cret-userinfo@relay.example/v1?token=s3cret-query"
    ProviderFactory(name="relay", base_url=relay_url)
    Endpoint.objects.create(
        base_url=relay_url, is_up=False, http_status=ProbeStatus.FAILED, http_failures=2,
        last_checked_at=timezone.now(), last_change_at=timezone.now(),
    )  # fmt: skip
    url_secrets = ["u:s3cret", "s3cret-userinfo", "s3cret-query"]
    secrets = [k.raw_secret for k in pool.values()] + tokens + [monitor_token]
    write_calls(
        [call(request_id="req-secret", client="web", key_id="o1", started_at=timezone.now())]
    )
    paths = _get_routes()
    assert {"/api/health", "/api/keys", "/api/config", "/api/usage/export"} <= set(paths)
    assert "/api/health/endpoints" in paths
    seen_relay = False
    for path in paths:
        for query in ("", "?window=24h", "?format=jsonl"):
            response = api.get(path + query)
            text = (
                b"".join(response.streaming_content) if response.streaming else response.content
            ).decode()
            seen_relay = seen_relay or "relay.example" in text
            for secret in secrets:
                assert secret not in text, path
                # Not even the random body of a secret (what follows a vendor prefix).
                assert secret[-12:] not in text, path
            for part in url_secrets:
                assert part not in text, (path, part)
    # The relay was shown somewhere (masked): the check above looked at its URL.
    assert seen_relay
