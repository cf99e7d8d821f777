from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ValidationError

from keys.crypto import (
    SecretDecryptionError,
    SecretError,
    decrypt_secret,
    hash_token,
    split_token,
)
from keys.health import KeyStatus
from keys.models import ApiKey, ClientToken
from keys.secrets import api_key_resolve_secret
from keys.services import (
    LITERAL_WARNING,
    api_key_health_action,
    api_key_set_secret,
    client_token_create,
    client_token_lookup_prefix,
    client_token_revoke,
)
from keys.state_store import get_key_state_store
from tests.factories import ApiKeyFactory, ClientTokenFactory, ProviderFactory

pytestmark = pytest.mark.django_db

SECRET = "sk-proj-0123456789abcdefWXYZ"


def new_key() -> ApiKey:
    return ApiKey(key_id="openai-1", provider=ProviderFactory(name="openai"))


def test_a_raw_secret_is_stored_encrypted_with_a_masked_hint() -> None:
    key = new_key()

    warnings = api_key_set_secret(api_key=key, secret=SECRET)

    key.refresh_from_db()
    assert warnings == []
    assert SECRET not in key.secret_encrypted
    assert decrypt_secret(key.secret_encrypted) == SECRET
    assert key.secret_ref == ""
    assert key.secret_hint == "sk-proj-…WXYZ"


def test_a_literal_secret_is_encrypted_with_a_warning() -> None:
    key = new_key()

    warnings = api_key_set_secret(api_key=key, secret=f"literal://{SECRET}")

    assert warnings == [LITERAL_WARNING]
    assert api_key_resolve_secret(api_key=key) == SECRET
    assert SECRET not in " ".join(warnings)


def test_an_env_reference_never_enters_the_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_KEY_FOR_TEST", SECRET)
    key = new_key()

    warnings = api_key_set_secret(api_key=key, secret="env://OPENAI_KEY_FOR_TEST")

    row = ApiKey.objects.values().get(pk=key.pk)
    assert warnings == []
    assert row["secret_ref"] == "env://OPENAI_KEY_FOR_TEST"
    assert row["secret_encrypted"] == ""
    assert row["secret_hint"] == "sk-proj-…WXYZ"
    assert SECRET not in str(row)
    assert api_key_resolve_secret(api_key=key) == SECRET


def test_an_unresolvable_reference_is_saved_with_a_warning() -> None:
    key = new_key()

    warnings = api_key_set_secret(api_key=key, secret="env://LLMROTATE_TEST_UNSET_VARIABLE")

    key.refresh_from_db()
    assert key.secret_ref == "env://LLMROTATE_TEST_UNSET_VARIABLE"
    assert key.secret_hint == "env://LLMROTATE_TEST_UNSET_VARIABLE"
    assert len(warnings) == 1 and "not set" in warnings[0]


def test_a_file_reference_is_read_fresh(tmp_path: pytest.TempPathFactory) -> None:
    secret_file = tmp_path / "openai"  # type: ignore[operator]
    secret_file.write_text(SECRET + "\n")
    key = new_key()
    api_key_set_secret(api_key=key, secret=f"file://{secret_file}")

    secret_file.write_text("sk-proj-rotated-0000000000001111\n")

    assert api_key_resolve_secret(api_key=key) == "sk-proj-rotated-0000000000001111"


@pytest.mark.parametrize(
    "secret",
    ["", "   ", "env://", "env://NOT-A-NAME", "file://", "literal://", "vault://kv/openai"],
)
def test_it_rejects_malformed_secrets(secret: str) -> None:
    with pytest.raises(ValidationError):
        api_key_set_secret(api_key=new_key(), secret=secret)
    assert not ApiKey.objects.exists()


def test_resolving_a_missing_reference_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_KEY_FOR_TEST", SECRET)
    key = new_key()
    api_key_set_secret(api_key=key, secret="env://OPENAI_KEY_FOR_TEST")
    monkeypatch.delenv("OPENAI_KEY_FOR_TEST")

    with pytest.raises(SecretError, match="OPENAI_KEY_FOR_TEST is not set"):
        api_key_resolve_secret(api_key=key)


