"""Re-validation of quarantined keys, triggered when their quarantine timer has run out.

A key that failed authentication never returns on a timer alone: once its quarantine is over,
the proxy makes one cheap authenticated call (`GET {base_url}/models`, which spends no tokens)
in the background. Success moves the key to `probing`, where one good live call makes it
`active`; a 401/403 extends the quarantine.

`keys_revalidate` does the same on a schedule, for keys that see no traffic, and also for
exhausted keys: a Celery beat task when key state is in Redis, or a loop in the web process in
embedded mode, where key state lives in that process and a worker could not see it. The loop
follows the beat entry all the same (its switch and interval in the admin's Periodic tasks), so
that the operator has one place to turn it off or slow it down in either mode (the site hands
that entry's schedule in: llmrotate_site.beat.keys_revalidation_schedule).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from common.background import spawn
from common.db import run_outside_request
from common.upstream import upstream_client, upstream_clients_close, upstream_headers
from keys.health import KeyPolicy, KeyState, KeyStatus
from keys.health import needs_recheck as _needs_recheck
from keys.routing import ProviderInfo, RoutingSnapshot, UpstreamKey, routing_load, routing_snapshot
from keys.state_store import get_key_state_store

logger = logging.getLogger("llmrotate.keys")

# Per process, a key is re-checked at most this often, however many requests notice it.
RECHECK_INTERVAL_SECONDS = 30.0
# How often the embedded loop re-reads its beat entry: the delay before an admin change shows.
SCHEDULE_POLL_SECONDS = 30.0
_last_attempt: dict[str, float] = {}


def needs_recheck(state: KeyState, *, now: float, policy: KeyPolicy) -> bool:
    return _needs_recheck(state, now, policy=policy)


def schedule(provider: ProviderInfo, key: UpstreamKey) -> None:
    now = time.monotonic()
    if now - _last_attempt.get(key.key_id, -RECHECK_INTERVAL_SECONDS) < RECHECK_INTERVAL_SECONDS:
        return
    _last_attempt[key.key_id] = now
    spawn(recheck_key(provider, key))


async def recheck_key(
    provider: ProviderInfo, key: UpstreamKey, *, now: float | None = None
) -> bool | None:
    """Returns True (valid), False (rejected) or None (inconclusive: upstream down)."""
    try:
        response = await upstream_client(provider.base_url).get(
            f"{provider.base_url}/models",
            headers=upstream_headers(provider.kind, key.secret, stream=False),
            timeout=10.0,
        )
    except httpx.HTTPError as exc:
        logger.info("re-check of key %s inconclusive: %s", key.key_id, type(exc).__name__)
        return None
    if response.status_code in (401, 403):
        ok = False
    elif response.is_success:
        ok = True
    else:
        logger.info("re-check of key %s inconclusive: HTTP %s", key.key_id, response.status_code)
        return None
    store = get_key_state_store()
    await asyncio.to_thread(
        store.recheck, key.key_id, ok=ok, now=time.time() if now is None else now,
        policy=provider.policy,
    )  # fmt: skip
    logger.warning("key %s re-check %s", key.key_id, "passed" if ok else "failed")
    return ok


def _revalidation_due(state: KeyState, *, now: float, policy: KeyPolicy) -> bool:
    return needs_recheck(state, now=now, policy=policy) or state.status == KeyStatus.EXHAUSTED


async def keys_revalidate(
    *, snapshot: RoutingSnapshot, now: float | None = None
) -> dict[str, bool | None]:
    """Re-check every routed key that is quarantined (wait over) or exhausted, concurrently.
    Returns key id -> True (valid, now `probing`), False (rejected) or None (inconclusive)."""
    now = time.time() if now is None else now
    keys: dict[str, tuple[ProviderInfo, UpstreamKey]] = {}
    for route in snapshot.configured_routes():
        for deployment in route.deployments:
            for key in deployment.provider.keys:
                keys.setdefault(key.key_id, (deployment.provider, key))
    if not keys:
        return {}
    store = get_key_state_store()
    states = await asyncio.to_thread(store.get_many, list(keys), now=now)
    due = [
        (provider, key)
        for provider, key in keys.values()
        if _revalidation_due(states[key.key_id][0], now=now, policy=provider.policy)
    ]
    results = await asyncio.gather(*(recheck_key(p, k, now=now) for p, k in due))
    return {key.key_id: ok for (_, key), ok in zip(due, results, strict=True)}


def keys_revalidate_blocking() -> dict[str, bool | None]:
    """`keys_revalidate` for a synchronous caller (the Celery task), on a fresh snapshot."""
    snapshot = routing_load()

    async def run() -> dict[str, bool | None]:
        try:
            return await keys_revalidate(snapshot=snapshot)
        finally:
            await upstream_clients_close()  # clients are per loop; this loop ends here

    return asyncio.run(run())


async def keys_revalidate_forever(*, schedule: Callable[[], tuple[bool, float]]) -> None:
    """The embedded web process's own schedule (see the module docstring). `schedule` says
    whether the job is on and how often it runs; the site reads it from the beat entry."""
    loop = asyncio.get_running_loop()
    last_run = loop.time()
    enabled, every = True, SCHEDULE_POLL_SECONDS
    while True:
        try:
            # One indexed row, read on the gateway's database thread, outside any request:
            # the connection is recycled there (common.db).
            enabled, every = await run_outside_request(schedule)
        except Exception:
            logger.exception("cannot read the key re-validation schedule; keeping the last one")
        wait = last_run + every - loop.time()
        if wait > 0:
            await asyncio.sleep(min(wait, SCHEDULE_POLL_SECONDS))
            continue
        last_run = loop.time()
        if not enabled:
            continue  # switched off in the admin: skip this turn, look again next time
        try:
            await keys_revalidate(snapshot=await routing_snapshot())
        except Exception:
            logger.exception("scheduled key re-validation failed")
