"""Key pool monitoring on the ninja API: `/api/health`, `/api/keys`, `/api/config`.

Thin adapters over keys.selectors, behind `monitor_auth`. Nothing secret is ever returned: keys
appear as their id and masked `secret_hint`, client tokens as their masked prefix.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from django.http import HttpRequest
from ninja import Field, Router, Schema

from common.errors import AUTH_ERRORS
from keys import selectors
from keys.auth import monitor_auth

router = Router(tags=["Monitoring"], auth=monitor_auth)


class ProviderHealthOut(Schema):
    provider: str
    total: int = Field(description="Keys configured for the provider.")
    available: int = Field(description="Keys that may be handed out now.")
    states: dict[str, int] = Field(
        description="Keys per state: active, cooldown, exhausted, quarantined, probing, disabled."
    )


class HealthOut(Schema):
    status: str = Field(description="ok: every key available; degraded: some; down: none.")
    total_keys: int
    available_keys: int
    providers: list[ProviderHealthOut]


class KeyOut(Schema):
    key_id: str = Field(description="The key's id (a name, not the secret).")
    provider: str
    secret_hint: str = Field(description="The secret, masked: vendor prefix and last 4 chars.")
    enabled: bool
    health: str = Field(description="active, cooldown, exhausted, quarantined, probing, disabled.")
    available: bool = Field(description="May be handed out to a call now.")
    cooldown_until: datetime | None
    quarantine_until: datetime | None
    exhausted_until: datetime | None
    consecutive_failures: int
    total_successes: int
    total_failures: int
    last_used_at: datetime | None
    last_error_type: str | None
    remaining_requests: int | None = Field(description="Rate-limit headroom last seen.")
    remaining_tokens: int | None = Field(description="Token headroom last seen.")
    headroom_at: datetime | None = Field(description="When the headroom was seen.")
    in_flight: int = Field(description="Calls using the key right now.")


class KeysOut(Schema):
    keys: list[KeyOut]


class ConfigOut(Schema):
    strategy: str = Field(description="Default rotation strategy for new routes.")
    providers: list[dict[str, Any]] = Field(
        description="base_url with any userinfo and secret-looking query values masked."
    )
    routes: list[dict[str, Any]] = Field(description="Each with its ordered fallback_chain.")
    keys: list[dict[str, Any]] = Field(description="Masked: secret_hint and secret_source only.")
    clients: list[dict[str, Any]] = Field(description="Client tokens, masked.")
    settings: dict[str, Any]


@router.get(
    "/health", response={200: HealthOut, **AUTH_ERRORS}, summary="Key counts per provider, by state"
)
def health(request: HttpRequest) -> dict[str, Any]:
    return asdict(selectors.pool_health())


@router.get(
    "/keys",
    response={200: KeysOut, **AUTH_ERRORS},
    summary="Every upstream key with its live health",
)
def keys(request: HttpRequest) -> dict[str, Any]:
    return {"keys": [asdict(k) for k in selectors.keys_health()]}


@router.get(
    "/config",
    response={200: ConfigOut, **AUTH_ERRORS},
    summary="The running configuration, sanitized",
)
def config(request: HttpRequest) -> dict[str, Any]:
    return selectors.config_sanitized()
