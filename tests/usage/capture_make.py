"""Making capture files for the capture commands' tests: exchanges in the documented shape
(usage.capture.format), masked by the writer's own `prepared`, written as the writer does."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from usage.capture.format import capture_files
from usage.capture.writer import CaptureWriter


def write_capture(directory: Path, items: list[dict[str, Any]]) -> Path:
    """The items written by the production writer (masked, encoded, 0600) to one new file of
    `directory`; its path."""
    writer = CaptureWriter(
        directory,
        file_max_bytes=64 << 20,
        total_max_bytes=1 << 30,
        retention_seconds=3600,
        queue_max=len(items) + 1,
        retry_seconds=60,
    )
    before = set(capture_files(directory))
    for item in items:
        writer.submit(dict(item))
    # stop(), not drain(): the writer's thread may be draining already.
    writer.stop()
    assert writer.written == len(items), f"{writer.dropped} exchanges dropped"
    (path,) = set(capture_files(directory)) - before
    return path


def real_call(
    url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Make the call for real and return (request, response) as a capture records them:
    the response's chunks as read, with their times in ms since the request started."""
    raw = json.dumps(body).encode()
    started = time.perf_counter()

    def ms() -> float:
        return (time.perf_counter() - started) * 1000.0

    with httpx.Client(trust_env=False, timeout=30) as client:
        with client.stream("POST", url, headers=headers, content=raw) as response:
            t_headers = ms()
            chunks: list[list[Any]] = [[ms(), bytes(data)] for data in response.iter_raw()]
            status = response.status_code
            response_headers = [[k, v] for k, v in response.headers.items()]
        t_end = ms()
    request = {
        "method": "POST",
        "url": url,
        "headers": [[k, v] for k, v in headers.items()],
        "body": raw,
        "body_size": len(raw),
        "t": 0.0,
    }
    reply = {
        "status": status,
        "headers": response_headers,
        "t": t_headers,
        "chunks": chunks,
        "size": sum(len(c) for _, c in chunks),
        "truncated": False,
        "end": "complete",
        "error": None,
        "t_end": t_end,
    }
    return request, reply


def exchange(
    request_id: str,
    *,
    leg: str,
    attempt: int,
    request: dict[str, Any],
    response: dict[str, Any],
    stream: bool,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "type": "exchange",
        "request_id": request_id,
        "leg": leg,
        "attempt": attempt,
        "time": time.time(),
        "route": "gpt-4o-mini",
        "model": "gpt-4o-mini",
        "client": "team-a",
        "provider": extra.pop("provider", None),
        "key": extra.pop("key", None),
        "operation": "chat",
        "api": "openai",
        "stream": stream,
        "request": request,
        "response": response,
        "outcome": "success",
        **extra,
    }
