from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from keys.crypto import hash_token
from keys.health import CallResult, KeyPolicy, KeyStatus, Outcome
from keys.models import ApiKey, ClientToken, Route
from keys.secrets import api_key_resolve_secret
from keys.services import client_token_lookup_prefix
from keys.state_store import get_key_state_store
from tests.factories import ApiKeyFactory, ClientTokenFactory, ProviderFactory

pytestmark = pytest.mark.django_db

SECRET = "sk-proj-admin0123456789secretWXYZ"


def add_key(client: Client, **overrides: Any) -> Any:
    provider = ProviderFactory(name="openai")
    data = {
        "key_id": "openai-1",
        "provider": provider.pk,
        "secret": SECRET,
        "enabled": "on",
        "priority": "0",
        "weight": "1",
        "allowed_models": "gpt-4o-mini\ngpt-4o",
        **overrides,
    }
    return client.post(reverse("admin:keys_apikey_add"), data, follow=True)


def status_of(key: ApiKey) -> KeyStatus:
    return get_key_state_store().get_many([key.key_id], now=time.time())[key.key_id][0].status


def test_adding_a_key_stores_it_encrypted_with_a_masked_hint(admin_client: Client) -> None:
    response = add_key(admin_client)

    assert response.status_code == 200
    key = ApiKey.objects.get(key_id="openai-1")
    assert key.secret_hint == "sk-proj-…WXYZ"
    assert key.allowed_models == ["gpt-4o-mini", "gpt-4o"]
    assert SECRET not in key.secret_encrypted
    assert api_key_resolve_secret(api_key=key) == SECRET


def test_neither_the_secret_nor_its_ciphertext_appear_in_any_page(admin_client: Client) -> None:
    add_key(admin_client)
    key = ApiKey.objects.get(key_id="openai-1")

    pages = [
        admin_client.get(reverse("admin:keys_apikey_changelist")),
        admin_client.get(reverse("admin:keys_apikey_change", args=[key.pk])),
        admin_client.get(reverse("admin:keys_apikey_history", args=[key.pk])),
    ]

    for page in pages:
        html = page.content.decode()
        assert page.status_code == 200
        assert SECRET not in html
        assert key.secret_encrypted not in html
        assert key.secret_encrypted[:20] not in html
    assert "sk-proj-…WXYZ" in pages[0].content.decode()


def test_a_rejected_form_does_not_echo_the_secret(admin_client: Client) -> None:
    response = add_key(admin_client, weight="0")

    assert response.status_code == 200
    assert not ApiKey.objects.exists()
    assert SECRET not in response.content.decode()


def test_a_new_key_needs_a_secret(admin_client: Client) -> None:
    response = add_key(admin_client, secret="")

    assert "This field is required" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_saving_without_a_secret_keeps_the_old_one(admin_client: Client) -> None:
    key = ApiKeyFactory(key_id="openai-1")
    url = reverse("admin:keys_apikey_change", args=[key.pk])
    data = {
        "key_id": "openai-1",
        "provider": key.provider.pk,
        "secret": "",
        "priority": "3",
        "weight": "2",
        "allowed_models": "",
    }

    admin_client.post(url, data)

    key.refresh_from_db()
    assert (key.priority, key.enabled) == (3, False)
    assert api_key_resolve_secret(api_key=key) == key.raw_secret


def test_an_unresolvable_reference_is_saved_with_a_warning(admin_client: Client) -> None:
    response = add_key(admin_client, secret="env://LLMROTATE_TEST_UNSET_VARIABLE")

    assert "LLMROTATE_TEST_UNSET_VARIABLE is not set" in response.content.decode()
    assert ApiKey.objects.get(key_id="openai-1").secret_ref == (
        "env://LLMROTATE_TEST_UNSET_VARIABLE"
    )