def test_a_wrong_encryption_key_fails_loudly_without_the_secret(settings: object) -> None:
    key = ApiKeyFactory()
    settings.LLMROTATE_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]  # type: ignore[attr-defined]

    with pytest.raises(SecretDecryptionError) as excinfo:
        api_key_resolve_secret(api_key=key)

    message = str(excinfo.value)
    assert key.raw_secret not in message
    assert key.secret_encrypted not in message
    # Never a fallback to the stored text.
    assert excinfo.value.__cause__ is None


def test_old_keys_still_decrypt_after_adding_a_new_encryption_key(settings: object) -> None:
    key = ApiKeyFactory()
    old = settings.LLMROTATE_ENCRYPTION_KEYS  # type: ignore[attr-defined]
    settings.LLMROTATE_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), *old]  # type: ignore[attr-defined]

    assert api_key_resolve_secret(api_key=key) == key.raw_secret


def test_setting_a_secret_logs_nothing_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = new_key()

    api_key_set_secret(api_key=key, secret=SECRET)
    api_key_resolve_secret(api_key=key)

    assert SECRET not in caplog.text


def test_a_generated_client_token_is_returned_once_and_stored_hashed() -> None:
    client, token = client_token_create(name="ci", routes=["*"], scopes=["proxy"])

    client.refresh_from_db()
    assert token.startswith("llmr_")
    assert split_token(token) == client.prefix
    assert client.token_hash == hash_token(token)
    assert token not in str(ClientToken.objects.values().get(pk=client.pk))


def test_a_given_token_of_any_shape_is_found_by_its_derived_prefix() -> None:
    token = "a-token-from-the-environment-0001"

    client, returned = client_token_create(name="ci", routes=["*"], scopes=["proxy"], token=token)

    assert returned == token
    assert client.prefix == client_token_lookup_prefix(token) == hash_token(token)[:8]
    assert client.token_hash == hash_token(token)


def test_a_given_token_in_llmr_format_keeps_its_own_prefix() -> None:
    token = ClientTokenFactory.build().raw_token

    client, _ = client_token_create(name="ci", routes=["*"], scopes=["proxy"], token=token)

    assert client.prefix == split_token(token)


def test_it_rejects_short_tokens_and_unknown_scopes() -> None:
    with pytest.raises(ValidationError, match="at least 20"):
        client_token_create(name="ci", routes=["*"], scopes=["proxy"], token="short")
    with pytest.raises(ValidationError, match="unknown scope"):
        client_token_create(name="ci", routes=["*"], scopes=["admin"])
    assert not ClientToken.objects.exists()


def test_the_same_token_cannot_serve_two_clients() -> None:
    token = "a-token-from-the-environment-0001"
    client_token_create(name="a", routes=["*"], scopes=["proxy"], token=token)

    with pytest.raises(ValidationError, match="already used"):
        client_token_create(name="b", routes=["*"], scopes=["proxy"], token=token)


def test_revoking_keeps_the_first_revocation_time() -> None:
    client = ClientTokenFactory()
    client_token_revoke(token=client)
    first = client.revoked_at

    client_token_revoke(token=client)

    client.refresh_from_db()
    assert first is not None and client.revoked_at == first


def test_disable_and_enable_move_both_the_flag_and_the_store() -> None:
    key = ApiKeyFactory()
    store = get_key_state_store()

    api_key_health_action(api_key=key, action="disable")
    key.refresh_from_db()
    assert not key.enabled
    assert store.get_many([key.key_id], now=0)[key.key_id][0].status == KeyStatus.DISABLED

    api_key_health_action(api_key=key, action="enable")
    key.refresh_from_db()
    assert key.enabled
    assert store.get_many([key.key_id], now=0)[key.key_id][0].status == KeyStatus.ACTIVE


def test_reset_clears_health_but_leaves_the_enabled_flag() -> None:
    key = ApiKeyFactory(enabled=False)
    store = get_key_state_store()
    store.manual(key.key_id, "disable", now=0)

    api_key_health_action(api_key=key, action="reset")

    key.refresh_from_db()
    assert not key.enabled
    assert store.get_many([key.key_id], now=0)[key.key_id][0].status == KeyStatus.ACTIVE
