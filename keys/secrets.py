"""Reading an upstream key's secret: the one place a plaintext key is produced, for the
upstream call only (the routing snapshot, the health checks' probes). A read, kept apart from
keys.services (the writes), which the routing snapshot would otherwise import and be imported
by."""

from __future__ import annotations

from common.redaction import register_secret
from keys.crypto import SecretError, decrypt_secret, resolve_reference
from keys.models import ApiKey


def api_key_resolve_secret(*, api_key: ApiKey) -> str:
    """The plaintext secret, for the upstream call only. Never log or display it.

    Raises SecretDecryptionError when the ciphertext does not decrypt with the configured keys
    and SecretError when a reference cannot be resolved: there is no fallback to stored text.
    """
    if api_key.secret_ref:
        secret = resolve_reference(api_key.secret_ref)
    elif api_key.secret_encrypted:
        secret = decrypt_secret(api_key.secret_encrypted)
    else:
        raise SecretError(f"key {api_key.key_id} has no secret")
    # Whatever gets logged from here on (an httpx error quoting headers, say) is masked.
    register_secret(secret)
    return secret
