from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from common.redaction import mask_secret
from keys.crypto import (
    SecretDecryptionError,
    SecretError,
    decrypt_secret,
    encrypt_secret,
    generate_client_token,
    hash_token,
    is_reference,
    reencrypt_secret,
    resolve_reference,
    split_token,
    tokens_match,
)

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()
SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"


def test_a_secret_survives_a_round_trip() -> None:
    token = encrypt_secret(SECRET, keys=[OLD])
    assert SECRET not in token
    assert decrypt_secret(token, keys=[OLD]) == SECRET


def test_old_ciphertext_still_opens_after_a_new_key_is_added() -> None:
    token = encrypt_secret(SECRET, keys=[OLD])
    assert decrypt_secret(token, keys=[NEW, OLD]) == SECRET
    rotated = reencrypt_secret(token, keys=[NEW, OLD])
    assert decrypt_secret(rotated, keys=[NEW]) == SECRET  # the old key can now be retired


def test_the_first_key_encrypts() -> None:
    token = encrypt_secret(SECRET, keys=[NEW, OLD])
    assert decrypt_secret(token, keys=[NEW]) == SECRET
    with pytest.raises(SecretDecryptionError):
        decrypt_secret(token, keys=[OLD])


def test_a_wrong_key_fails_loudly_without_leaking_anything() -> None:
    token = encrypt_secret(SECRET, keys=[OLD])
    with pytest.raises(SecretDecryptionError) as excinfo:
        decrypt_secret(token, keys=[NEW])
    message = str(excinfo.value)
    assert "LLMROTATE_ENCRYPTION_KEYS" in message
    for leak in (SECRET, token, OLD, NEW, SECRET[-8:], token[:20]):
        assert leak not in message
        assert leak not in repr(excinfo.value)
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


@pytest.mark.parametrize("stored", ["", "not-a-token", SECRET, "gAAAAAB" + "x" * 80, "ü"])
def test_stored_text_that_is_not_ciphertext_is_never_returned(stored: str) -> None:
    with pytest.raises(SecretDecryptionError):
        decrypt_secret(stored, keys=[OLD])


def test_an_empty_key_list_is_an_error() -> None:
    with pytest.raises(SecretError, match="empty"):
        encrypt_secret(SECRET, keys=[])


def test_an_invalid_key_is_named_by_position_only() -> None:
    with pytest.raises(SecretError, match=r"LLMROTATE_ENCRYPTION_KEYS\[1\]") as excinfo:
        encrypt_secret(SECRET, keys=[OLD, "not-a-fernet-key"])
    assert "not-a-fernet-key" not in str(excinfo.value)


def test_a_comma_separated_string_of_keys_is_accepted() -> None:
    token = encrypt_secret(SECRET, keys=f"{NEW}, {OLD}")
    assert decrypt_secret(token, keys=[NEW]) == SECRET


def test_it_reads_the_keys_from_django_settings() -> None:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    try:
        settings.LLMROTATE_ENCRYPTION_KEYS  # noqa: B018 (touching it configures settings)
    except ImproperlyConfigured:
        pytest.skip("Django settings are not configured in this run")
    with override_settings(LLMROTATE_ENCRYPTION_KEYS=[OLD]):
        token = encrypt_secret(SECRET)
        assert decrypt_secret(token) == SECRET
    # The cached MultiFernet is rebuilt when the setting changes.
    with override_settings(LLMROTATE_ENCRYPTION_KEYS=[NEW]), pytest.raises(SecretDecryptionError):
        decrypt_secret(token)


def test_env_references_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMROTATE_TEST_KEY", SECRET)
    assert is_reference("env://LLMROTATE_TEST_KEY")
    assert resolve_reference("env://LLMROTATE_TEST_KEY") == SECRET


def test_a_missing_env_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMROTATE_MISSING_KEY", raising=False)
    with pytest.raises(SecretError, match="LLMROTATE_MISSING_KEY"):
        resolve_reference("env://LLMROTATE_MISSING_KEY")


def test_file_references_resolve_without_the_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "openai.key"
    path.write_text(SECRET + "\n")
    assert is_reference(f"file://{path}")
    assert resolve_reference(f"file://{path}") == SECRET


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(SecretError, match=re.escape(str(path))):
        resolve_reference(f"file://{path}")


def test_an_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.key"
    path.write_text("\n")
    with pytest.raises(SecretError, match="empty"):
        resolve_reference(f"file://{path}")


@pytest.mark.parametrize("value", [SECRET, "literal://sk-x", "https://x", "", "ENV://X"])
def test_other_values_are_not_references(value: str) -> None:
    assert not is_reference(value)
    with pytest.raises(SecretError):
        resolve_reference(value)


@pytest.mark.parametrize(
    ("secret", "masked"),
    [
        (SECRET, "sk-proj-…ABCD"),
        ("sk-ant-api03-" + "x" * 40 + "WXYZ", "sk-ant-…WXYZ"),
        ("sk-" + "a" * 44 + "1234", "sk-…1234"),
        ("llmr_abcd1234_" + "y" * 39 + "9876", "llmr_…9876"),
        ("AIza" + "b" * 31 + "5678", "…5678"),
        ("sk-short", "sk-…"),
        ("abcdefg-", "…"),
        ("abcdefg-" + "x" * 12, "abcdefg-…"),
        ("hunter2", "…"),
        ("", ""),
    ],
)
def test_it_masks_secrets(secret: str, masked: str) -> None:
    assert mask_secret(secret) == masked


@given(
    st.text(min_size=0, max_size=120)
    | st.from_regex(r"[A-Za-z]{1,7}[-_]([A-Za-z0-9]{1,5}-)?[A-Za-z0-9_-]{0,60}", fullmatch=True)
)
def test_a_mask_reveals_at_most_8_leading_and_4_trailing_chars(secret: str) -> None:
    masked = mask_secret(secret)
    if not secret:
        assert masked == ""
        return
    head, sep, tail = masked.partition("…")
    assert sep == "…"
    assert len(head) <= 8 and secret.startswith(head)
    assert len(tail) <= 4 and secret.endswith(tail)
    # Never most of the secret: at least half stays hidden.
    assert len(head) + len(tail) <= len(secret) // 2 or len(head) + len(tail) == 0


def test_client_tokens_have_the_documented_shape() -> None:
    token, prefix, digest = generate_client_token()
    assert re.fullmatch(r"llmr_[a-z0-9]{8}_[A-Za-z0-9_-]{43}", token)
    assert token.startswith(f"llmr_{prefix}_")
    assert digest == hash_token(token)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert split_token(token) == prefix


def test_client_tokens_are_unique() -> None:
    assert len({generate_client_token()[0] for _ in range(200)}) == 200


@pytest.mark.parametrize(
    "token",
    [
        "",
        "llmr_",
        "llmr_ABCDEFGH_" + "x" * 43,
        "llmr_abcd123_" + "x" * 43,
        "llmr_abcd1234_" + "x" * 42,
        "llmr_abcd1234_" + "x" * 44,
        "sk-abcd1234_" + "x" * 43,
        "llmr_abcd1234_" + "x" * 42 + "!",
    ],
)
def test_malformed_tokens_have_no_prefix(token: str) -> None:
    assert split_token(token) is None


def test_token_hashes_compare_in_constant_time() -> None:
    token, _, digest = generate_client_token()
    assert tokens_match(digest, hash_token(token))
    assert not tokens_match(digest, hash_token(token + "x"))
    assert not tokens_match(digest, "")
