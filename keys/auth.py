"""Who is calling: client tokens (`Authorization: Bearer llmr_…`, or `x-api-key: llmr_…` as
the anthropic SDK sends it) and staff sessions.

All are ninja auth classes that put the principal on `request.auth`. They are async so that
async operations (the proxy) never touch the database on the event loop; ninja also runs them
for sync operations.

An Anthropic client gets its 401/403 in Anthropic's envelope: llmrotate_site.api renders every
error of the request in the envelope common.errors.anthropic_caller picks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.http import HttpRequest
from ninja.security import APIKeyHeader, HttpBearer
from ninja.security.base import AuthBase

from common.errors import forbidden, unauthenticated
from keys.crypto import TOKEN_PREFIX, hash_token, split_token, tokens_match
from keys.routing import TokenInfo, routing_snapshot
from keys.services import client_token_lookup_prefix

# What a staff session needs to read the monitoring API and the dashboard (superusers have
# every permission). Client tokens need the `monitor` scope instead.
MONITOR_PERMISSION = "usage.view_callrecord"

logger = logging.getLogger("llmrotate.auth")


class _RejectedTokenLog:
    """One warning line per source address per `interval` seconds at most, in this process;
    the rejections held back in between are counted in the next line from that address.

    A flood of bad tokens must neither flood the log nor slow the proxy: no I/O but the log
    line, and a table of recent addresses kept bounded.
    """

    MAX_ADDRESSES = 10_000

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        # address -> (time of its last line, rejections held back since)
        self._seen: dict[str, tuple[float, int]] = {}

    def __call__(self, address: str, token: str, reason: str) -> None:
        now = time.monotonic()
        last = self._seen.get(address)
        if last is not None and now - last[0] < self.interval:
            self._seen[address] = (last[0], last[1] + 1)
            return
        if len(self._seen) >= self.MAX_ADDRESSES:
            # Forget the quiet addresses; should a flood from that many addresses fill the
            # table all the same, start over rather than let it grow or slow every rejection.
            self._seen = {a: e for a, e in self._seen.items() if now - e[0] < self.interval}
            if len(self._seen) >= self.MAX_ADDRESSES // 2:
                self._seen.clear()
        self._seen[address] = (now, 0)
        held_back = last[1] if last is not None else 0
        logger.warning(
            "rejected %s client token %s from %s%s",
            reason,
            _token_hint(token),
            address,
            f" (and {held_back} more from this address since its last line)" if held_back else "",
        )


def _token_hint(token: str) -> str:
    """The lookup prefix, never more: `llmr_ab12cd34_…`, as the admin lists tokens."""
    prefix = split_token(token)
    if prefix is not None:
        return f"{TOKEN_PREFIX}{prefix}_…"
    # A token from configuration may have any shape; it is stored under a hash prefix.
    return f"of another shape (lookup prefix {client_token_lookup_prefix(token)})"


_log_rejected = _RejectedTokenLog()


async def client_token_verified(token: str, *, source: str) -> TokenInfo:
    """The token's TokenInfo if it is known and not revoked; a 401 (logged) if not. `source`
    is the caller's address, for the log. Scopes are the caller's to check."""
    snapshot = await routing_snapshot()
    info = snapshot.tokens.get(client_token_lookup_prefix(token))
    if info is None or not tokens_match(info.token_hash, hash_token(token)):
        _log_rejected(source, token, "invalid")
        raise unauthenticated("Invalid client token.")
    if info.revoked:
        _log_rejected(source, token, "revoked")
        raise unauthenticated("This client token has been revoked.", code="token_revoked")
    return info


async def _client_token(request: HttpRequest, token: str, *, scope: str) -> TokenInfo:
    source = str(request.META.get("REMOTE_ADDR") or "unknown")
    info = await client_token_verified(token, source=source)
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
        return await _client_token(request, token, scope=self.scope)


class ClientApiKeyAuth(APIKeyHeader):
    """The same client tokens in `x-api-key`, the header the anthropic SDK sends its key in.
    Listed after ClientTokenAuth: a bearer token wins when both are sent."""

    param_name = "x-api-key"
    is_async = True

    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope = scope

    async def authenticate(self, request: HttpRequest, key: str | None) -> TokenInfo | None:
        return await _client_token(request, key, scope=self.scope) if key else None


class StaffSessionAuth(AuthBase):
    """A logged-in, active staff user with MONITOR_PERMISSION (the admin's session cookie).
    Read-only use: no CSRF.

    Staff without the permission get a 403 that says what is missing, unless the request also
    carries a token, which then decides.
    """

    openapi_type = "apiKey"
    is_async = True

    def __init__(self) -> None:
        self.openapi_in = "cookie"
        self.openapi_name = "sessionid"
        super().__init__()

    async def __call__(self, request: HttpRequest) -> Any:
        user = await request.auser()
        if not (user.is_authenticated and user.is_active and user.is_staff):
            return None
        if await user.ahas_perm(MONITOR_PERMISSION):
            return user
        if "authorization" in request.headers:
            return None
        raise forbidden(
            f"Your account lacks the '{MONITOR_PERMISSION}' permission (Usage | call record | "
            "Can view call record) that reading the monitoring data needs.",
            code="missing_permission",
        )


proxy_auth = ClientTokenAuth("proxy")
# Endpoints the anthropic SDK calls: /v1/models (either SDK) and the Anthropic-only ones.
proxy_any_auth = [ClientTokenAuth("proxy"), ClientApiKeyAuth("proxy")]
# Staff session first: a browser on the dashboard has no token; then a `monitor` token.
monitor_auth = [StaffSessionAuth(), ClientTokenAuth("monitor")]
