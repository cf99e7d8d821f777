"""Who is calling: client tokens (`Authorization: Bearer llmr_…`, or `x-api-key: llmr_…` as
the anthropic SDK sends it) and staff sessions.

All are ninja auth classes that put the principal on `request.auth`. They are async so that
async operations (the proxy) never touch the database on the event loop; ninja also runs them
for sync operations.

An Anthropic client gets its 401/403 in Anthropic's envelope: llmrotate_site.api renders every
error of the request in the envelope proxy.errors.anthropic_caller picks.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.security import APIKeyHeader, HttpBearer
from ninja.security.base import AuthBase

from keys.crypto import hash_token, tokens_match
from keys.routing import TokenInfo, routing_snapshot
from keys.services import client_token_lookup_prefix
from proxy.errors import forbidden, unauthenticated


async def _client_token(token: str, *, scope: str) -> TokenInfo:
    snapshot = await routing_snapshot()
    info = snapshot.tokens.get(client_token_lookup_prefix(token))
    if info is None or not tokens_match(info.token_hash, hash_token(token)):
        raise unauthenticated("Invalid client token.")
    if info.revoked:
        raise unauthenticated("This client token has been revoked.", code="token_revoked")
    if scope not in info.scopes:
        raise forbidden(
            f"This client token does not have the '{scope}' scope.", code="missing_scope"
        )
    return info


class ClientTokenAuth(HttpBearer):
    """A client token with the given scope; its TokenInfo goes on `request.auth`.

    No header → None (ninja answers 401 "missing"); a wrong or revoked token → 401; a valid
    token without the scope → 403. Tokens are checked against the cached routing snapshot, so
    a revocation reaches every process within LLMROTATE_CONFIG_CACHE_SECONDS.
    """

    is_async = True  # tells ninja to await authenticate()

    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope = scope

    async def authenticate(self, request: HttpRequest, token: str) -> TokenInfo:
        return await _client_token(token, scope=self.scope)


class ClientApiKeyAuth(APIKeyHeader):
    """The same client tokens in `x-api-key`, the header the anthropic SDK sends its key in.
    Listed after ClientTokenAuth: a bearer token wins when both are sent."""

    param_name = "x-api-key"
    is_async = True

    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope = scope

    async def authenticate(self, request: HttpRequest, key: str | None) -> TokenInfo | None:
        return await _client_token(key, scope=self.scope) if key else None


class StaffSessionAuth(AuthBase):
    """A logged-in, active staff user (the admin's session cookie). Read-only use: no CSRF."""

    openapi_type = "apiKey"
    is_async = True

    def __init__(self) -> None:
        self.openapi_in = "cookie"
        self.openapi_name = "sessionid"
        super().__init__()

    async def __call__(self, request: HttpRequest) -> Any:
        user = await request.auser()
        if user.is_authenticated and user.is_active and user.is_staff:
            return user
        return None


proxy_auth = ClientTokenAuth("proxy")
# Endpoints the anthropic SDK calls: /v1/models (either SDK) and the Anthropic-only ones.
proxy_any_auth = [ClientTokenAuth("proxy"), ClientApiKeyAuth("proxy")]
# Staff session first: a browser on the dashboard has no token; then a `monitor` token.
monitor_auth = [StaffSessionAuth(), ClientTokenAuth("monitor")]
