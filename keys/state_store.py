"""Where key health lives between calls: in this process, or in Redis shared by every process.

The proxy's hot path uses the async methods; admin actions, monitoring, re-check jobs and tests
use the sync ones. Both backends run the same pure transitions from keys.health, so behaviour
only differs in who else can see the state.

The interface and the in-process backend are in keys.state_store_base, the Redis backend in
keys.state_store_redis (which builds on the former, so neither imports this module); this one
picks the store for the process, and everything other code uses stays importable from here.
"""

from __future__ import annotations

import threading

from keys.state_store_base import KeyStateStore as KeyStateStore
from keys.state_store_base import MemoryKeyStateStore as MemoryKeyStateStore
from keys.state_store_base import Snapshot as Snapshot
from keys.state_store_base import Transition as Transition
from keys.state_store_redis import PROBE_SLOT_TTL_SECONDS as PROBE_SLOT_TTL_SECONDS
from keys.state_store_redis import RedisKeyStateStore as RedisKeyStateStore

_store: KeyStateStore | None = None
_store_lock = threading.Lock()


def get_key_state_store() -> KeyStateStore:
    """The process-wide store: Redis when `settings.REDIS_URL` is set, else in process."""
    global _store
    if _store is None:
        with _store_lock:
            if _store is None:
                from django.conf import settings

                url = getattr(settings, "REDIS_URL", "")
                prefix = getattr(settings, "LLMROTATE_REDIS_PREFIX", "llmrotate:")
                _store = RedisKeyStateStore(url, prefix=prefix) if url else MemoryKeyStateStore()
    return _store


def reset_key_state_store() -> None:
    """Forget the singleton (tests, or after changing settings)."""
    global _store
    with _store_lock:
        old, _store = _store, None
    if isinstance(old, RedisKeyStateStore):
        old.close()
