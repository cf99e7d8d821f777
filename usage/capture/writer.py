"""The capture writer: a thread that masks exchanges and appends them to capture files.

The request path only hands over what it saw (`submit`, a deque append); masking, CBOR
encoding and every disk write happen here. Files are `capture-<UTC hour>-<host>-<pid>-<n>.cbor`
in LLMROTATE_CAPTURE_DIR, created 0600 in a 0700 folder, one per hour or per
LLMROTATE_CAPTURE_FILE_MAX_BYTES, whichever comes first; each process writes its own.

Files older than LLMROTATE_CAPTURE_RETENTION_HOURS are deleted, and the oldest go first while
the folder holds more than LLMROTATE_CAPTURE_MAX_TOTAL_BYTES. A write that fails (a full disk,
a read-only folder) is logged as an error and capturing pauses for
LLMROTATE_CAPTURE_RETRY_SECONDS; exchanges meanwhile are dropped and counted. Proxying never
waits for any of it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cbor2
from django.conf import settings

from common import metrics
from common.redaction import (
    base_url_masked,
    header_pair_masked,
    known_secrets,
    scrub_secrets,
)
from usage.capture.format import capture_files, file_name, header_item

logger = logging.getLogger("llmrotate.capture")

# How often the folder is checked against the retention age and the size cap when no file
# rotation happened meanwhile.
_PRUNE_EVERY_SECONDS = 60.0
# The writer wakes this often and writes what came meanwhile in one go, rather than being woken
# for each exchange: at hundreds of calls a second, a wake-up per exchange cost each call a
# thread hand-off of the GIL (docs/benchmarks.md#wire-capture). A queue this long wakes it at
# once.
_WRITE_EVERY_SECONDS = 0.1
_WAKE_AT = 256


def prepared(item: dict[str, Any]) -> dict[str, Any]:
    """The exchange as it may be written: headers and URLs masked, and the secrets it carries
    (the key's, the client's token: `secrets`, never written) scrubbed from every body."""
    secrets = set(item.pop("secrets", ())) | known_secrets()
    for side in ("request", "response"):
        message = item.get(side)
        if not message:
            continue
        message["headers"] = [
            header_pair_masked(name, value) for name, value in message.get("headers") or ()
        ]
        if "url" in message:
            message["url"] = _url_masked(message["url"])
        if "body" in message:
            message["body"] = scrub_secrets(bytes(message["body"]), secrets)
        if "chunk_data" in message:  # as the request path keeps them (proxy.capture.Leg)
            times, datas = message.pop("chunk_times"), message.pop("chunk_data")
            message["chunks"] = [[t, d] for t, d in zip(times, datas, strict=True)]
        if "chunks" in message:
            message["chunks"] = _chunks_scrubbed(message["chunks"], secrets)
    return item


_BASE = "http://gateway"


def _url_masked(url: str) -> str:
    if url.startswith("/"):  # the client's path and query: masked as if under a base URL
        return base_url_masked(_BASE + url).removeprefix(_BASE)
    return base_url_masked(url)


def _chunks_scrubbed(chunks: list[Any], secrets: set[str]) -> list[list[Any]]:
    """A secret cut in two by a chunk boundary is found too: the chunks are scrubbed as one,
    and cut again where they were (scrubbing keeps lengths)."""
    whole = b"".join([c for _, c in chunks])
    clean = scrub_secrets(whole, secrets)
    if clean == whole:
        return chunks
    out, at = [], 0
    for t, c in chunks:
        out.append([t, clean[at : at + len(c)]])
        at += len(c)
    return out


class CaptureWriter:
    def __init__(
        self,
        directory: Path,
        *,
        file_max_bytes: int,
        total_max_bytes: int,
        retention_seconds: float,
        queue_max: int,
        retry_seconds: float,
    ) -> None:
        self.directory = Path(directory)
        self.file_max_bytes = file_max_bytes
        self.total_max_bytes = total_max_bytes
        self.retention_seconds = retention_seconds
        self.queue_max = queue_max
        self.retry_seconds = retry_seconds
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._hour = ""
        self._size = 0
        self._sequence = 0
        self._pruned_at = 0.0
        self.paused_until = 0.0
        self.written = 0
        self.dropped = 0
        self.host = socket.gethostname().split(".")[0][:32] or "host"

    # --- the request path's side

    def submit(self, item: dict[str, Any]) -> None:
        """Queue one exchange (microseconds; never blocks, never raises into the proxy)."""
        if len(self._queue) >= self.queue_max:
            self._drop("queue_full")
            return
        if time.monotonic() < self.paused_until:
            self._drop("paused")
            return
        self._queue.append(item)
        if self._thread is None:
            self._start()
        elif len(self._queue) >= _WAKE_AT:
            self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
                thread.start()
                self._thread = thread

    # --- the thread

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=_WRITE_EVERY_SECONDS)
            self._wake.clear()
            self.drain()
            if self._stopping:
                return
            if time.monotonic() - self._pruned_at > _PRUNE_EVERY_SECONDS:
                self.prune()

    def drain(self) -> None:
        """Write every queued exchange (the thread's loop; `stop` and tests call it too: one
        at a time, or two could each open a file)."""
        with self._drain_lock:
            self._drain()

    def _drain(self) -> None:
        while self._queue:
            if time.monotonic() < self.paused_until:
                self._drop("paused", len(self._queue))
                self._queue.clear()
                return
            batch: list[bytes] = []
            while self._queue and len(batch) < _WAKE_AT:
                item = self._queue.popleft()
                try:
                    batch.append(cbor2.dumps(prepared(item)))
                except Exception:
                    # A value the encoder cannot take is a bug of ours: lose this one only.
                    logger.exception("could not encode a captured exchange; it is dropped")
                    self._drop("encode_failed")
            before = self.written
            try:
                self._write(batch)
            except OSError as exc:
                self._failed(exc, lost=len(batch) - (self.written - before))

    def _write(self, batch: list[bytes]) -> None:
        """Append the encoded exchanges, one write per file they go to."""
        now = datetime.now(UTC)
        hour = now.strftime("%Y%m%dT%H")
        pending: list[bytes] = []
        size = 0
        for data in batch:
            if (
                self._fd is None
                or hour != self._hour
                or self._size + size + len(data) > self.file_max_bytes
            ):
                self._flush(pending, size)
                pending, size = [], 0
                self._open(now, hour)
            pending.append(data)
            size += len(data)
        self._flush(pending, size)

    def _flush(self, pending: list[bytes], size: int) -> None:
        if not pending:
            return
        assert self._fd is not None
        data = b"".join(pending)
        written = os.write(self._fd, data)
        if written != size:
            raise OSError(errno.ENOSPC, f"short write ({written} of {size} bytes)")
        self._size += written
        self.written += len(pending)
        metrics.CAPTURE_WRITTEN.inc(amount=len(pending))

    def _open(self, now: datetime, hour: str) -> None:
        self._close_file()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if hour != self._hour:
            self._hour, self._sequence = hour, 0
        while True:
            path = self.directory / file_name(
                now, host=self.host, pid=os.getpid(), sequence=self._sequence
            )
            self._sequence += 1
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            except FileExistsError:
                continue  # a restarted process with the same pid: never append to its file
            break
        header = cbor2.dumps(header_item(host=self.host, pid=os.getpid(), created=now))
        try:
            if os.write(fd, header) != len(header):
                raise OSError(errno.ENOSPC, "short write")
        except OSError:
            # A file without its header is no capture file: leave none behind.
            os.close(fd)
            _remove(path)
            raise
        self._fd, self._path = fd, path
        self._size = len(header)
        self.prune()

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _drop(self, reason: str, count: int = 1) -> None:
        self.dropped += count
        metrics.CAPTURE_DROPPED.inc(reason, amount=count)

    def _failed(self, exc: OSError, *, lost: int) -> None:
        self._drop("write_failed", lost)
        self._close_file()
        self.paused_until = time.monotonic() + self.retry_seconds
        logger.error(
            "wire capture paused for %.0f s: cannot write to %s (%s: %s); proxying goes on,"
            " exchanges meanwhile are not captured",
            self.retry_seconds,
            self.directory,
            type(exc).__name__,
            exc.strerror or exc,
        )

    def prune(self) -> None:
        """Delete files past the retention age, then the oldest while over the size cap (the
        file being written last)."""
        self._pruned_at = time.monotonic()
        try:
            files = [(p, p.stat()) for p in capture_files(self.directory)]
        except OSError:
            return
        now = time.time()
        kept = []
        for path, st in files:
            if now - st.st_mtime > self.retention_seconds and path != self._path:
                _remove(path)
            else:
                kept.append((path, st))
        total = sum(st.st_size for _, st in kept)
        kept.sort(key=lambda pair: (pair[0] == self._path, pair[1].st_mtime))
        for path, st in kept:
            if total <= self.total_max_bytes or path == self._path:
                break
            if _remove(path):
                total -= st.st_size

    def stop(self) -> None:
        """Write what is queued and close the file (graceful shutdown)."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=10)
        self.drain()
        self._close_file()


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError as exc:
        logger.warning("could not delete old capture file %s: %s", path.name, exc)
        return False
    return True


_writer: CaptureWriter | None = None
_writer_lock = threading.Lock()


def get_capture_writer() -> CaptureWriter:
    global _writer
    if _writer is None:
        with _writer_lock:
            if _writer is None:
                _writer = CaptureWriter(
                    Path(settings.LLMROTATE_CAPTURE_DIR),
                    file_max_bytes=settings.LLMROTATE_CAPTURE_FILE_MAX_BYTES,
                    total_max_bytes=settings.LLMROTATE_CAPTURE_MAX_TOTAL_BYTES,
                    retention_seconds=settings.LLMROTATE_CAPTURE_RETENTION_HOURS * 3600,
                    queue_max=settings.LLMROTATE_CAPTURE_QUEUE_MAX,
                    retry_seconds=settings.LLMROTATE_CAPTURE_RETRY_SECONDS,
                )
    return _writer


def capture_writer_stop() -> None:
    """At shutdown: what was captured is written before the process ends."""
    if _writer is not None:
        _writer.stop()


def capture_writer_reset() -> None:
    """Tests: forget the process's writer (after stopping it), so settings are read again."""
    global _writer
    if _writer is not None:
        _writer.stop()
    _writer = None
