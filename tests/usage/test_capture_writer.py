"""The capture writer: masking before anything is written, files per hour and size, 0600,
retention and the size cap, and a disk that fails (capture pauses, nothing raises)."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from common.redaction import header_masked, scrub_secrets
from usage.capture.format import (
    NotACapture,
    capture_files,
    file_hour,
    find_request,
    read_file,
)
from usage.capture.writer import CaptureWriter, prepared

SECRET = "sk-test-writer-9Zq4Lm2Xv8Rt6Yp1"
TOKEN = "llmr_abcd1234_Zq4Lm2Xv8Rt6Yp1Wn3Hk5"


def writer(folder: Path, **options: Any) -> CaptureWriter:
    settings = {
        "file_max_bytes": 1024 * 1024,
        "total_max_bytes": 10 * 1024 * 1024,
        "retention_seconds": 3600.0,
        "queue_max": 100,
        "retry_seconds": 60.0,
        **options,
    }
    return CaptureWriter(folder, **settings)


def exchange(request_id: str = "r1", *, body: bytes = b"{}", **extra: Any) -> dict[str, Any]:
    return {
        "type": "exchange",
        "request_id": request_id,
        "leg": "upstream",
        "attempt": 1,
        "time": time.time(),
        "secrets": (SECRET, TOKEN),
        "request": {
            "method": "POST",
            "url": "https://api.example.com/v1/chat/completions?api-version=1&key=" + SECRET,
            "headers": [
                ["authorization", f"Bearer {SECRET}"],
                ["x-api-key", SECRET],
                ["x-goog-api-key", SECRET],
                ["cookie", "session=abcdef123456"],
                ["content-type", "application/json"],
                ["x-ratelimit-remaining-tokens", "999"],
            ],
            "body": body,
            "t": 0.5,
        },
        "response": {
            "status": 200,
            "headers": [["set-cookie", "sid=zzzzzzzzzzzz"]],
            "chunks": [
                [10.0, b'data: {"a": "' + SECRET[:10].encode()],
                [11.0, SECRET[10:].encode() + b'"}\n\n'],
            ],
            "end": "complete",
            "t_end": 12.0,
        },
        **extra,
    }


def test_credentials_are_masked_in_headers_urls_and_bodies_even_across_chunks(tmp_path: Path):
    w = writer(tmp_path)
    w.submit(
        exchange(body=b'{"note": "key ' + SECRET.encode() + b" token " + TOKEN.encode() + b'"}')
    )
    w.stop()
    data = b"".join(p.read_bytes() for p in capture_files(tmp_path))
    for secret in (SECRET, TOKEN, "abcdef123456", "zzzzzzzzzzzz"):
        runs = {secret[i : i + 8].encode() for i in range(len(secret) - 7)}
        assert not any(run in data for run in runs), secret
    [item] = read_file(capture_files(tmp_path)[0]).exchanges
    headers = dict(item.request.headers)
    assert headers["authorization"].startswith("Bearer sk-")
    assert headers["content-type"] == "application/json"
    assert headers["x-ratelimit-remaining-tokens"] == "999"  # a counter, not a credential
    assert "api-version=1" in item.request.raw["url"] and "key=" in item.request.raw["url"]
    # Scrubbing keeps lengths, so the stream's chunks still cut where they were received.
    assert [len(c) for _, c in item.response.chunks] == [23, len(SECRET) - 10 + 4]


def test_header_masking_rules():
    masked = header_masked("Authorization", "Bearer " + SECRET)
    assert masked.startswith("Bearer sk-") and SECRET not in masked
    assert SECRET not in header_masked("X-Custom-Token", SECRET)
    assert header_masked("x-request-id", "abc") == "abc"
    assert SECRET not in header_masked("x-forwarded-note", f"see {SECRET}")
    assert scrub_secrets(b"no secrets here", {SECRET}) == b"no secrets here"


def test_files_are_private_self_describing_and_named_by_hour(tmp_path: Path):
    w = writer(tmp_path / "captures")
    w.submit(exchange())
    w.stop()
    [path] = capture_files(tmp_path / "captures")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "captures").stat().st_mode) == 0o700
    assert path.read_bytes()[:3] == b"\xd9\xd9\xf7"  # the self-describe tag
    assert file_hour(path) is not None
    capture = read_file(path)
    assert capture.header["format"] == "llmrotate-capture" and capture.header["fields"]
    assert [e.request_id for e in capture.exchanges] == ["r1"]


def test_a_new_file_starts_when_one_reaches_its_size_limit(tmp_path: Path):
    w = writer(tmp_path, file_max_bytes=4096)
    for i in range(10):
        w.submit(exchange(f"r{i}", body=b"x" * 1500))
        w.drain()
    w.stop()
    files = capture_files(tmp_path)
    assert len(files) >= 4
    assert all(p.stat().st_size <= 4096 for p in files)
    assert sorted(e.request_id for p in files for e in read_file(p).exchanges) == sorted(
        f"r{i}" for i in range(10)
    )


def test_old_files_and_files_over_the_cap_are_pruned(tmp_path: Path):
    old = tmp_path / "capture-20200101T00-host-1-0.cbor"
    old.write_bytes(b"\xd9\xd9\xf7")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    w = writer(tmp_path, file_max_bytes=3000, total_max_bytes=8000, retention_seconds=3600)
    for i in range(12):
        w.submit(exchange(f"r{i}", body=b"y" * 1500))
        w.drain()
    w.prune()
    w.stop()
    assert not old.exists()
    files = capture_files(tmp_path)
    assert sum(p.stat().st_size for p in files) <= 8000
    # The newest survive: the last request is still there.
    assert find_request("r11", directory=tmp_path, when=None)
    assert not find_request("r0", directory=tmp_path, when=None)


def test_a_full_disk_pauses_capture_and_nothing_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    w = writer(tmp_path, retry_seconds=0.2)
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    w.submit(exchange("lost"))
    w.drain()
    assert "wire capture paused" in caplog.text and "No space left" in caplog.text
    w.submit(exchange("also-lost"))  # dropped at once while paused: never queued
    assert w.dropped == 2
    monkeypatch.setattr(os, "write", real_write)
    deadline = time.monotonic() + 5
    while time.monotonic() < w.paused_until and time.monotonic() < deadline:
        time.sleep(0.01)
    w.submit(exchange("kept"))
    w.stop()
    ids = [e.request_id for p in capture_files(tmp_path) for e in read_file(p).exchanges]
    assert ids == ["kept"]


def test_a_full_queue_drops_instead_of_growing(tmp_path: Path):
    w = writer(tmp_path, queue_max=3)
    w._thread = object()  # type: ignore[assignment]  # no thread drains it meanwhile
    for i in range(5):
        w.submit(exchange(f"r{i}"))
    assert (len(w._queue), w.dropped) == (3, 2)


def test_a_torn_last_item_is_reported_and_the_rest_read(tmp_path: Path):
    w = writer(tmp_path)
    w.submit(exchange("whole"))
    w.stop()
    [path] = capture_files(tmp_path)
    with path.open("ab") as fp:
        fp.write(cbor2.dumps(prepared(exchange("torn")))[:-5])
    capture = read_file(path)
    assert [e.request_id for e in capture.exchanges] == ["whole"]
    assert capture.problem and "torn" in capture.problem


def test_another_file_is_not_taken_for_a_capture(tmp_path: Path):
    path = tmp_path / "capture-20261207T11-h-1-0.cbor"
    path.write_bytes(cbor2.dumps({"hello": "world"}))
    with pytest.raises(NotACapture, match="not a capture file"):
        read_file(path)


@pytest.mark.django_db
def test_the_hourly_prune_task_deletes_old_capture_files_when_nothing_is_captured(
    tmp_path: Path, settings: Any
):
    from usage.capture.writer import capture_writer_reset
    from usage.tasks import usage_prune

    settings.LLMROTATE_CAPTURE_DIR = tmp_path
    settings.LLMROTATE_CAPTURE_RETENTION_HOURS = 1
    capture_writer_reset()
    old = tmp_path / "capture-20200101T00-host-1-0.cbor"
    recent = tmp_path / "capture-20200101T01-host-1-0.cbor"
    for path in (old, recent):
        path.write_bytes(b"\xd9\xd9\xf7")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    usage_prune()
    assert capture_files(tmp_path) == [recent]


def test_written_and_dropped_exchanges_are_counted_for_prometheus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from common import metrics

    def value(instrument: Any, **labels: str) -> float:
        return (
            instrument.prom.labels(**labels)._value.get()
            if labels
            else instrument.prom._value.get()
        )

    written0 = value(metrics.CAPTURE_WRITTEN)
    failed0 = value(metrics.CAPTURE_DROPPED, reason="write_failed")
    paused0 = value(metrics.CAPTURE_DROPPED, reason="paused")
    w = writer(tmp_path)
    w.submit(exchange("a"))
    w.submit(exchange("b"))
    w.drain()
    assert value(metrics.CAPTURE_WRITTEN) - written0 == 2

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    w._thread = object()  # type: ignore[assignment]  # no thread: this test drains
    w._close_file()  # the next write opens a new file, whose header fails
    w.submit(exchange("c"))
    w.drain()
    w.submit(exchange("d"))
    assert value(metrics.CAPTURE_DROPPED, reason="write_failed") - failed0 == 1
    assert value(metrics.CAPTURE_DROPPED, reason="paused") - paused0 == 1
