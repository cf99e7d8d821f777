"""Tokens that are almost right, tokens that are no longer right (revoked, expired), tokens of
the wrong kind (scopes), a timing-safe comparison for every token shape, and a source address
that guesses: locked out after LLMROTATE_AUTH_FAILURES_PER_MINUTE rejected tokens, on the
proxy's early check and on the monitoring API alike (docs/security.md)."""

from __future__ import annotations

import hmac
import json
import logging
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

import keys.auth
import keys.crypto
from keys.auth import _FailedAuthLimiter, client_token_verified
from keys.config_io import config_export, config_import
from keys.models import ClientToken
from keys.routing import invalidate_routing_cache
from keys.services import client_token_create, client_token_lookup_prefix
from tests.hostile.conftest import AnthropicGateway, Caller, anthropic_error, openai_error

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("lenient_upstream")]

CHAT = json.dumps({"model": "claude", "messages": [{"role": "user", "content": "hi"}]}).encode()
MESSAGE = json.dumps(
    {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
).encode()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def chat(caller: Caller, token: str, **kw: Any) -> Any:
    return caller.request("POST", "/v1/chat/completions", content=CHAT, headers=bearer(token), **kw)


def messages(caller: Caller, token: str, **kw: Any) -> Any:
    headers = {"x-api-key": token, "anthropic-version": "2023-06-01"}
    return caller.request("POST", "/v1/messages", content=MESSAGE, headers=headers, **kw)


def models(caller: Caller, token: str, **kw: Any) -> Any:
    return caller.request("GET", "/v1/models", headers=bearer(token), **kw)


def usage(caller: Caller, token: str, **kw: Any) -> Any:
    return caller.request("GET", "/api/usage", headers=bearer(token), **kw)


def flip(char: str) -> str:
    return "b" if char == "a" else "a"


def near_misses(token: str) -> dict[str, str]:
    """A valid `llmr_<prefix>_<secret>` token, each time a little wrong."""
    _, prefix, secret = token.split("_", 2)
    return {
        "last character off": token[:-1] + flip(token[-1]),
        "first secret character off": f"llmr_{prefix}_{flip(secret[0])}{secret[1:]}",
        "prefix character off": f"llmr_{flip(prefix[0])}{prefix[1:]}_{secret}",
        "right prefix, another secret": f"llmr_{prefix}_{'A' * len(secret)}",
        "one character short": token[:-1],
        "one character more": token + "x",
        "other case": token.upper(),
        "label missing": token.removeprefix("llmr_"),
        "secret alone": secret,
    }


def test_a_token_that_is_almost_right_is_refused_everywhere(
    anthropic_gateway: AnthropicGateway, caller: Caller
):
    assert chat(caller, anthropic_gateway.token).status_code == 200  # the right one works
    proxy_misses = near_misses(anthropic_gateway.token)
    monitor_misses = near_misses(anthropic_gateway.monitor_token)
    for miss, token in proxy_misses.items():
        for send in (chat, models):
            response = send(caller, token)
            assert response.status_code == 401, (miss, response.text)
            assert openai_error(response)["code"] == "invalid_api_key", miss
        response = messages(caller, token)
        assert response.status_code == 401, (miss, response.text)
        assert anthropic_error(response)["type"] == "authentication_error", miss
        response = usage(caller, monitor_misses[miss])
        assert response.status_code == 401, (miss, response.text)
        assert openai_error(response)["code"] == "invalid_api_key", miss
        # 18 misses from one address: the lockout (LLMROTATE_AUTH_FAILURES_PER_MINUTE) is
        # not what this test is about.
        keys.auth.failed_auth_forget()


def test_a_revoked_token_is_refused_on_both_entry_points(
    anthropic_gateway: AnthropicGateway, caller: Caller
):
    ClientToken.objects.filter(name="app").update(revoked_at=timezone.now())
    ClientToken.objects.filter(name="monitor").update(revoked_at=timezone.now())
    invalidate_routing_cache()
    _refused_everywhere(anthropic_gateway, caller, "token_revoked")


def test_a_token_past_its_expiry_is_refused_with_token_expired(
    anthropic_gateway: AnthropicGateway, caller: Caller
):
    soon = timezone.now() + timedelta(hours=1)
    ClientToken.objects.filter(name__in=["app", "monitor"]).update(expires_at=soon)
    invalidate_routing_cache()
    assert chat(caller, anthropic_gateway.token).status_code == 200  # not yet
    assert usage(caller, anthropic_gateway.monitor_token).status_code == 200

    past = timezone.now() - timedelta(seconds=1)
    ClientToken.objects.filter(name__in=["app", "monitor"]).update(expires_at=past)
    invalidate_routing_cache()
    _refused_everywhere(anthropic_gateway, caller, "token_expired")


def _refused_everywhere(gateway: AnthropicGateway, caller: Caller, code: str) -> None:
    """401 with `code` on the proxy's early check, its views, the monitoring API (OpenAI's
    envelope) and /v1/messages (Anthropic's)."""
    for response in (
        chat(caller, gateway.token),
        models(caller, gateway.token),
        usage(caller, gateway.monitor_token),
    ):
        assert response.status_code == 401, response.text
        error = openai_error(response)
        assert error["code"] == code and error["type"] == "authentication_error"
    response = messages(caller, gateway.token)
    assert response.status_code == 401 and anthropic_error(response)["code"] == code


def test_the_expiry_is_set_from_the_config_file_and_exported(transactional_db: None):
    token = "configured-client-token-0123456789"
    document = {"clients": [{"name": "ci", "token": f"literal://{token}"}]}
    config_import(
        data={
            **document,
            "clients": [{**document["clients"][0], "expires_at": "2027-01-01T00:00:00Z"}],
        }
    )
    client = ClientToken.objects.get(name="ci")
    assert (
        client.expires_at is not None
        and client.expires_at.isoformat() == "2027-01-01T00:00:00+00:00"
    )
    assert config_export()["clients"][0]["expires_at"] == "2027-01-01T00:00:00Z"

    config_import(data=document)  # left out: kept
    assert ClientToken.objects.get(name="ci").expires_at == client.expires_at
    config_import(data={"clients": [{"name": "ci", "expires_at": None}]})  # null: never
    assert ClientToken.objects.get(name="ci").expires_at is None
    assert "expires_at" not in config_export()["clients"][0]


async def test_the_expiry_reaches_the_routing_snapshot_from_client_token_create(
    transactional_db: None,
):
    from asgiref.sync import sync_to_async

    at = timezone.now() - timedelta(minutes=1)
    _, token = await sync_to_async(client_token_create)(
        name="short-lived", routes=["*"], scopes=["proxy"], expires_at=at
    )
    with pytest.raises(keys.auth.ApiError) as refused:
        await client_token_verified(token, source="192.0.2.1")
    assert refused.value.status == 401 and refused.value.code == "token_expired"


def test_a_token_without_the_scope_gets_403_in_the_callers_envelope(
    anthropic_gateway: AnthropicGateway, caller: Caller
):
    # A monitor-only token on the proxy: past the early check (it is a valid token), refused
    # by the view's scope check.
    for send in (chat, models):
        response = send(caller, anthropic_gateway.monitor_token)
        assert response.status_code == 403, response.text
        assert openai_error(response)["code"] == "missing_scope"
    response = messages(caller, anthropic_gateway.monitor_token)
    assert response.status_code == 403 and anthropic_error(response)["code"] == "missing_scope"
    # A proxy-only token on the monitoring API, and on /metrics.
    for path in ("/api/usage", "/v1/usage/stats", "/api/config", "/metrics"):
        response = caller.request("GET", path, headers=bearer(anthropic_gateway.token))
        assert response.status_code == 403, (path, response.text)
        assert openai_error(response)["code"] == "missing_scope"


# ---------------------------------------------------------------------------------------------
# Timing


async def test_every_token_shape_is_compared_in_constant_time(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
):
    from asgiref.sync import sync_to_async

    created = await sync_to_async(client_token_create)(name="g", routes=["*"], scopes=["proxy"])
    generated = created[1]
    configured = "a-configured-token-of-any-shape-0001"
    await sync_to_async(client_token_create)(
        name="c", routes=["*"], scopes=["proxy"], token=configured
    )
    shapes = {
        "generated, right": generated,
        "generated, wrong secret": generated[:-1] + flip(generated[-1]),
        "generated, unknown prefix": keys.crypto.generate_client_token()[0],
        "configured, right": configured,
        "configured, wrong": configured[:-1] + "2",
        "malformed": "llmr_x",
    }
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.crypto.hmac, "compare_digest", spy)
    for shape, sent in shapes.items():
        calls.clear()
        try:
            info = await client_token_verified(sent, source="192.0.2.7")
        except keys.auth.ApiError:
            info = None
        assert (info is not None) == shape.endswith("right"), shape
        stored = ClientToken.objects.filter(prefix=client_token_lookup_prefix(sent)).first
        stored_row = await sync_to_async(stored)()
        expected = stored_row.token_hash if stored_row else keys.auth._NO_TOKEN_HASH
        # Exactly one comparison, of the stored hash (or the stand-in, when no token has that
        # lookup prefix) with the hash of what was sent: never of the token's characters.
        assert calls == [(expected.encode(), keys.crypto.hash_token(sent).encode())], shape


