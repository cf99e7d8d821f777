"""The key state store's interface, and its in-process backend (also Redis's fallback).

See keys.state_store, where the process-wide store is chosen; keys.state_store_redis has the
backend shared by every process.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from common import metrics, telemetry
from keys.health import (
    CallResult,
    KeyPolicy,
    KeyState,
    KeyStatus,
    ManualAction,
    apply_manual,
    apply_outcome,
    apply_recheck,
    effective_state,
)

Snapshot = dict[str, tuple[KeyState, int]]
Transition = Callable[[KeyState], KeyState]

_AVAILABLE = (KeyStatus.ACTIVE, KeyStatus.PROBING)


class WatchedTransition:
    """A transition that remembers the status its last run moved from and to, so that the
    store reports a change (the key transitions series, a span event) once, after it is
    committed: a Redis transaction may run it several times before one run wins.

    "From" is the stored status, not the effective one: a cooldown whose timer ran out is
    reported as cooldown -> active by the call that finds it over."""

    __slots__ = ("after", "before", "fn")

    def __init__(self, fn: Transition) -> None:
        self.fn = fn
        self.before: KeyStatus | None = None
        self.after: KeyStatus | None = None

    def __call__(self, state: KeyState) -> KeyState:
        new = self.fn(state)
        self.before, self.after = state.status, new.status
        return new

    def report(self, key_id: str, reason: str) -> None:
        before, after = self.before, self.after
        if before is None or after is None or before == after:
            return
        metrics.KEY_TRANSITIONS.inc(key_id, before.value, after.value, reason)
        telemetry.key_state_changed(key_id, before.value, after.value, reason)


def recheck_reason(ok: bool) -> str:
    return "recheck_ok" if ok else "recheck_failed"


class KeyStateStore(ABC):
    # async: the proxy hot path
    @abstractmethod
    async def snapshot(self, key_ids: Sequence[str], *, now: float) -> Snapshot:
        """Effective state and calls in flight for each key."""

    @abstractmethod
    async def record(self, key_id: str, result: CallResult) -> KeyState:
        """Apply what one call says about the key; returns the new state."""

    @abstractmethod
    async def acquire(self, key_id: str, *, now: float) -> bool:
        """Take a key for one call; False if it is unavailable or its one trial is taken."""

    @abstractmethod
    async def release(self, key_id: str) -> None:
        """The call that acquired the key is over (also frees a probe slot)."""

    @abstractmethod
    async def next_rr(self, name: str) -> int:
        """Next value of a round-robin counter shared by every process."""

    # sync: admin, monitoring, jobs, tests
    @abstractmethod
    def get_many(self, key_ids: Sequence[str], *, now: float) -> Snapshot: ...

    @abstractmethod
    def manual(self, key_id: str, action: ManualAction, *, now: float) -> KeyState: ...

    @abstractmethod
    def recheck(self, key_id: str, *, ok: bool, now: float, policy: KeyPolicy) -> KeyState: ...

    @abstractmethod
    def clear(self) -> None: ...


class MemoryKeyStateStore(KeyStateStore):
    """One process's view. A threading lock, not an asyncio one: admin threads touch it too.

    Nothing here awaits while holding the lock, so the event loop is never blocked for long.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, KeyState] = {}
        self._inflight: dict[str, int] = {}
        self._probes: set[str] = set()
        self._rr: dict[str, int] = {}

    async def snapshot(self, key_ids: Sequence[str], *, now: float) -> Snapshot:
        return self.get_many(key_ids, now=now)

    async def record(self, key_id: str, result: CallResult) -> KeyState:
        return self.watched(
            key_id, result.outcome.value, lambda state: apply_outcome(state, result)
        )

    async def acquire(self, key_id: str, *, now: float) -> bool:
        with self._lock:
            state = effective_state(self._states.get(key_id, KeyState()), now=now)
            if state.status not in _AVAILABLE:
                return False
            if state.status == KeyStatus.PROBING:
                if key_id in self._probes:
                    return False
                self._probes.add(key_id)
            self._inflight[key_id] = self._inflight.get(key_id, 0) + 1
            return True

    async def release(self, key_id: str) -> None:
        with self._lock:
            self._inflight[key_id] = max(0, self._inflight.get(key_id, 0) - 1)
            self._probes.discard(key_id)

    async def next_rr(self, name: str) -> int:
        with self._lock:
            self._rr[name] = self._rr.get(name, 0) + 1
            return self._rr[name]

    def get_many(self, key_ids: Sequence[str], *, now: float) -> Snapshot:
        with self._lock:
            states, inflight = self._states, self._inflight
            return {
                k: (effective_state(states.get(k, KeyState()), now=now), inflight.get(k, 0))
                for k in key_ids
            }

    def manual(self, key_id: str, action: ManualAction, *, now: float) -> KeyState:
        if action == "reset":
            self.forget_inflight(key_id)
        return self.watched(key_id, f"manual_{action}", lambda s: apply_manual(s, action, now=now))

    def forget_inflight(self, key_id: str) -> None:
        """A reset also forgets the calls counted in flight: one a bug or a crash never gave
        back would otherwise make the key look busy (or its trial taken) until a restart."""
        with self._lock:
            self._inflight.pop(key_id, None)
            self._probes.discard(key_id)

    def recheck(self, key_id: str, *, ok: bool, now: float, policy: KeyPolicy) -> KeyState:
        return self.watched(
            key_id, recheck_reason(ok), lambda s: apply_recheck(s, ok=ok, now=now, policy=policy)
        )

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self._inflight.clear()
            self._probes.clear()
            self._rr.clear()

    def watched(self, key_id: str, reason: str, fn: Transition) -> KeyState:
        watch = WatchedTransition(fn)
        new = self.apply(key_id, watch)
        watch.report(key_id, reason)
        return new

    def apply(self, key_id: str, fn: Transition) -> KeyState:
        """Run one pure transition under the lock (also the Redis store's outage fallback)."""
        with self._lock:
            new = self._states[key_id] = fn(self._states.get(key_id, KeyState()))
            return new
