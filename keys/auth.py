"""Who is calling: client tokens (`Authorization: Bearer llmr_…`) and staff sessions.

Both are ninja auth classes that put the principal on `request.auth`. They are async so that
async operations (the proxy) never touch the database on the event loop; ninja also runs them
for sync operations.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.security import HttpBearer
from ninja.security.base import AuthBase

from keys.crypto import hash_token, tokens_match
from keys.routing import TokenInfo, routing_snapshot
from keys.services import client_token_lookup_prefix
from proxy.errors import forbidden, unauthenticated


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
        snapshot = await routing_snapshot()
        info = snapshot.tokens.get(client_token_lookup_prefix(token))
        if info is None or not tokens_match(info.token_hash, hash_token(token)):
            raise unauthenticated("Invalid client token.")
        if info.revoked:
            raise unauthenticated("This client token has been revoked.", code="token_revoked")
        if self.scope not in info.scopes:
            raise forbidden(
                f"This client token does not have the '{self.scope}' scope.", code="missing_scope"
            )
        return info


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
# Staff session first: a browser on the dashboard has no token; then a `monitor` token.
monitor_auth = [StaffSessionAuth(), ClientTokenAuth("monitor")]
