"""Who is calling: client tokens (`Authorization: Bearer llmr_…`, or `x-api-key: llmr_…` as
the anthropic SDK sends it) and staff sessions.

All are ninja auth classes that put the principal on `request.auth`. They are async so that
async operations (the proxy) never touch the database on the event loop; ninja also runs them
for sync operations.

An Anthropic client (one that sends `anthropic-version` or `x-api-key`, or any caller of an
Anthropic-only endpoint) gets its 401/403 in Anthropic's envelope (proxy.errors).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.security import APIKeyHeader, HttpBearer
from ninja.security.base import AuthBase

from keys.crypto import hash_token, tokens_match
from keys.routing import TokenInfo, routing_snapshot
from keys.services import client_token_lookup_prefix
from proxy.errors import ProxyError, forbidden, unauthenticated


def anthropic_client(request: HttpRequest) -> bool:
    """Whether the caller speaks Anthropic's API (the anthropic SDK always sends the version)."""
    headers = request.headers
    return "anthropic-version" in headers or "x-api-key" in headers


async def _client_token(token: str, *, scope: str, anthropic: bool) -> TokenInfo:
    try:
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
    except ProxyError as exc:
        raise exc.for_anthropic() if anthropic else exc from None
    return info


class ClientTokenAuth(HttpBearer):
    """A client token with the given scope; its TokenInfo goes on `request.auth`.

    No header → None (ninja answers 401 "missing"); a wrong or revoked token → 401; a valid
    token without the scope → 403. Tokens are checked against the cached routing snapshot, so
    a revocation reaches every process within LLMROTATE_CONFIG_CACHE_SECONDS.
    `anthropic`: True on Anthropic's endpoints (every error in its envelope), None where
    either SDK may call (the envelope the caller's headers ask for), False elsewhere.
    """

    is_async = True  # tells ninja to await authenticate()

    def __init__(self, scope: str, *, anthropic: bool | None = False) -> None:
        super().__init__()
        self.scope = scope
        self.anthropic = anthropic

    async def authenticate(self, request: HttpRequest, token: str) -> TokenInfo:
        anthropic = anthropic_client(request) if self.anthropic is None else self.anthropic
        return await _client_token(token, scope=self.scope, anthropic=anthropic)


class ClientApiKeyAuth(APIKeyHeader):
    """The same client tokens in `x-api-key`, the header the anthropic SDK sends its key in.

    Listed after ClientTokenAuth: a bearer token wins when both are sent. Without either
    header, an Anthropic client gets its 401 here, in Anthropic's envelope; anyone else gets
    None, and with it ninja's (OpenAI-shaped) "missing token" answer.
    """

    param_name = "x-api-key"
    is_async = True

    def __init__(self, scope: str, *, anthropic: bool = False) -> None:
        super().__init__()
        self.scope = scope
        self.anthropic = anthropic

    async def authenticate(self, request: HttpRequest, key: str | None) -> TokenInfo | None:
        if not key:
            if self.anthropic or anthropic_client(request):
                raise unauthenticated(
                    "Missing client token: send 'x-api-key: <token>' or "
                    "'Authorization: Bearer <token>'.",
                    code="missing_api_key",
                ).for_anthropic()
            return None
        return await _client_token(key, scope=self.scope, anthropic=True)


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
proxy_any_auth = [ClientTokenAuth("proxy", anthropic=None), ClientApiKeyAuth("proxy")]
anthropic_auth = [
    ClientTokenAuth("proxy", anthropic=True),
    ClientApiKeyAuth("proxy", anthropic=True),
]
# Staff session first: a browser on the dashboard has no token; then a `monitor` token.
monitor_auth = [StaffSessionAuth(), ClientTokenAuth("monitor")]
