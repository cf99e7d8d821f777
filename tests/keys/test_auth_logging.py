"""A rejected client token (unknown, wrong or revoked) is logged: one warning on
`llmrotate.auth` with the client address and the token's lookup prefix only, at most one line
per address per 10 s in a process, the rejections held back in between counted in the next."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from django.test import Client
from django.utils import timezone

import keys.auth
from keys.crypto import generate_client_token
from tests.factories import ClientTokenFactory

pytestmark = pytest.mark.django_db


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A fresh rate limit on a clock the test moves."""
    clock = Clock()
    monkeypatch.setattr(keys.auth, "_log_rejected", keys.auth._RejectedTokenLog())
    monkeypatch.setattr(keys.auth.time, "monotonic", clock)
    return clock


@pytest.fixture
def auth_log(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    with caplog.at_level(logging.WARNING, logger="llmrotate.auth"):
        yield lambda: [r.getMessage() for r in caplog.records if r.name == "llmrotate.auth"]


def call_with(token: str, address: str = "203.0.113.9", path: str = "/v1/models") -> int:
    client = Client(REMOTE_ADDR=address)
    return client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code


def test_a_bad_token_logs_one_line_with_the_address_and_a_masked_prefix(
    clock: Clock, auth_log: Callable[[], list[str]]
) -> None:
    good = ClientTokenFactory(scopes=["proxy"])
    assert call_with(good.raw_token) == 200  # logs nothing
    token = generate_client_token()[0]
    prefix = token.split("_")[1]

    assert call_with(token) == 401

    assert auth_log() == [f"rejected invalid client token llmr_{prefix}_… from 203.0.113.9"]
    assert token[len(f"llmr_{prefix}_") :] not in auth_log()[0]


def test_a_token_of_another_shape_logs_only_its_lookup_prefix(
    clock: Clock, auth_log: Callable[[], list[str]]
) -> None:
    from keys.services import client_token_lookup_prefix

    call_with("sk-not-a-gateway-token-at-all-0123456789", path="/api/usage")

    lookup = client_token_lookup_prefix("sk-not-a-gateway-token-at-all-0123456789")
    assert auth_log() == [
        f"rejected invalid client token of another shape (lookup prefix {lookup}) from 203.0.113.9"
    ]


def test_a_revoked_token_is_logged_as_revoked(
    clock: Clock, auth_log: Callable[[], list[str]]
) -> None:
    revoked = ClientTokenFactory(scopes=["proxy"], revoked_at=timezone.now())

    assert call_with(revoked.raw_token) == 401

    assert auth_log() == [f"rejected revoked client token llmr_{revoked.prefix}_… from 203.0.113.9"]


def test_a_flood_of_bad_tokens_logs_one_line_per_address_per_ten_seconds(
    clock: Clock, auth_log: Callable[[], list[str]], settings
) -> None:
    # Without the lockout, which would refuse most of the flood before its token is looked at
    # (tests/hostile/test_auth.py).
    settings.LLMROTATE_AUTH_FAILURES_PER_MINUTE = 0
    token = generate_client_token()[0]
    for _ in range(50):
        call_with(token)
    call_with(token, address="198.51.100.1")  # another address has its own line
    assert len(auth_log()) == 2

    clock.now += 9.9
    call_with(token)
    assert len(auth_log()) == 2

    clock.now += 0.2
    call_with(token)
    assert len(auth_log()) == 3
    assert auth_log()[-1].endswith(
        "from 203.0.113.9 (and 50 more from this address since its last line)"
    )
