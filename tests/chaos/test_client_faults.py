"""The gateway in front of clients that misbehave: a thousand streams abandoned at random
points, readers that never read, bodies at, under and over the size limit.

The same questions as for upstream faults (test_upstream_faults.py): a documented answer to
each client, one record per attempt the upstream saw (marked `client_disconnected` where the
client left), no key left with a call in flight, the gateway's memory bounded.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.hostile_upstream import (
    ROUTE,
    Chaos,
    HostileUpstream,
    chaos_gateway,
    keys_idle,
    rss_bytes,
    storm,
    upstream_records,
)
from tests.e2e.conftest import wait_for

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(90)]

MIB = 1024 * 1024
LIMIT = 64 * 1024  # LLMROTATE_MAX_REQUEST_BYTES for the size tests


@pytest.fixture
def gateway(transactional_db: None, upstream: HostileUpstream, settings: Any) -> Iterator[Chaos]:
    settings.LLMROTATE_REQUEST_DEADLINE_SECONDS = 30.0
    settings.LLMROTATE_READ_TIMEOUT_SECONDS = 2.0
    settings.LLMROTATE_MAX_STREAM_SECONDS = 3.0
    settings.LLMROTATE_UPSTREAM_MAX_CONNECTIONS = 1200
    settings.LLMROTATE_MAX_REQUEST_BYTES = LIMIT
    with chaos_gateway(upstream.base_url) as gateway:
        yield gateway


def records_of(count: int) -> list[Any]:
    def ready() -> list[Any] | None:
        records = upstream_records()
        assert len(records) <= count, f"{len(records)} records for {count} attempts"
        return records if len(records) == count else None

    return wait_for(ready, timeout=20, message=f"expected {count} records")


def test_a_thousand_streams_abandoned_at_random_points_are_recorded_and_release_their_keys(
    gateway: Chaos, upstream: HostileUpstream, settings: Any
) -> None:
    # A thousand streams at once take a loaded machine well past the 3 s stream bound the
    # slow readers are cut at; here every stream must end by its client or by its last chunk.
    settings.LLMROTATE_MAX_STREAM_SECONDS = 120.0
    # Twenty chunks 50 ms apart: a client that leaves within the first 60 % of the bytes
    # leaves while the upstream is still sending, whatever the gateway's load.
    upstream.events = 20
    upstream.event_delay = 0.05
    rng = random.Random(16)
    plan: list[dict[str, Any]] = []
    for n in range(1000):
        leave = None if n % 10 == 0 else rng.randint(1, 2500)  # of about 4,400 bytes
        plan.append({"stream": True, "leave_after": leave})
    before = rss_bytes()
    results = storm(gateway.port, gateway.token, plan, timeout=80)
    grown = rss_bytes() - before

    left = sum(r["left"] for r in results)
    assert all(r["status"] == 200 for r in results), Counter(r["status"] for r in results)
    whole = [r for r in results if not r["left"]]
    assert all(r["code"] is None for r in whole), Counter(r["code"] for r in whole)
    assert left == 900
    records = records_of(upstream.attempts())
    assert upstream.attempts() == len(plan)
    outcomes = Counter((r.outcome, r.client_status) for r in records)
    assert outcomes == {("client_disconnected", 499): left, ("success", 200): len(plan) - left}
    # A client that leaves says nothing about the key: healthy, idle.
    states = keys_idle()
    assert all(s.status == "active" and s.consecutive_failures == 0 for s in states.values())
    assert gateway.health()["breaker_state"] == "closed"
    assert grown < 160 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"


def test_readers_that_never_read_hold_the_upstream_back_and_are_cut_at_the_stream_bound(
    gateway: Chaos, upstream: HostileUpstream
) -> None:
    """Five clients ask for a stream the upstream sends as fast as it can, forever, and read
    nothing after the head. The gateway must not buffer it: the upstream is held back (its
    writes wait), memory does not grow with what it would send, and at the stream bound the
    clients are cut off and the keys given back."""
    upstream.mode = "firehose_sse"
    readers = []
    before = rss_bytes()
    t0 = time.monotonic()
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = json.dumps(
            {"model": ROUTE, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        ).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\nauthorization: Bearer %s\r\n"
            b"content-length: %d\r\n\r\n%s" % (gateway.token.encode(), len(body), body)
        )
        assert sock.recv(12).startswith(b"HTTP/1.1 200"), "the stream did not start"
        readers.append(sock)
    try:
        records = records_of(5)  # written when each stream ends: at the cut
        took = time.monotonic() - t0
        sent = upstream.bytes_sent
        grown = rss_bytes() - before
    finally:
        for sock in readers:
            sock.close()
    assert {(r.outcome, r.client_status) for r in records} == {("client_disconnected", 499)}
    # Cut at the bound (3 s, plus the read timeout's grace: 5 s), not before, not much after.
    assert 3.0 <= took <= 9.0, took
    # At 64 KiB a write, loopback would carry gigabytes in that time.
    assert sent < 64 * MIB, f"the upstream sent {sent / MIB:.1f} MiB"
    assert grown < 48 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"
    keys_idle()


def _body(size: int, *, anthropic: bool = False) -> bytes:
    """A valid request body of exactly `size` bytes (a padded system prompt)."""
    payload: dict[str, Any] = {"model": ROUTE, "messages": [{"role": "user", "content": "hi"}]}
    if anthropic:
        payload["max_tokens"] = 16
    payload["system" if anthropic else "user"] = ""
    pad = size - len(json.dumps(payload).encode())
    assert pad >= 0
    payload["system" if anthropic else "user"] = "x" * pad
    data = json.dumps(payload).encode()
    assert len(data) == size
    return data


def _post(port: int, token: str, body: bytes, *, chunked: bool, path: str) -> tuple[int, Any]:
    """A POST over a raw socket, with Content-Length or chunked without it; (status, body)."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
        f"content-type: application/json\r\nauthorization: Bearer {token}\r\n"
    ).encode()
    if path == "/v1/messages":
        head += b"anthropic-version: 2023-06-01\r\n"
    if chunked:
        pieces = [body[i : i + 8192] for i in range(0, len(body), 8192)]
        wire = head + b"transfer-encoding: chunked\r\n\r\n"
        wire += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        wire = head + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Refused mid-upload, the answer is already there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(wire)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        decoded, data = b"", rest
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, data = decoded + data[:size], data[size + 2 :]
        rest = decoded
    return status, json.loads(rest)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_at_and_under_the_size_limit_pass_and_one_byte_over_is_refused(
    gateway: Chaos, upstream: HostileUpstream, chunked: bool
) -> None:
    for size in (LIMIT - 1, LIMIT):
        status, answer = _post(
            gateway.port, gateway.token, _body(size), chunked=chunked, path="/v1/chat/completions"
        )
        assert status == 200, (size, answer)
    status, answer = _post(
        gateway.port, gateway.token, _body(LIMIT + 1), chunked=chunked, path="/v1/chat/completions"
    )
    assert (status, answer["error"]["code"]) == (413, "request_too_large"), answer
    assert "type" not in answer  # the OpenAI envelope
    status, answer = _post(
        gateway.port,
        gateway.token,
        _body(LIMIT + 1, anthropic=True),
        chunked=chunked,
        path="/v1/messages",
    )
    assert (status, answer["type"], answer["error"]["code"]) == (413, "error", "request_too_large")
    status, answer = _post(
        gateway.port,
        gateway.token,
        _body(LIMIT, anthropic=True),
        chunked=chunked,
        path="/v1/messages",
    )
    assert status == 200 and answer["type"] == "message", answer
    # The refused bodies never reached the upstream; the others did, once each.
    assert upstream.attempts() == 3
    records_of(3)
    keys_idle()
