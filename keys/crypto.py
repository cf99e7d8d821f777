"""Secrets: upstream keys encrypted at rest, references to secrets kept elsewhere, masking, and
client tokens.

No message raised from here ever contains a secret, a ciphertext or a key: these errors end up
in logs, admin messages and bug reports.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SecretError(Exception):
    """A secret could not be produced (missing reference, bad configuration, …)."""


class SecretDecryptionError(SecretError):
    """Stored ciphertext does not open with any configured key."""


ENV_PREFIX = "env://"
FILE_PREFIX = "file://"
# "Plaintext given on purpose": the caller encrypts it and warns that it passed through config.
LITERAL_PREFIX = "literal://"

# ---------------------------------------------------------------------------------------------
# Encryption at rest


def encrypt_secret(plaintext: str, *, keys: Sequence[str] | None = None) -> str:
    """Fernet ciphertext of `plaintext`, under the first of the configured keys."""
    return _multifernet(_key_tuple(keys)).encrypt(plaintext.encode("utf-8")).decode("ascii")


def decrypt_secret(token: str, *, keys: Sequence[str] | None = None) -> str:
    """Plaintext of a stored ciphertext; SecretDecryptionError if no configured key opens it.

    Never falls back to returning the stored text: sending ciphertext upstream as if it were a
    key would look like an auth failure and quarantine a good key.
    """
    fernet = _multifernet(_key_tuple(keys))
    try:
        raw = fernet.decrypt(token.encode("utf-8"))
        return raw.decode("utf-8")
    except (InvalidToken, UnicodeError, AttributeError, TypeError):
        # `from None`: the cause would only add noise, and must never add the token.
        raise SecretDecryptionError(
            "cannot decrypt upstream key: none of the configured LLMROTATE_ENCRYPTION_KEYS "
            "match; was the key list changed?"
        ) from None


def reencrypt_secret(token: str, *, keys: Sequence[str] | None = None) -> str:
    """The same secret encrypted under the current first key (after adding a new key)."""
    fernet = _multifernet(_key_tuple(keys))
    try:
        return fernet.rotate(token.encode("utf-8")).decode("ascii")
    except (InvalidToken, AttributeError, TypeError):
        raise SecretDecryptionError(
            "cannot re-encrypt upstream key: none of the configured LLMROTATE_ENCRYPTION_KEYS "
            "match; was the key list changed?"
        ) from None


def _key_tuple(keys: Sequence[str] | None) -> tuple[str, ...]:
    if keys is None:
        # Read lazily so this module imports without configured settings, and so tests that
        # override the setting are honoured on the next call.
        from django.conf import settings

        keys = getattr(settings, "LLMROTATE_ENCRYPTION_KEYS", None) or ()
    if isinstance(keys, str):  # one key, or a comma-separated list from an env var
        keys = [k for k in (part.strip() for part in keys.split(",")) if k]
    return tuple(keys)


@lru_cache(maxsize=8)
def _multifernet(keys: tuple[str, ...]) -> MultiFernet:
    # Cached by the key list itself, so changing the setting builds a new one.
    if not keys:
        raise SecretError("LLMROTATE_ENCRYPTION_KEYS is empty; cannot encrypt or decrypt keys")
    fernets = []
    for index, key in enumerate(keys):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError):
            raise SecretError(
                f"LLMROTATE_ENCRYPTION_KEYS[{index}] is not a valid Fernet key "
                "(32 url-safe base64-encoded bytes)"
            ) from None
    return MultiFernet(fernets)


# ---------------------------------------------------------------------------------------------
# References: secrets that never enter the database


def is_reference(value: str) -> bool:
    return isinstance(value, str) and value.startswith((ENV_PREFIX, FILE_PREFIX))


def resolve_reference(ref: str) -> str:
    """The secret behind `env://NAME` or `file://path` (read fresh on every call)."""
    if ref.startswith(ENV_PREFIX):
        name = ref[len(ENV_PREFIX) :]
        if not name:
            raise SecretError("env:// reference has no variable name")
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"environment variable {name} is not set (referenced as {ref})")
        if not value.strip():
            raise SecretError(f"environment variable {name} is empty (referenced as {ref})")
        return value.strip()
    if ref.startswith(FILE_PREFIX):
        path = ref[len(FILE_PREFIX) :]
        if not path:
            raise SecretError("file:// reference has no path")
        try:
            value = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            raise SecretError(f"cannot read secret file {path}: {reason}") from None
        value = value.rstrip("\r\n")
        if not value.strip():
            raise SecretError(f"secret file {path} is empty")
        return value
    raise SecretError("not a secret reference; expected env://NAME or file://path")


# ---------------------------------------------------------------------------------------------
# Client tokens: llmr_<8-char lookup prefix>_<43 url-safe chars, 256 random bits>

TOKEN_PREFIX = "llmr_"  # noqa: S105 (a label, not a secret)
_TOKEN_RE = re.compile(r"llmr_([a-z0-9]{8})_([A-Za-z0-9_-]{43})")
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits


def generate_client_token() -> tuple[str, str, str]:
    """(token, prefix, sha256_hex). Store prefix and hash; show the token once."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    token = f"{TOKEN_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return token, prefix, hash_token(token)


def hash_token(token: str) -> str:
    # A plain SHA-256 is right here, unlike for passwords: the token carries 256 random bits,
    # so there is nothing to brute-force, and a slow hash would only slow down every request.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def split_token(token: str) -> str | None:
    """The lookup prefix of a well-formed token, or None."""
    if not isinstance(token, str):
        return None
    match = _TOKEN_RE.fullmatch(token)
    return match.group(1) if match else None


def tokens_match(a_hash: str, b_hash: str) -> bool:
    # Constant time, so response timing does not reveal how much of a hash matched.
    return hmac.compare_digest(a_hash.encode("utf-8"), b_hash.encode("utf-8"))
