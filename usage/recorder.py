"""The call recording buffer: the proxy hands over one CallData per upstream attempt, and a
background thread writes them to the database in batches.

Why a thread and not the event loop: the proxy's hot path must never wait on the database, and
Django's ORM is synchronous. `record_call` only appends to a deque under a lock (microseconds);
pricing, the JSON log line and the write all happen in the flusher thread, which has its own
database connection (Django connections are per thread).

Tokenizing (the reconciliation count of every prompt, and estimates for calls whose upstream
reported no usage) has a thread of its own, which hands each record to the flusher once its
counts are filled: a count takes up to tens of milliseconds (tiktoken releases the GIL while it
encodes, so it runs beside the event loop), and a burst must not hold back the writes of every
other record. `flush` waits for the counts recorded before it; `stop` hands those still queued
to the flusher, which counts them itself (bounded, see usage/tokens.py) on its way out.

Nothing is dropped. A failed write keeps its batch in memory and is retried with exponential
backoff. Once the database has been failing for LLMROTATE_RECORD_SPOOL_AFTER_SECONDS, or past
LLMROTATE_RECORD_BUFFER_MAX records, what is held is spooled to fsync'd JSONL files in
LLMROTATE_SPOOL_DIR, replayed (each file in one transaction) once the database is back, or by
the next process to start if this one dies. So a process killed outright (SIGKILL, OOM) during
an outage loses at most the records of its last few seconds, not everything since the outage
began (docs/reliability.md). A graceful stop that cannot reach the database spools everything
it still holds.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connection, connections

from common import metrics
from keys.limits import Settlement
from usage.call_metrics import call_observe
from usage.calls import (
    PERSISTED_FIELDS,
    CallData,
    call_count_tokens,
    call_limit_settlements,
    call_prepare,
    calls_write,
    limits_settle_safely,
    rows_as_records,
)
from usage.spool import Row, spool_files, spool_replay_file, spool_write

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0
# The estimator counts records in batches of up to this many, gathered for up to this long.
ESTIMATE_BATCH = 64
ESTIMATE_GATHER_SECONDS = 0.02


class Recorder:
    """A thread-safe buffer with one flusher thread and one estimator thread. See the module
    docstring.

    Locking: `_lock` guards both deques, the thread handles, the estimate counters and the
    flush handshake, and is held only for O(1) work so the hot path never waits behind a write
    or an estimate. `_work_lock` serialises the writers (the flusher, or a caller flushing
    inline at interpreter exit) and guards `_pending`, the backoff state and the spool, so a
    batch is never written twice.
    """

    def __init__(
        self,
        *,
        flush_seconds: float | None = None,
        batch_size: int | None = None,
        buffer_max: int | None = None,
        spool_dir: Path | str | None = None,
        spool_after: float | None = None,
    ) -> None:
        self._flush_seconds = flush_seconds or settings.LLMROTATE_RECORD_FLUSH_SECONDS
        self._batch_size = batch_size or settings.LLMROTATE_RECORD_BATCH_SIZE
        self._buffer_max = buffer_max or settings.LLMROTATE_RECORD_BUFFER_MAX
        self._spool_dir = Path(spool_dir or settings.LLMROTATE_SPOOL_DIR)
        self._spool_after = (
            settings.LLMROTATE_RECORD_SPOOL_AFTER_SECONDS if spool_after is None else spool_after
        )

        self._lock = threading.Lock()
        self._buffer: deque[CallData] = deque()
        self._thread: threading.Thread | None = None
        self._exit = False
        self._wake = threading.Event()
        self._flush_cond = threading.Condition(self._lock)  # also: each estimate handed over
        self._flush_requested = 0
        self._flush_done = 0
        self._flush_ok = False
        # Records waiting for a token estimate; `_estimates_done` catches up with
        # `_estimates_queued` as each reaches the buffer, which is what flush() waits for.
        self._estimates: deque[CallData] = deque()
        self._estimator: threading.Thread | None = None
        self._estimate_cond = threading.Condition(self._lock)
        self._estimates_queued = 0
        self._estimates_done = 0

        self._work_lock = threading.Lock()
        self._pending: list[Row] = []  # prepared and logged, not yet committed
        # Limit settlements of the records prepared in this pass, applied together.
        self._settlements: list[Settlement] = []
        self._backoff = 0.0
        self._retry_at = 0.0
        self._failing_since: float | None = None  # the first failed write of the current run

    # --- called from any thread -------------------------------------------------------------

    def record(self, data: CallData) -> None:
        if data.needs_counting:
            with self._lock:
                if self._estimator is not None or self._start_estimator_locked() is not None:
                    self._estimates.append(data)
                    self._estimates_queued += 1
                    # Woken for the first record of a batch and when one is full: in between
                    # it is gathering (see _estimate_loop). A wake for every record was a
                    # thread switch, and a hand-over of the GIL, on every request. All: a
                    # retiring estimator may be waiting too, and would just leave.
                    if len(self._estimates) in (1, ESTIMATE_BATCH):
                        self._estimate_cond.notify_all()
                    return
            # No thread can start (interpreter exit): the flusher estimates it itself.
        self._enqueue(data)

    def _enqueue(self, data: CallData, *, estimated: bool = False) -> None:
        with self._lock:
            self._buffer.append(data)
            size = len(self._buffer)
            if estimated:
                self._estimates_done += 1
                self._flush_cond.notify_all()
            if self._thread is None:
                self._start_locked()
        if size >= self._batch_size or size > self._buffer_max:
            self._wake.set()

    def flush(self, timeout: float = 10) -> bool:
        """Write everything recorded before this call (and any spool files) to the database.

        Blocks the calling thread up to `timeout` seconds, retrying failed writes; the work
        itself runs on the flusher thread (so this is safe where the ORM is not, e.g. next to
        an event loop). True when it all committed."""
        deadline = time.monotonic() + timeout
        if not self._await_estimates(deadline):
            return False
        delay = 0.1
        while True:
            with self._lock:
                thread = self._thread or self._start_locked()
                self._flush_requested += 1
                target = self._flush_requested
            if thread is None:  # no thread can start at interpreter exit: do it here
                return self._flush_inline(deadline)
            self._wake.set()
            if self._await_pass(thread=thread, target=target, deadline=deadline):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    def _await_pass(self, *, thread: threading.Thread, target: int, deadline: float) -> bool:
        """Wait for the flusher to finish the pass requested as `target`; True if it wrote all.
        A later pass also covers ours: it drained the buffer after ours was requested."""
        with self._lock:
            self._flush_cond.wait_for(
                lambda: self._flush_done >= target or self._thread is not thread,
                timeout=max(0.0, deadline - time.monotonic()),
            )
            return self._flush_done >= target and self._flush_ok

    def _await_estimates(self, deadline: float) -> bool:
        """Wait until every estimate queued before this call has reached the buffer."""
        with self._lock:
            target = self._estimates_queued
            self._estimate_cond.notify_all()  # no gathering: this caller waits for them
            return self._flush_cond.wait_for(
                lambda: self._estimates_done >= target,
                timeout=max(0.0, deadline - time.monotonic()),
            )

    def stop(self, timeout: float = 10) -> bool:
        """Flush, then end the threads. Idempotent; a later `record` starts new ones.

        Whatever could not be written within `timeout` is spooled to disk, not lost. True when
        everything reached the database."""
        deadline = time.monotonic() + timeout
        with self._lock:
            estimator = self._retire_estimator_locked()
        estimated = True
        if estimator is not None:
            # It finishes the record in hand (bounded work) and hands it over.
            estimator.join(timeout)
            estimated = not estimator.is_alive()
        timeout = max(0.1, deadline - time.monotonic())
        with self._lock:
            thread = self._thread
        if thread is None:
            # Nothing to do unless records arrived while no thread could start (interpreter
            # exit); then write them here. Spool files are left for the next start.
            if not self.backlog:
                return estimated
            return self._flush_inline(time.monotonic() + timeout, spool_rest=True) and estimated
        ok = self.flush(timeout) and estimated
        with self._lock:
            # The exit pass reports like a flush: it writes (or spools) the last records.
            self._exit = self._thread is thread
            self._flush_requested += 1
            target = self._flush_requested
        self._wake.set()
        thread.join(timeout=max(timeout, 5.0))
        if thread.is_alive():
            logger.error("call recorder did not stop in time; %d records unwritten", self.backlog)
            return False
        with self._lock:
            return ok and self._flush_done >= target and self._flush_ok

    @property
    def backlog(self) -> int:
        """Records held in memory, not yet committed (spooled files not counted)."""
        estimating = self._estimates_queued - self._estimates_done
        return estimating + len(self._buffer) + len(self._pending)

    def _start_locked(self) -> threading.Thread | None:
        thread = threading.Thread(target=self._run, name="llmrotate-recorder", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return None
        self._thread = thread
        return thread

    # --- the estimator thread ---------------------------------------------------------------

    def _start_estimator_locked(self) -> threading.Thread | None:
        thread = threading.Thread(
            target=self._estimate_loop, name="llmrotate-estimator", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return None
        self._estimator = thread
        return thread

    def _estimate_loop(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._lock:
                    self._estimate_cond.wait_for(
                        lambda: self._estimates or self._estimator is not me
                    )
                    if self._estimator is me and len(self._estimates) < ESTIMATE_BATCH:
                        # Let a batch gather; a flush (or a full batch) cuts the wait short.
                        self._estimate_cond.wait(ESTIMATE_GATHER_SECONDS)
                    if self._estimator is not me:
                        return
                    estimates = self._estimates
                    batch = deque(
                        estimates.popleft() for _ in range(min(len(estimates), ESTIMATE_BATCH))
                    )
                try:
                    # Retired meanwhile (stop): the rest goes to the flusher, which counts it
                    # on its way out; the work in hand stays one record, as before batches.
                    while batch and self._estimator is me:
                        data = batch.popleft()
                        try:
                            call_count_tokens(data)
                        finally:
                            self._enqueue(data, estimated=True)
                finally:
                    # Retired, or a bug ended the batch early: the flusher counts the rest.
                    for data in batch:
                        self._enqueue(data, estimated=True)
        finally:
            with self._lock:
                if self._estimator is me:  # died of a bug: the flusher estimates the rest
                    self._retire_estimator_locked()

    def _retire_estimator_locked(self) -> threading.Thread | None:
        """Detach the estimator thread (it ends after the record in hand) and move what it
        had not started on to the buffer; a later estimate starts a new thread."""
        thread, self._estimator = self._estimator, None
        moved = len(self._estimates)
        self._buffer.extend(self._estimates)
        self._estimates.clear()
        self._estimates_done += moved
        self._estimate_cond.notify_all()
        self._flush_cond.notify_all()
        if moved and self._thread is None:
            self._start_locked()
        return thread

    # --- the flusher thread -----------------------------------------------------------------

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._lock:
                    target, exiting = self._flush_requested, self._exit
                try:
                    # The first pass runs at once: it replays spool files a crashed process left.
                    ok = self._cycle(force=exiting or target > self._flush_done)
                    if exiting:
                        ok = self._retire(database_ok=ok) and ok
                except Exception:  # a bug must not kill the only writer; the data stays queued
                    logger.exception("call recorder cycle failed")
                    ok = False
                with self._lock:
                    if target > self._flush_done:
                        self._flush_done, self._flush_ok = target, ok
                    self._flush_cond.notify_all()
                if exiting:
                    return
                self._wake.wait(self._wait_seconds())
                self._wake.clear()  # a set() racing this is harmless: the next cycle drains
        finally:
            with self._lock:
                if self._thread is me:
                    self._thread = None
                self._flush_cond.notify_all()
            connections.close_all()  # this thread's connections only (they are thread-local)

    def _wait_seconds(self) -> float:
        until_retry = self._retry_at - time.monotonic()
        if self._pending and until_retry > 0:
            return max(0.05, min(self._flush_seconds, until_retry))
        return self._flush_seconds

    def _retire(self, *, database_ok: bool) -> bool:
        """Final pass of a stopping thread: take the last records, write or spool them."""
        with self._work_lock:
            with self._lock:
                # Retiring under the lock that `record` takes means every record appended
                # from here on starts a new thread instead of landing in a dead buffer.
                leftovers = list(self._buffer)
                self._buffer.clear()
                self._thread = None
                self._exit = False
            self._pending.extend(self._prepare(data) for data in leftovers)
            self._settle_limits()
            if self._pending and database_ok:
                self._write_pending()
            written = not self._pending
            # The process may be about to exit: what is still in memory goes to disk.
            self._spool_pending(len(self._pending))
            return written

    def _flush_inline(self, deadline: float, *, spool_rest: bool = False) -> bool:
        """Flush on the calling thread: at interpreter exit, or stop() with no thread running."""
        while True:
            try:
                ok = self._cycle(force=True)
            except Exception:
                logger.exception("call recorder flush failed")
                ok = False
            if ok or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if not ok and spool_rest:
            with self._work_lock:
                self._spool_pending(len(self._pending))
        return ok

    # --- one pass: prepare, spill, write, replay (callers hold no lock) -----------------------

    def _cycle(self, *, force: bool) -> bool:
        with self._work_lock:
            with self._lock:
                batch = list(self._buffer)
                self._buffer.clear()
            self._pending.extend(self._prepare(data) for data in batch)
            self._settle_limits()
            if len(self._pending) > self._buffer_max:
                # Spool the oldest down to half the limit: big files, few fsyncs.
                self._spool_pending(len(self._pending) - self._buffer_max // 2)
            failing = self._failing_since
            if failing is not None and time.monotonic() - failing >= self._spool_after:
                # Not a passing hiccup: on disk what is held, where a crash cannot take it.
                self._spool_pending(len(self._pending))
            try:
                if not force and time.monotonic() < self._retry_at:
                    return False
                if not self._pending and not spool_files(spool_dir=self._spool_dir):
                    return True
                return self._write_pending(replay=True)
            finally:
                metrics.RECORDER_QUEUE.set(self.backlog)

    def _write_pending(self, *, replay: bool = False) -> bool:
        attempted = len(self._pending)
        try:
            # Long-lived thread: drop a connection that broke or outlived CONN_MAX_AGE, as
            # Django does around each request. (Not inside a caller's transaction: an inline
            # flush must not close the connection under it.)
            if not connection.in_atomic_block:
                close_old_connections()
            while self._pending:
                chunk = self._pending[: self._batch_size]
                calls_write(rows_as_records(chunk))
                del self._pending[: len(chunk)]
                metrics.RECORDER_BATCHES.inc()
                metrics.RECORDER_RECORDS.inc(amount=len(chunk))
            # The database takes new records: a spool file that fails to replay (a file
            # that cannot be removed, a row it refuses) must not send every new record to
            # the spool after it.
            self._failing_since = None
            if replay:
                self._replay_spool()
        except Exception as exc:
            metrics.RECORDER_FAILURES.inc()
            if self._pending and self._failing_since is None:
                self._failing_since = time.monotonic()
            self._backoff = min(max(self._backoff * 2, 0.5), MAX_BACKOFF_SECONDS)
            self._retry_at = time.monotonic() + self._backoff
            first_line = (str(exc).splitlines() or [""])[0][:200]
            logger.warning(
                "writing call records failed (%d waiting), retrying in %.1fs: %s: %s",
                max(attempted, len(self._pending)),
                self._backoff,
                type(exc).__name__,
                first_line,
            )
            # A restarted database is only picked up on a new connection.
            if not connection.in_atomic_block:
                try:
                    connection.close()
                except Exception:
                    logger.debug("closing the broken connection failed", exc_info=True)
            return False
        self._backoff = self._retry_at = 0.0
        return True

    def _prepare(self, data: CallData) -> Row:
        row = call_prepare(data)
        call_observe(data)  # after pricing: the cost series counts what the record says
        # Likewise: budgets are settled from the recorded cost. Applied per pass, before the
        # batch is written (_settle_limits).
        self._settlements += call_limit_settlements(data)
        return row

    def _settle_limits(self) -> None:
        settlements, self._settlements = self._settlements, []
        limits_settle_safely(settlements)

    # --- spool ------------------------------------------------------------------------------

    def _spool_pending(self, count: int) -> None:
        # A file per batch, as the batches are written: the first batch is the one whose write
        # failed, and it may have committed all the same (the connection broke after the
        # commit). Replay skips a file whose first row is in the table, so a file must commit
        # all-or-nothing, as a batch does, or its other rows would be skipped with it.
        spooled = 0
        while spooled < count:
            rows = self._pending[: min(self._batch_size, count - spooled)]
            try:
                spool_write(spool_dir=self._spool_dir, rows=rows)
            except OSError:
                # Memory beats loss: keep the rows and try again on the next pass.
                logger.exception(
                    "spooling %d call records to %s failed", len(rows), self._spool_dir
                )
                break
            del self._pending[: len(rows)]
            spooled += len(rows)
        if spooled:
            metrics.RECORDER_SPOOLED.inc(amount=spooled)
            logger.warning(
                "database unavailable: spooled %d call records to %s", spooled, self._spool_dir
            )

    def _replay_spool(self) -> None:
        for path in spool_files(spool_dir=self._spool_dir):
            replayed = spool_replay_file(
                path=path,
                field_names=PERSISTED_FIELDS,
                batch_size=self._batch_size,
                write_batch=calls_write,  # looked up per call, so the hook can be patched
            )
            metrics.RECORDER_REPLAYED.inc(amount=replayed)


# --- the process singleton ----------------------------------------------------------------

_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def get_recorder() -> Recorder:
    global _recorder
    if _recorder is None:
        with _recorder_lock:
            if _recorder is None:
                _recorder = Recorder()
    return _recorder


def record_call(data: CallData) -> None:
    """Queue one attempt for recording. Never blocks on I/O: safe on the event loop.

    With LLMROTATE_USAGE_RECORDING off it does nothing: no record, rollup or usage log line,
    and no recorder threads. Key health is not fed from here but settled by the attempt
    itself (proxy.engine), so it works the same. The Prometheus series are still counted,
    here, without the cost and the token estimates the recorder would have added."""
    # Django caches a setting on first read: from then on this is one attribute read per call.
    if not settings.LLMROTATE_USAGE_RECORDING:
        call_observe(data)
        _settle_later(call_limit_settlements(data, priced=False))
        return
    get_recorder().record(data)


# With recording off, settlements go to the limiter from a thread of their own: settling may
# reach Redis, which must never be waited for on the event loop. A bounded queue: past it a
# settlement is left out, and its reservation stands in for what was used (the safe side).
SETTLE_QUEUE_MAX = 10_000
_settle_queue: queue.Queue[list[Settlement]] | None = None
_settle_lock = threading.Lock()


def _settle_later(settlements: list[Settlement]) -> None:
    global _settle_queue
    if not settlements:
        return
    if _settle_queue is None:
        with _settle_lock:
            if _settle_queue is None:
                pending: queue.Queue[list[Settlement]] = queue.Queue(SETTLE_QUEUE_MAX)
                threading.Thread(
                    target=_settle_loop, args=(pending,), name="llmrotate-settler", daemon=True
                ).start()
                _settle_queue = pending
    try:
        _settle_queue.put_nowait(settlements)
    except queue.Full:
        logger.warning("limit settlements are behind; a reservation stands for what was used")


def _settle_loop(pending: queue.Queue[list[Settlement]]) -> None:
    while True:
        limits_settle_safely(pending.get())


def _stop_at_exit() -> None:
    if _recorder is not None:
        _recorder.stop(timeout=10)


def _forget_after_fork() -> None:
    # A forked child (a pre-forking server) inherits the parent's buffer and locks, but not its
    # thread. Those records are the parent's to write, so the child starts from nothing.
    global _recorder, _recorder_lock, _settle_queue, _settle_lock
    _recorder = None
    _recorder_lock = threading.Lock()
    _settle_queue, _settle_lock = None, threading.Lock()


atexit.register(_stop_at_exit)
os.register_at_fork(after_in_child=_forget_after_fork)