def test_a_malformed_reference_is_a_form_error(admin_client: Client) -> None:
    response = add_key(admin_client, secret="vault://kv/openai")

    assert "unknown secret scheme" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_the_list_shows_live_health_from_one_store_call(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = ApiKeyFactory.create_batch(3)
    store = get_key_state_store()
    store.manual(keys[0].key_id, "disable", now=time.time())
    calls: list[list[str]] = []
    real_get_many = store.get_many

    def counting_get_many(key_ids: list[str], *, now: float) -> Any:
        calls.append(list(key_ids))
        return real_get_many(key_ids, now=now)

    monkeypatch.setattr(store, "get_many", counting_get_many)

    html = admin_client.get(reverse("admin:keys_apikey_changelist")).content.decode()

    assert len(calls) == 1
    assert sorted(calls[0]) == sorted(k.key_id for k in keys)
    assert "disabled" in html
    assert html.count(">active<") == 2


def test_a_cooling_key_shows_when_it_comes_back(admin_client: Client) -> None:
    key = ApiKeyFactory()
    asyncio.run(
        get_key_state_store().record(
            key.key_id,
            CallResult(
                Outcome.RATE_LIMITED,
                now=time.time(),
                policy=KeyPolicy(),
                retry_after=600,
                error_type="rate_limited",
            ),
        )
    )

    html = admin_client.get(reverse("admin:keys_apikey_changelist")).content.decode()

    assert "cooldown" in html
    assert re.search(r"in (9|10)\xa0minutes", html)
    assert "rate_limited" in html


def run_action(client: Client, url: str, action: str, pks: list[int]) -> Any:
    return client.post(url, {"action": action, "_selected_action": pks}, follow=True)


def test_key_actions_disable_enable_and_reset_through_the_store(admin_client: Client) -> None:
    key = ApiKeyFactory()
    url = reverse("admin:keys_apikey_changelist")

    run_action(admin_client, url, "disable_keys", [key.pk])
    key.refresh_from_db()
    assert (key.enabled, status_of(key)) == (False, KeyStatus.DISABLED)

    run_action(admin_client, url, "enable_keys", [key.pk])
    key.refresh_from_db()
    assert (key.enabled, status_of(key)) == (True, KeyStatus.ACTIVE)

    get_key_state_store().manual(key.key_id, "disable", now=time.time())
    response = run_action(admin_client, url, "reset_health", [key.pk])
    key.refresh_from_db()
    assert (key.enabled, status_of(key)) == (True, KeyStatus.ACTIVE)
    assert "Health reset" in response.content.decode()


def test_a_new_token_is_shown_once_and_never_again(admin_client: Client) -> None:
    response = admin_client.post(
        reverse("admin:keys_clienttoken_add"),
        {"name": "ci", "routes": "*", "scopes": ["proxy", "monitor"]},
        follow=True,
    )

    html = response.content.decode()
    tokens = set(re.findall(r"llmr_[a-z0-9]{8}_[A-Za-z0-9_-]{43}", html))
    assert len(tokens) == 1
    token = tokens.pop()
    assert "cannot be shown again" in html
    client = ClientToken.objects.get(name="ci")
    assert client.token_hash == hash_token(token)
    assert client.prefix == client_token_lookup_prefix(token)
    assert client.scopes == ["proxy", "monitor"] and client.routes == ["*"]

    for url in (
        reverse("admin:keys_clienttoken_changelist"),
        reverse("admin:keys_clienttoken_change", args=[client.pk]),
    ):
        html = admin_client.get(url).content.decode()
        assert token not in html
        assert client.token_hash not in html
    assert f"llmr_{client.prefix}_…" in html


def test_changing_a_token_keeps_its_hash(admin_client: Client) -> None:
    client = ClientTokenFactory(name="ci")

    admin_client.post(
        reverse("admin:keys_clienttoken_change", args=[client.pk]),
        {"routes": "gpt-4o-mini, gpt-4o", "scopes": ["monitor"]},
    )

    client.refresh_from_db()
    assert client.routes == ["gpt-4o-mini", "gpt-4o"]
    assert client.scopes == ["monitor"]
    assert client.token_hash == hash_token(client.raw_token)


def test_revoke_action_revokes(admin_client: Client) -> None:
    client = ClientTokenFactory()

    run_action(
        admin_client, reverse("admin:keys_clienttoken_changelist"), "revoke_tokens", [client.pk]
    )

    client.refresh_from_db()
    assert client.revoked_at is not None


def test_a_route_is_saved_with_its_chain_in_order(admin_client: Client) -> None:
    openai, local = ProviderFactory(name="openai"), ProviderFactory(name="local")
    prefix = "deployments"
    data = {
        "name": "gpt-4o-mini",
        "strategy": "health_aware",
        "enabled": "on",
        f"{prefix}-TOTAL_FORMS": "2",
        f"{prefix}-INITIAL_FORMS": "0",
        f"{prefix}-0-position": "1",
        f"{prefix}-0-provider": local.pk,
        f"{prefix}-0-model": "llama3.2",
        f"{prefix}-1-position": "0",
        f"{prefix}-1-provider": openai.pk,
        f"{prefix}-1-model": "gpt-4o-mini",
    }

    admin_client.post(reverse("admin:keys_route_add"), data)

    route = Route.objects.get(name="gpt-4o-mini")
    assert [str(d) for d in route.deployments.all()] == ["openai/gpt-4o-mini", "local/llama3.2"]
    html = admin_client.get(reverse("admin:keys_route_changelist")).content.decode()
    assert "openai/gpt-4o-mini → local/llama3.2" in html