# ---------------------------------------------------------------------------------------------
# Brute force


@pytest.fixture
def limit(settings: Any) -> int:
    settings.LLMROTATE_AUTH_FAILURES_PER_MINUTE = 5
    return 5


def test_an_address_that_sends_too_many_bad_tokens_is_locked_out(
    anthropic_gateway: AnthropicGateway,
    caller: Caller,
    limit: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    bad = near_misses(anthropic_gateway.token)["last character off"]
    attacker = "203.0.113.66"
    with caplog.at_level(logging.WARNING, logger="llmrotate.auth"):
        for _ in range(limit):
            assert chat(caller, bad, address=attacker).status_code == 401

        hashed: list[str] = []
        monkeypatch.setattr(keys.auth, "hash_token", lambda t: hashed.append(t) or "")
        refused = [
            chat(caller, bad, address=attacker),
            # A valid token from that address is refused too, for the rest of the window.
            chat(caller, anthropic_gateway.token, address=attacker),
            models(caller, anthropic_gateway.token, address=attacker),
            usage(caller, anthropic_gateway.monitor_token, address=attacker),
        ]
        for response in refused:
            assert response.status_code == 429, response.text
            error = openai_error(response)
            assert error["code"] == "too_many_failed_auth"
            assert 1 <= int(response.headers["retry-after"]) <= 60
        response = messages(caller, anthropic_gateway.token, address=attacker)
        assert response.status_code == 429
        error = anthropic_error(response)
        assert error["code"] == "too_many_failed_auth" and error["type"] == "rate_limit_error"
        assert hashed == []  # refused without looking at the token
    monkeypatch.undo()

    lockouts = [r.getMessage() for r in caplog.records if "locking out" in r.getMessage()]
    assert len(lockouts) == 1, lockouts  # once per window, however many refusals follow
    assert attacker in lockouts[0]
    assert bad not in lockouts[0] and bad.split("_")[2][:10] not in lockouts[0]
    # Another address is not concerned.
    assert chat(caller, anthropic_gateway.token, address="198.51.100.5").status_code == 200


def test_failures_on_the_monitoring_api_lock_out_the_proxy_too(
    anthropic_gateway: AnthropicGateway, caller: Caller, limit: int
):
    address = "203.0.113.67"
    for _ in range(limit):
        assert usage(caller, "not-a-token-but-long-enough-123", address=address).status_code == 401
    response = chat(caller, anthropic_gateway.token, address=address)
    assert response.status_code == 429 and openai_error(response)["code"] == "too_many_failed_auth"


def test_a_request_without_a_token_does_not_count_as_a_failure(
    anthropic_gateway: AnthropicGateway, caller: Caller, limit: int
):
    address = "203.0.113.68"
    for _ in range(limit * 3):
        assert (
            caller.request(
                "POST", "/v1/chat/completions", content=CHAT, address=address
            ).status_code
            == 401
        )
    assert chat(caller, anthropic_gateway.token, address=address).status_code == 200


def test_zero_turns_the_lockout_off(
    anthropic_gateway: AnthropicGateway, caller: Caller, settings: Any
):
    settings.LLMROTATE_AUTH_FAILURES_PER_MINUTE = 0
    address = "203.0.113.69"
    for _ in range(30):
        assert chat(caller, "llmr_wrong_token_000000000000", address=address).status_code == 401
    assert chat(caller, anthropic_gateway.token, address=address).status_code == 200


def test_the_lockout_ends_with_its_window(settings: Any):
    settings.LLMROTATE_AUTH_FAILURES_PER_MINUTE = 3
    limiter = _FailedAuthLimiter()
    for second in (0.0, 10.0, 20.0):
        assert limiter.locked_for("a", now=second) is None
        limiter.failed("a", "x", now=second)
    # The window started at the first failure: 60 s from then.
    assert limiter.locked_for("a", now=20.0) == pytest.approx(40.0)
    assert limiter.locked_for("a", now=59.9) == pytest.approx(0.1)
    assert limiter.locked_for("a", now=60.0) is None
    # A failure after the window opens a new one, counted from one.
    limiter.failed("a", "x", now=61.0)
    assert limiter.locked_for("a", now=61.0) is None


def test_failures_spread_over_windows_never_lock_out(settings: Any):
    settings.LLMROTATE_AUTH_FAILURES_PER_MINUTE = 3
    limiter = _FailedAuthLimiter()
    for minute in range(10):
        for second in (0.0, 30.0):
            limiter.failed("a", "x", now=minute * 60.0 + second)
            assert limiter.locked_for("a", now=minute * 60.0 + second) is None


def test_the_table_of_addresses_stays_bounded(settings: Any, monkeypatch: pytest.MonkeyPatch):
    settings.LLMROTATE_AUTH_FAILURES_PER_MINUTE = 3
    monkeypatch.setattr(_FailedAuthLimiter, "MAX_ADDRESSES", 100)
    limiter = _FailedAuthLimiter()
    for n in range(1000):
        limiter.failed(f"10.0.{n // 256}.{n % 256}", "x", now=float(n) / 1000)
        assert len(limiter._seen) <= 100
