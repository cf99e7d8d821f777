"""A key whose secret cannot be read is out of routing, and the monitoring reads say so."""

from __future__ import annotations

import pytest
from django.test import Client

from keys.models import ApiKey
from keys.routing import invalidate_routing_cache
from tests.factories import ApiKeyFactory, ProviderFactory
from tests.usage import monitoring

api = monitoring.api
monitor_token = monitoring.monitor_token

pytestmark = pytest.mark.django_db


def test_a_key_with_an_unset_env_reference_is_not_available(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMROTATE_TEST_UNSET_KEY", raising=False)
    openai = ProviderFactory(name="openai")
    ApiKeyFactory(key_id="good", provider=openai)
    ref = ApiKeyFactory(key_id="ref", provider=openai)
    ApiKey.objects.filter(pk=ref.pk).update(
        secret_ref="env://LLMROTATE_TEST_UNSET_KEY", secret_encrypted=""
    )
    invalidate_routing_cache()

    keys = {k["key_id"]: k for k in api.get("/api/keys").json()["keys"]}
    assert keys["good"]["available"] is True
    assert keys["ref"]["available"] is False
    assert keys["ref"]["last_error_type"] == "secret_unavailable"
    health = api.get("/api/health").json()
    assert (health["status"], health["available_keys"], health["total_keys"]) == ("degraded", 1, 2)
    # Which variable is missing is the operator's business (the gateway's log says it).
    assert "LLMROTATE_TEST_UNSET_KEY" not in api.get("/api/keys").content.decode()
