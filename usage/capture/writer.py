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
    mask_short,
    scrub_secrets,
)
from usage.capture.format import capture_files, file_name, file_owner, header_item, index_path

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
        return base_url_masked(_BASE + url, mask=mask_short).removeprefix(_BASE)
    return base_url_masked(url, mask=mask_short)


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
        queue_max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.directory = Path(directory)
        self.file_max_bytes = file_max_bytes
        self.total_max_bytes = total_max_bytes
        self.retention_seconds = retention_seconds
        self.queue_max = queue_max
        self.queue_max_bytes = queue_max_bytes
        self.retry_seconds = retry_seconds
        # (exchange, its bytes): the queue is bounded in bytes too, since one exchange may hold
        # megabytes of bodies.
        self._queue: deque[tuple[dict[str, Any], int]] = deque()
        self._queued_bytes = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._fd: int | None = None
        self._index: int | None = None  # the file's index (format.index_path)
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

    def submit(self, item: dict[str, Any], size: int = 0) -> None:
        """Queue one exchange of about `size` bytes (microseconds; never blocks, never raises
        into the proxy)."""
        try:
            if (
                len(self._queue) >= self.queue_max
                or self._queued_bytes + size > self.queue_max_bytes
            ):
                self._drop("queue_full")
                return
            if time.monotonic() < self.paused_until:
                self._drop("paused")
                return
            self._queue.append((item, size))
            self._queued_bytes += size
            if self._thread is None:
                self._start()
            elif len(self._queue) >= _WAKE_AT:
                self._wake.set()
        except Exception:  # a thread that cannot start, say: the capture is lost, not the call
            logger.exception("could not queue a captured exchange; it is dropped")
            self.dropped += 1

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
            try:
                self.drain()
                if not self._stopping and time.monotonic() - self._pruned_at > _PRUNE_EVERY_SECONDS:
                    self.prune()
            except Exception:
                # A bug of ours must not end the thread: the queue would fill and every later
                # capture be dropped without a word.
                logger.exception("the capture writer failed; capturing pauses")
                self.paused_until = time.monotonic() + self.retry_seconds
                self._close_file()
            if self._stopping:
                return

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
                self._queued_bytes = 0
                return
            batch: list[tuple[str, bytes]] = []
            while self._queue and len(batch) < _WAKE_AT:
                item, size = self._queue.popleft()
                self._queued_bytes -= size
                try:
                    batch.append((str(item.get("request_id", "")), cbor2.dumps(prepared(item))))
                except Exception:
                    # A value the encoder cannot take is a bug of ours: lose this one only.
                    logger.exception("could not encode a captured exchange; it is dropped")
                    self._drop("encode_failed")
            before = self.written
            try:
                self._write(batch)
            except OSError as exc:
                self._failed(exc, lost=len(batch) - (self.written - before))

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        """Append the encoded exchanges, one write per file they go to, and their places to
        the file's index."""
        now = datetime.now(UTC)
        hour = now.strftime("%Y%m%dT%H")
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            # Deleted under us (by hand, or by a prune elsewhere): what is written there is
            # lost to every reader, so start a new file.
            self._close_file()
        pending: list[tuple[str, bytes]] = []
        size = 0
        for request_id, data in batch:
            if (
                self._fd is None
                or hour != self._hour
                or self._size + size + len(data) > self.file_max_bytes
            ):
                self._flush(pending, size)
                pending, size = [], 0
                self._open(now, hour)
            pending.append((request_id, data))
            size += len(data)
        self._flush(pending, size)

    def _flush(self, pending: list[tuple[str, bytes]], size: int) -> None:
        if not pending:
            return
        assert self._fd is not None and self._index is not None
        written = os.write(self._fd, b"".join(data for _, data in pending))
        if written != size:
            raise OSError(errno.ENOSPC, f"short write ({written} of {size} bytes)")
        lines, at = [], self._size
        for request_id, data in pending:
            lines.append(f"{request_id}\t{at}\t{len(data)}\n")
            at += len(data)
        os.write(self._index, "".join(lines).encode())
        self._size += written
        self.written += len(pending)
        metrics.CAPTURE_WRITTEN.inc(amount=len(pending))

    def _open(self, now: datetime, hour: str) -> None:
        self._close_file()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir leaves a folder that already existed as it was.
        with contextlib.suppress(OSError):
            os.chmod(self.directory, 0o700)
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
            index = os.open(
                index_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600
            )
        except OSError:
            # A file without its header is no capture file: leave none behind.
            os.close(fd)
            _remove(path)
            raise
        self._fd, self._index, self._path = fd, index, path
        self._size = len(header)
        self.prune()

    def _close_file(self) -> None:
        for fd in (self._fd, self._index):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._index = None

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
        """Delete files past the retention age, then the oldest while over the size cap; never
        a file a live process may still be writing (`_in_use`)."""
        self._pruned_at = time.monotonic()
        try:
            files = [(p, p.stat()) for p in capture_files(self.directory)]
        except OSError:
            return
        in_use = _in_use([p for p, _ in files], host=self.host)
        now = time.time()
        kept = []
        for path, st in files:
            if now - st.st_mtime > self.retention_seconds and path not in in_use:
                _remove(path)
            else:
                kept.append((path, st))
        total = sum(st.st_size for _, st in kept)
        kept.sort(key=lambda pair: pair[1].st_mtime)
        for path, st in kept:
            if total <= self.total_max_bytes:
                break
            if path not in in_use and _remove(path):
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


def _in_use(paths: list[Path], *, host: str) -> set[Path]:
    """The files that may be open for writing: each live process's newest file. A process of
    this host is alive if its pid is; one of another host (a shared folder) is taken to be
    while its newest file was written to in the last 10 minutes."""
    newest: dict[tuple[str, int], Path] = {}
    for path in paths:  # oldest first: the last one seen per process is its newest
        owner = file_owner(path)
        if owner is not None:
            newest[owner] = path
    alive = set()
    for (owner_host, pid), path in newest.items():
        if owner_host == host:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass  # someone else's process, alive
            alive.add(path)
        else:
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime < 600:
                    alive.add(path)
    return alive


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError as exc:
        logger.warning("could not delete old capture file %s: %s", path.name, exc)
        return False
    with contextlib.suppress(OSError):
        index_path(path).unlink(missing_ok=True)
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
                    queue_max_bytes=settings.LLMROTATE_CAPTURE_QUEUE_MAX_BYTES,
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
