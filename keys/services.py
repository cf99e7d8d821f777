"""Writes for providers' keys and client tokens.

Secrets pass through here and nowhere else: the functions below take a plaintext, encrypt it or
keep only its reference, and return warnings, never the plaintext. Every write that changes what
the proxy routes with ends with `invalidate_routing_cache()`, because each process caches
providers, keys, routes and tokens.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime
from types import EllipsisType
from typing import Literal

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from common.redaction import mask_secret
from keys.crypto import (
    ENV_PREFIX,
    FILE_PREFIX,
    LITERAL_PREFIX,
    SecretError,
    decrypt_secret,
    encrypt_secret,
    generate_client_token,
    hash_token,
    resolve_reference,
    split_token,
)
from keys.health import MANUAL_ACTIONS, ManualAction
from keys.models import ApiKey, ClientToken
from keys.routing import invalidate_routing_cache
from keys.state_store import get_key_state_store

LITERAL_WARNING = (
    "a literal secret is stored encrypted, but keeping it in a file is discouraged; "
    "prefer env://NAME or file://path"
)
# Environment variable names as POSIX shells accept them.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CLIENT_TOKEN_MIN_LENGTH = 20


def invalidate_routing_on_commit() -> None:
    # Now, so that this process sees the change at once (also inside a test's transaction), and
    # again after commit: a request served between the two may have cached the old rows.
    invalidate_routing_cache()
    transaction.on_commit(invalidate_routing_cache)


@dataclass(frozen=True)
class SecretSpec:
    """What a secret string given by a person means, before anything is stored."""

    kind: Literal["reference", "literal", "raw"]
    # The reference (`env://…`, `file://…`) or the plaintext.
    value: str


def api_key_parse_secret(*, secret: str) -> SecretSpec:
    """Classify a secret as given in the admin or a config file, validating reference syntax.

    Raises ValidationError for empty values and malformed references. `literal://` exists so that
    a config file can say explicitly "this is the key itself" (and be warned about it).
    """
    text = secret.strip()
    if not text:
        raise ValidationError("the secret is empty")
    if text.startswith(LITERAL_PREFIX):
        value = text[len(LITERAL_PREFIX) :]
        if not value:
            raise ValidationError("literal:// has no value")
        return SecretSpec("literal", value)
    if text.startswith(ENV_PREFIX):
        name = text[len(ENV_PREFIX) :]
        if not _ENV_NAME.match(name):
            raise ValidationError(
                "env:// must name an environment variable (letters, digits and '_')"
            )
        return SecretSpec("reference", text)
    if text.startswith(FILE_PREFIX):
        if not text[len(FILE_PREFIX) :]:
            raise ValidationError("file:// needs a path, e.g. file:///run/secrets/openai")
        return SecretSpec("reference", text)
    scheme = _SCHEME.match(text)
    if scheme:
        # `vault://…`, `ENV://…`: better an error than encrypting a typo as if it were a key.
        raise ValidationError(
            f"unknown secret scheme '{scheme.group(0)}'; use env://, file:// or literal://"
        )
    return SecretSpec("raw", text)


def api_key_set_secret(*, api_key: ApiKey, secret: str) -> list[str]:
    """Store a key's secret (encrypted, or as a reference) and save the key. Returns warnings.

    A reference that cannot be resolved right now is only a warning: the variable or file may
    exist only where the proxy runs (a container), not where the admin or import runs.
    """
    spec = api_key_parse_secret(secret=secret)
    warnings: list[str] = []
    if spec.kind == "reference":
        api_key.secret_ref = spec.value
        api_key.secret_encrypted = ""
        try:
            hint = mask_secret(resolve_reference(spec.value))
        except SecretError as exc:
            warnings.append(f"{spec.value} cannot be resolved here: {exc}")
            # The reference itself is not secret and tells the operator where the key lives.
            hint = spec.value
    else:
        if spec.kind == "literal":
            warnings.append(LITERAL_WARNING)
        api_key.secret_encrypted = encrypt_secret(spec.value)
        api_key.secret_ref = ""
        hint = mask_secret(spec.value)
    api_key.secret_hint = hint[:64]
    if api_key.pk is None:
        api_key.save()
    else:
        api_key.save(update_fields=["secret_encrypted", "secret_ref", "secret_hint", "updated_at"])
    invalidate_routing_on_commit()
    return warnings


def api_key_secret_matches(*, api_key: ApiKey, spec: SecretSpec) -> bool:
    """Whether storing `spec` would leave the key's secret as it is (for idempotent imports).

    References compare as strings (the value behind them is not ours); encrypted secrets are
    decrypted and compared, because Fernet ciphertexts differ on every encryption. Errors from
    decryption propagate.
    """
    if spec.kind == "reference":
        return api_key.secret_ref == spec.value
    if api_key.secret_ref or not api_key.secret_encrypted:
        return False
    return decrypt_secret(api_key.secret_encrypted) == spec.value


def api_key_save(*, api_key: ApiKey, secret: str | None = None) -> list[str]:
    """Save a key's plain fields and, when given, a new secret. Returns warnings.

    A new key must come with a secret: a key the proxy cannot authenticate with would only fail
    at request time.
    """
    if api_key.pk is None and not secret:
        raise ValidationError("a new key needs a secret")
    with transaction.atomic():
        if secret:
            if api_key.pk is not None:
                api_key.save()
            return api_key_set_secret(api_key=api_key, secret=secret)
        api_key.save()
    invalidate_routing_on_commit()
    return []


def api_key_health_action(*, api_key: ApiKey, action: ManualAction) -> None:
    """An operator's disable / enable / reset.

    `disable` and `enable` also flip `enabled` so that the decision survives a lost state store
    (an in-process store forgets on restart); `reset` only clears the live health state.
    """
    if action not in MANUAL_ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    get_key_state_store().manual(api_key.key_id, action, now=time.time())
    if action in ("disable", "enable"):
        enabled = action == "enable"
        if api_key.enabled != enabled:
            api_key.enabled = enabled
            api_key.save(update_fields=["enabled", "updated_at"])
    invalidate_routing_on_commit()


def client_token_lookup_prefix(token: str) -> str:
    """The prefix a client token is stored and looked up under.

    Generated tokens carry it (`llmr_<prefix>_<secret>`). Tokens supplied from configuration
    (e.g. an `env://` variable holding any string) may have any shape, so for those the prefix
    is the first 8 hex digits of the token's SHA-256: derivable at lookup time without a scan,
    and revealing nothing useful about the token. The proxy must use this function too.
    """
    return split_token(token) or hashlib.sha256(token.encode()).hexdigest()[:8]


def _validate_client_fields(*, routes: list[str], scopes: list[str]) -> None:
    if not isinstance(routes, list) or not all(isinstance(r, str) and r for r in routes):
        raise ValidationError("routes must be a list of route names (or ['*'])")
    allowed = set(ClientToken.Scope.values)
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValidationError("scopes must be a list")
    unknown = [s for s in scopes if s not in allowed]
    if unknown:
        raise ValidationError(
            f"unknown scope {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}"
        )


def _token_credentials(token: str) -> tuple[str, str]:
    if len(token) < CLIENT_TOKEN_MIN_LENGTH:
        raise ValidationError(
            f"a client token must be at least {CLIENT_TOKEN_MIN_LENGTH} characters long"
        )
    return client_token_lookup_prefix(token), hash_token(token)


def _ensure_prefix_free(prefix: str, *, exclude_pk: int | None = None) -> None:
    clash = ClientToken.objects.filter(prefix=prefix)
    if exclude_pk is not None:
        clash = clash.exclude(pk=exclude_pk)
    if clash.exists():
        # Almost always the same token configured for two clients.
        raise ValidationError("this token (or its prefix) is already used by another client")


def client_token_create(
    *,
    name: str,
    routes: list[str],
    scopes: list[str],
    token: str | None = None,
    never_replace: bool = False,
    expires_at: datetime | None = None,
) -> tuple[ClientToken, str]:
    """Create a client token; returns it with the plaintext, which the caller shows ONCE.

    With `token=None` a new `llmr_…` token is generated. A given token (from configuration) is
    accepted when at least 20 characters long, whatever its shape; see
    `client_token_lookup_prefix` for how it is found again. `expires_at` (aware) ends its
    validity; None: it never expires.
    """
    _validate_client_fields(routes=routes, scopes=scopes)
    if token is None:
        token, prefix, token_hash = generate_client_token()
    else:
        prefix, token_hash = _token_credentials(token)
    _ensure_prefix_free(prefix)
    client = ClientToken(
        name=name,
        prefix=prefix,
        token_hash=token_hash,
        routes=routes,
        scopes=scopes,
        never_replace=never_replace,
        expires_at=expires_at,
    )
    client.full_clean(exclude=["prefix", "token_hash"])
    client.save()
    invalidate_routing_on_commit()
    return client, token


def client_token_update(
    *,
    client_token: ClientToken,
    routes: list[str],
    scopes: list[str],
    token: str | None = None,
    never_replace: bool | None = None,
    expires_at: datetime | EllipsisType | None = ...,
) -> ClientToken:
    """Change what a client may do and, when `token` is given, replace its token (by hash).
    `never_replace` None keeps the current opt-out from replacement experiments; `expires_at`
    left out keeps the current expiry (None: never expires)."""
    _validate_client_fields(routes=routes, scopes=scopes)
    client_token.routes = routes
    client_token.scopes = scopes
    if never_replace is not None:
        client_token.never_replace = never_replace
    if not isinstance(expires_at, EllipsisType):
        client_token.expires_at = expires_at
    if token is not None:
        prefix, token_hash = _token_credentials(token)
        _ensure_prefix_free(prefix, exclude_pk=client_token.pk)
        client_token.prefix, client_token.token_hash = prefix, token_hash
    client_token.save()
    invalidate_routing_on_commit()
    return client_token


def client_token_revoke(*, token: ClientToken) -> None:
    """Revoke a client token. Revoking twice keeps the first revocation time."""
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    invalidate_routing_on_commit()
