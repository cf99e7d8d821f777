"""What a live request waits for at a half-open breaker: the one claim of its trial in the
shared store, never the notifications, and never a claim another request is already making."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from healthchecks.breaker_store import get_breaker_store
from healthchecks.gate import get_breaker_gate
from tests.healthchecks.conftest import BACKUP, PRIMARY, open_breaker

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("transactional_db")]


@pytest.fixture(autouse=True)
def _close_the_gateway_thread_connection() -> Iterator[None]:
    yield
    asyncio.run(sync_to_async(connections.close_all, thread_sensitive=True)())


async def half_open(endpoint: str) -> None:
    await sync_to_async(open_breaker, thread_sensitive=True)(endpoint, open_until=time.time() - 1)


async def test_claiming_the_trial_does_not_wait_for_a_slow_broker():
    await half_open(PRIMARY)
    broker_answers = threading.Event()
    announced: list[str] = []

    def slow_notify(**kwargs: Any) -> dict[str, Any]:
        broker_answers.wait(10)  # queueing the webhooks takes this long
        announced.append(kwargs["event"])
        return {}

    with mock.patch("healthchecks.breakers.health_change_notify", side_effect=slow_notify):
        admission = await asyncio.wait_for(get_breaker_gate().admit(PRIMARY), timeout=5)
        assert admission.allowed and admission.trial
        assert announced == []  # the request went on while the announcement waits
        broker_answers.set()
        deadline = time.monotonic() + 5
        while announced != ["breaker.half_open"]:
            assert time.monotonic() < deadline, f"announced {announced}"
            await asyncio.sleep(0.02)


async def test_requests_arriving_during_the_claim_go_elsewhere_without_a_store_write():
    await half_open(PRIMARY)
    gate = get_breaker_gate()
    await gate.admit(BACKUP)  # the process's first request loads its copy of every breaker
    store = get_breaker_store()
    with mock.patch.object(store, "update", wraps=store.update) as update:
        admissions = await asyncio.gather(*(gate.admit(PRIMARY) for _ in range(5)))
    assert [a.trial for a in admissions].count(True) == 1
    assert all(not a.allowed and a.retry_after for a in admissions if not a.trial)
    assert [c.args[0] for c in update.call_args_list] == [PRIMARY]
