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
import math
import time
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.security import APIKeyHeader, HttpBearer
from ninja.security.base import AuthBase

from common.errors import ApiError, forbidden, unauthenticated
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
# What a token whose prefix matches none is compared with: no token hashes to it.
_NO_TOKEN_HASH = "0" * 64


class _FailedAuthLimiter:
    """Locks out a source address that sent LLMROTATE_AUTH_FAILURES_PER_MINUTE rejected tokens
    within a minute, for the rest of that minute, in this process.

    The window is fixed: it starts at the address's first rejection and lasts WINDOW seconds.
    While an address is locked out its requests are refused without looking at their token, a
    valid one included (as fail2ban does): a guesser that hits a valid token learns nothing
    until the window ends, and checking costs nothing. Tokens carry 256 random bits, so this
    is not what keeps them from being guessed; it keeps a flood of guesses from costing the
    gateway its log, its hashing and its routing lookups, and makes it visible.
    """

    WINDOW = 60.0
    MAX_ADDRESSES = 10_000

    def __init__(self) -> None:
        # address -> (start of its window, rejections in it)
        self._seen: dict[str, tuple[float, int]] = {}

    @staticmethod
    def _limit() -> int:
        return int(getattr(settings, "LLMROTATE_AUTH_FAILURES_PER_MINUTE", 20) or 0)

    def locked_for(self, address: str, now: float | None = None) -> float | None:
        """Seconds left of the address's lockout, or None when it is not locked out."""
        limit = self._limit()
        entry = self._seen.get(address)
        if limit <= 0 or entry is None or entry[1] < limit:
            return None
        now = time.monotonic() if now is None else now
        left = entry[0] + self.WINDOW - now
        if left <= 0:
            del self._seen[address]
            return None
        return left

    def failed(self, address: str, token: str, now: float | None = None) -> None:
        limit = self._limit()
        if limit <= 0:
            return
        now = time.monotonic() if now is None else now
        entry = self._seen.get(address)
        if entry is None or now - entry[0] >= self.WINDOW:
            if entry is None and len(self._seen) >= self.MAX_ADDRESSES:
                self._forget(now)
            entry = (now, 0)
        count = entry[1] + 1
        self._seen[address] = (entry[0], count)
        if count == limit:
            # Once per window: the requests refused during it are not logged one by one.
            logger.warning(
                "locking out %s for %d s: %d rejected client tokens within a minute (the last "
                "%s); its requests are refused with 429 until then",
                address,
                math.ceil(entry[0] + self.WINDOW - now),
                count,
                _token_hint(token),
            )

    def _forget(self, now: float) -> None:
        # Windows that are over first; should a flood from that many addresses fill the table
        # all the same, start over rather than let it grow (the lockouts in it end early).
        self._seen = {a: e for a, e in self._seen.items() if now - e[0] < self.WINDOW}
        if len(self._seen) >= self.MAX_ADDRESSES // 2:
            self._seen.clear()

    def clear(self) -> None:
        self._seen.clear()


_failed_auth = _FailedAuthLimiter()


def failed_auth_forget() -> None:
    """Forget every address's rejections and lockouts (tests)."""
    _failed_auth.clear()


def too_many_failed_auth(retry_after: float) -> ApiError:
    error = ApiError(
        429,
        "Too many requests with an invalid client token from this address; try again in "
        f"{math.ceil(retry_after)} s.",
        type="requests",
        code="too_many_failed_auth",
        retry_after=retry_after,
    )
    return error.with_anthropic_type("rate_limit_error")


def _rejected(source: str, token: str, reason: str) -> None:
    _log_rejected(source, token, reason)
    _failed_auth.failed(source, token)


async def client_token_verified(token: str, *, source: str) -> TokenInfo:
    """The token's TokenInfo if it is known, not revoked and not expired; a 401 (logged) if
    not, and a 429 without looking at the token while `source` (the caller's address) is
    locked out for sending too many rejected tokens. Scopes are the caller's to check."""
    locked = _failed_auth.locked_for(source)
    if locked is not None:
        raise too_many_failed_auth(locked)
    snapshot = await routing_snapshot()
    info = snapshot.tokens.get(client_token_lookup_prefix(token))
    # Compared even when no token has that prefix, so that the time taken does not tell
    # whether one has.
    matched = tokens_match(info.token_hash if info else _NO_TOKEN_HASH, hash_token(token))
    if info is None or not matched:
        _rejected(source, token, "invalid")
        raise unauthenticated("Invalid client token.")
    if info.revoked:
        _rejected(source, token, "revoked")
        raise unauthenticated("This client token has been revoked.", code="token_revoked")
    if info.expired(time.time()):
        _rejected(source, token, "expired")
        raise unauthenticated("This client token has expired.", code="token_expired")
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

    No header → None (ninja answers 401 "missing"); a wrong, revoked or expired token → 401; a
    valid token without the scope → 403; an address locked out for too many rejected tokens
    → 429. Tokens are checked against the cached routing snapshot, so
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
