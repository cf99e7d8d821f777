"""The circuit breakers as the proxy sees them, without waiting on the database or Redis.

`admit` (before a deployment is tried) reads this process's copy of every breaker; `observe`
(after each attempt) adds the outcome to this process's sliding window. Both are a few dict
operations. The shared store (healthchecks.breaker_store) is only touched in the background:

- The copy is reloaded every LLMROTATE_BREAKER_SYNC_SECONDS by `sync_forever`, a task the ASGI
  lifespan runs; no request waits for it (except the first one of the process). So a breaker
  opened elsewhere (by a probe in the worker, or by another web process) takes effect here
  within that interval. Without the lifespan (tests) a request that finds the copy stale
  starts a reload and goes on with the copy it has.
- A trip decided here applies here at once and is written to the store in the background.
- One write cannot be deferred: claiming the half-open trial. The worker's probes claim the
  same slot (healthchecks.services), and so do the other web processes (`serve --workers`,
  other hosts); a claim made in this process's copy and written later would leave a window in
  which two of them each send "the one trial". So the request that finds a breaker half-open
  awaits that single store update (a Redis transaction, or one locked row on the database),
  run in a thread while the event loop serves others. Requests of this process that find the
  claim under way go to their next deployment instead of queueing behind it, so it is one
  write per open period per endpoint and process.
- Announcing a change (log line, signal, webhooks queued on the broker) is never awaited by a
  request: it runs afterwards on a thread of its own, so a slow broker delays no call.

Whenever the store cannot be reached the gate fails open: traffic flows as if every breaker
were closed, and the failure is logged.

With LLMROTATE_CIRCUIT_BREAKER off the gate is open for good: `admit` lets every deployment be
tried, live traffic feeds no breaker, and the copy is never loaded. The probes still drive
the breakers' state in the store (healthchecks.services), so /internal/health and the
notifications still say what the breakers would do; only the proxy no longer acts on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TypeVar

from django.conf import settings

from common import telemetry
from common.background import spawn
from common.db import run_outside_request
from common.redaction import base_url_masked
from healthchecks import breaker
from healthchecks.breaker import BreakerPolicy, BreakerState, BreakerStatus, Window
from healthchecks.breaker_store import Transition, get_breaker_store, reset_breaker_store
from healthchecks.breakers import breaker_announce, breaker_policy

logger = logging.getLogger("llmrotate.health")
T = TypeVar("T")
# How long a request that finds a half-open breaker whose trial is in flight is told to wait.
_TRIAL_WAIT_SECONDS = 1.0
_WARN_EVERY_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    trial: bool = False  # this request is the half-open breaker's one trial
    retry_after: float | None = None  # when not allowed: seconds until it may be


ALLOW = Admission(True)


class BreakerGate:
    def __init__(self, *, policy: BreakerPolicy, sync_seconds: float, enabled: bool = True) -> None:
        self.policy = policy
        self.sync_seconds = sync_seconds
        self.enabled = enabled
        self._states: dict[str, BreakerState] = {}
        self._windows: dict[str, Window] = {}
        self._lock = threading.Lock()
        self._loaded = False
        self._loaded_at = float("-inf")
        self._refreshing = False
        self._warned_at = float("-inf")
        # The loop keeps only weak references to tasks; a collected task never runs.
        self._claiming: set[str] = set()  # endpoints whose trial this process is claiming
        # One thread, so that announcements keep the order of the changes they report.
        self._announcer = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="breaker-announce"
        )

    # ---- hot path

    async def admit(self, endpoint: str) -> Admission:
        if not self.enabled:
            return ALLOW
        await self._ensure_fresh()
        now = time.time()
        state = self._states.get(endpoint)
        if state is None:
            return ALLOW
        current = breaker.effective(state, now=now)
        if current.status == BreakerStatus.CLOSED:
            return ALLOW
        if current.status == BreakerStatus.OPEN:
            return Admission(False, retry_after=current.open_until - now)
        if current.trial_until > now or endpoint in self._claiming:
            return Admission(False, retry_after=_TRIAL_WAIT_SECONDS)

        def claim(s: BreakerState) -> tuple[BreakerState, bool]:
            return breaker.claim_trial(s, now=now, policy=self.policy)

        self._claiming.add(endpoint)
        try:
            after, claimed = await self._apply(endpoint, claim, now=now)
        except Exception as exc:
            self._warn("cannot claim the half-open trial", exc)
            return ALLOW
        finally:
            self._claiming.discard(endpoint)
        if claimed:
            return Admission(True, trial=True)
        if breaker.effective(after, now=now).status == BreakerStatus.CLOSED:
            return ALLOW  # a probe closed it meanwhile
        return Admission(False, retry_after=_TRIAL_WAIT_SECONDS)

    def observe(self, endpoint: str, *, failed: bool, trial: bool) -> None:
        """The outcome of one attempt on the endpoint. Never waits."""
        if not self.enabled:
            # Nothing enforces a trip: recording one would only announce what did not happen.
            return
        now = time.time()
        policy = self.policy
        if trial:
            reason = "trial request failed" if failed else "trial request succeeded"
            self._decide(
                endpoint,
                lambda s: (
                    breaker.trial_result(s, ok=not failed, now=now, policy=policy, reason=reason),
                    None,
                ),
                now=now,
            )
            return
        state = self._states.get(endpoint, BreakerState())
        if breaker.effective(state, now=now).status != BreakerStatus.CLOSED:
            return  # answers to requests sent before it opened: the trip already counted them
        with self._lock:
            window = self._windows.setdefault(endpoint, Window(policy))
            window.add(failed=failed, now=now)
            if not (failed and window.should_trip(now=now)):
                return
            calls, failures = window.totals(now=now)
            window.clear()
        reason = f"live traffic: {failures} of {calls} calls failed in {policy.window_seconds:g}s"
        self._decide(
            endpoint,
            lambda s: (breaker.trip(s, now=now, policy=policy, reason=reason), None),
            now=now,
        )

    def release(self, endpoint: str) -> None:
        """The trial this request claimed was never sent (no key of the endpoint could go)."""
        if not self.enabled:  # it claimed none
            return
        now = time.time()
        self._decide(endpoint, lambda s: (breaker.release_trial(s, now=now), None), now=now)

    # ---- background

    async def sync_forever(self) -> None:
        """Reload the copy every `sync_seconds` (run by the ASGI lifespan, cancelled at stop)."""
        if not self.enabled:  # nobody reads the copy
            return
        while True:
            if not self._refreshing:
                self._refreshing = True
                await self._refresh()
            await asyncio.sleep(self.sync_seconds)

    def _decide(self, endpoint: str, fn: Transition[None], *, now: float) -> None:
        """Apply `fn` to the local copy now, and to the shared store in the background."""
        with self._lock:
            self._states[endpoint] = fn(self._states.get(endpoint, BreakerState()))[0]

        async def write() -> None:
            try:
                await self._apply(endpoint, fn, now=now)
            except Exception as exc:
                self._warn("cannot update the breaker store", exc)

        spawn(write())

    async def _apply(
        self, endpoint: str, fn: Transition[T], *, now: float
    ) -> tuple[BreakerState, T]:
        def update() -> tuple[BreakerState, BreakerState, T]:
            return get_breaker_store().update(endpoint, fn)

        # On the gateway's database thread, as the routing snapshot's reloads: this may run
        # after the request that decided it has ended (common.db says why that matters).
        before, after, extra = await run_outside_request(update)
        with self._lock:
            self._states[endpoint] = after
        if breaker.transitions(before, after, now=now):
            telemetry.breaker_changed(
                base_url_masked(endpoint), before.status.value, after.status.value
            )
            spawn(self._announce(endpoint, before=before, after=after, now=now))
        return after, extra

    async def _announce(
        self, endpoint: str, *, before: BreakerState, after: BreakerState, now: float
    ) -> None:
        # Not on asgiref's shared thread either: the database reads of other requests queue
        # there, and would wait for the broker too.
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._announcer,
                functools.partial(
                    breaker_announce, endpoint=endpoint, before=before, after=after, now=now
                ),
            )
        except Exception:
            logger.exception(
                "circuit breakers: cannot announce a change of %s", base_url_masked(endpoint)
            )

    async def _ensure_fresh(self) -> None:
        if time.monotonic() - self._loaded_at < self.sync_seconds or self._refreshing:
            return
        self._refreshing = True
        if self._loaded:
            spawn(self._refresh())
        else:
            await self._refresh()  # the process's first request: nothing to serve stale yet

    async def _refresh(self) -> None:
        try:
            loaded = await run_outside_request(get_breaker_store().load_all)
        except Exception as exc:
            self._warn("cannot read the breaker store; serving the last known states", exc)
            loaded = None
        finally:
            self._refreshing = False
            self._loaded = True
            self._loaded_at = time.monotonic()
        if loaded is None:
            return
        with self._lock:
            for endpoint, local in self._states.items():
                stored = loaded.get(endpoint)
                # A change decided here may not have reached the store yet: keep the newer.
                if stored is None or local.changed_at > stored.changed_at:
                    loaded[endpoint] = local
            self._states = loaded

    def _warn(self, what: str, exc: Exception) -> None:
        moment = time.monotonic()
        if moment - self._warned_at >= _WARN_EVERY_SECONDS:
            self._warned_at = moment
            logger.warning("circuit breakers: %s (%s: %s)", what, type(exc).__name__, exc)


@functools.cache
def get_breaker_gate() -> BreakerGate:
    """This process's gate. First called on the event loop, so never built twice."""
    return BreakerGate(
        policy=breaker_policy(),
        sync_seconds=settings.LLMROTATE_BREAKER_SYNC_SECONDS,
        enabled=settings.LLMROTATE_CIRCUIT_BREAKER,
    )


def reset_breaker_gate() -> None:
    """Forget this process's breaker copy, windows and store client (tests, settings changes)."""
    if get_breaker_gate.cache_info().currsize:
        get_breaker_gate()._announcer.shutdown(wait=False)
    get_breaker_gate.cache_clear()
    reset_breaker_store()
