"""The gate reads and writes the database breaker store off any request (the /v1 path sends no
request signals), so it recycles its thread's connection itself: one the database dropped is
not used again and again.

Postgres only: an in-memory SQLite test database ignores closing, and never drops. The
database store is used here even though this leg's own store is Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import TypeVar
from unittest import mock

import pytest
from django.db import connection

from common import db
from common.db import db_thread_close
from healthchecks import breaker
from healthchecks.breaker import BreakerState
from healthchecks.breaker_store import DatabaseBreakerStore
from healthchecks.breakers import breaker_policy
from healthchecks.gate import BreakerGate
from tests.healthchecks.conftest import PRIMARY

T = TypeVar("T")
pytestmark = [
    pytest.mark.scaled,
    pytest.mark.asyncio,
    pytest.mark.usefixtures("transactional_db"),
]


@pytest.fixture(autouse=True)
def _close_the_gateway_thread_connection() -> Iterator[None]:
    yield
    asyncio.run(db_thread_close())


@pytest.fixture
def store() -> Iterator[DatabaseBreakerStore]:
    store = DatabaseBreakerStore()
    with mock.patch("healthchecks.gate.get_breaker_store", return_value=store):
        yield store


async def _in_other_thread(fn: Callable[[], T]) -> T:
    """Work of another process: its own connection, closed afterwards."""

    def run() -> T:
        try:
            return fn()
        finally:
            connection.close()

    return await asyncio.to_thread(run)


async def half_open(store: DatabaseBreakerStore) -> None:
    now = time.time()

    def fn(state: BreakerState) -> tuple[BreakerState, None]:
        tripped = breaker.trip(state, now=now, policy=breaker_policy(), reason="test")
        return dataclasses.replace(tripped, open_until=now - 1), None

    await _in_other_thread(lambda: store.update(PRIMARY, fn))


async def drop_the_gateway_thread_connection() -> None:
    """What a database restart or an idle timeout does to the connection the gateway's thread
    holds: it is gone on the server, and the client learns it only when it next uses it."""

    def pid() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return int(cursor.fetchone()[0])

    backend = await asyncio.get_running_loop().run_in_executor(db._db_executor(), pid)

    def terminate() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [backend])

    await _in_other_thread(terminate)


def new_gate() -> BreakerGate:
    return BreakerGate(policy=breaker_policy(), sync_seconds=60)


async def test_a_refresh_after_the_database_dropped_the_connection_reads_the_store(store):
    await half_open(store)
    gate = new_gate()
    await drop_the_gateway_thread_connection()
    await gate._refresh()
    # Read, not "cannot read the breaker store; serving the last known states".
    assert gate._states.get(PRIMARY, BreakerState()).status == "open"


async def test_a_trial_claim_after_the_database_dropped_the_connection_is_made(store):
    await half_open(store)
    gate = new_gate()
    await gate._refresh()
    await drop_the_gateway_thread_connection()
    admission = await gate.admit(PRIMARY)
    # Not the fail-open answer of a store that could not be reached: the one trial.
    assert admission.allowed and admission.trial
