"""The gateway must not pile up Postgres connections.

Under ASGI, Django runs each request's synchronous work (here: the routing reload every
LLMROTATE_CONFIG_CACHE_SECONDS) in a thread of that request's own, so a connection kept open
for reuse (CONN_MAX_AGE > 0) is never reused: its thread is gone and the connection stays open
until the garbage collector happens to break its reference cycle. Django's documentation says to
disable persistent connections under ASGI for this reason.
"""

from __future__ import annotations

import gc

import pytest
from django.db import connection

from keys.routing import invalidate_routing_cache
from tests.e2e.conftest import LiveGateway

pytestmark = [pytest.mark.scaled, pytest.mark.timeout(60)]


def other_sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


def test_routing_reloads_do_not_leave_database_connections_open(live_gateway: LiveGateway, client):
    client.models.list()
    gc.collect()
    # Deterministic: only the gateway's own closing may end a connection, not a GC that
    # happens to run in between.
    gc.disable()
    try:
        before = other_sessions()
        for _ in range(8):
            invalidate_routing_cache()  # what the 5 s cache TTL does in production
            client.models.list()
        after = other_sessions()
    finally:
        gc.enable()
    assert after <= before + 1, f"{after - before} new idle connections after 8 routing reloads"
