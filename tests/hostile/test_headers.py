"""Hostile headers against a real `manage.py serve` web process (uvicorn with httptools, the
way the gateway is deployed), over raw sockets so that nothing on the client side cleans the
bytes up: an oversized header, many repeated headers, CR and LF inside a header value
(response splitting and request smuggling), a Host outside ALLOWED_HOSTS, and a request id of
the caller's that must never be echoed. After each, the server keeps serving."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fake_upstream import FakeUpstream
from tests.conftest import free_port
from tests.e2e.conftest import ServeProcess, wait_for
from tests.e2e.test_serve_command import fresh_env

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(180)]

PROXY_TOKEN = "hostile-headers-proxy-token-5Jd8Qw2Lx7"
MONITOR_TOKEN = "hostile-headers-monitor-token-8Hc1Vb4Nz"
SECRET = "sk-hostile-headers-9Vb3Nc6Mz1Kp4Hq0000"
CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
# Words that would mean the server showed its internals.
INTERNALS = re.compile(rb"Traceback|DisallowedHost|ALLOWED_HOSTS|settings\.py|File \"/", re.I)


class Server:
    def __init__(self, port: int, process: ServeProcess) -> None:
        self.port = port
        self.process = process

    def exchange(self, raw: bytes, *, timeout: float = 10.0) -> bytes:
        """Send `raw`, read until the server closes the connection (every request here says
        `Connection: close`, or is one the server should close on) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            # The server may close before taking all of an oversized request.
            with contextlib.suppress(OSError):
                sock.sendall(raw)
            while time.monotonic() < deadline:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                except TimeoutError:
                    raise AssertionError(
                        f"no end of answer within {timeout} s: {b''.join(chunks)[:300]!r}"
                    ) from None
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    def request(self, method: str, path: str, headers: list[bytes], body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers]
        lines += [b"Connection: close", f"Content-Length: {len(body)}".encode()]
        return self.exchange(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    def still_serving(self) -> None:
        answer = self.request(
            "GET", "/v1/models", [b"Authorization: Bearer " + PROXY_TOKEN.encode()]
        )
        assert status_of(answer) == 200, answer[:300]


def status_of(answer: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(match.group(1)) if match else None


def head_of(answer: bytes) -> dict[bytes, list[bytes]]:
    head = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    headers: dict[bytes, list[bytes]] = {}
    for line in head:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return headers


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream_server: FakeUpstream
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hostile-headers")
    config = {
        "providers": {"fake": {"kind": "openai", "base_url": fake_upstream_server.base_url}},
        "keys": [{"id": "fake-1", "provider": "fake", "secret": f"literal://{SECRET}"}],
        "routes": {"gpt-4o-mini": {"deployments": [{"provider": "fake", "model": "gpt-4o-mini"}]}},
        "clients": [
            {"name": "proxy", "token": f"literal://{PROXY_TOKEN}", "routes": ["*"]},
            {"name": "monitor", "token": f"literal://{MONITOR_TOKEN}", "scopes": ["monitor"]},
        ],
    }
    file = Path(tmp / "gateway.yaml")
    file.write_text(yaml.safe_dump(config))
    port = free_port()
    process = ServeProcess(
        ["--port", str(port), "--no-access-log", "--no-worker", "--no-beat", "--config", str(file)],
        env=fresh_env(tmp / "data"),
        log=tmp / "serve.log",
    )
    try:
        process.wait_ready(f"http://127.0.0.1:{port}/healthz", timeout=150, status=None)
        yield Server(port, process)
    finally:
        process.stop()
    # A foreign Host included (test_a_host_outside_allowed_hosts_...): no test here may
    # make the server print a traceback.
    output = process.output()
    assert "Traceback (most recent call last)" not in output, output[-3000:]


@pytest.mark.parametrize("size", [100_000, 1_000_000])
def test_an_oversized_header_is_refused_with_431(server: Server, size: int):
    # With a valid token: uvicorn (httptools) takes a header of any size, so the refusal is
    # the gateway's, on every path.
    auth = b"Authorization: Bearer " + PROXY_TOKEN.encode()
    for path in ("/v1/models", "/api/usage", "/dashboard/"):
        answer = server.request("GET", path, [auth, b"X-Big: " + b"a" * size])
        assert status_of(answer) == 431, answer[:300]
        assert b'"code": "headers_too_large"' in answer
    server.still_serving()


def test_many_repeated_headers_are_no_server_error(server: Server):
    auth = b"Authorization: Bearer " + PROXY_TOKEN.encode()
    answer = server.request("GET", "/v1/models", [auth, *([b"X-Dup: a"] * 2000)])
    status = status_of(answer)
    assert status is None or status < 500, answer[:300]
    # The token repeated: the gateway takes one of them, never a 5xx.
    answer = server.request(
        "POST", "/v1/chat/completions", [auth] * 50 + [b"Content-Type: application/json"], CHAT
    )
    assert status_of(answer) is not None and status_of(answer) < 500, answer[:300]
    server.still_serving()


@pytest.mark.parametrize(
    "value",
    [b"a\rX-Injected: yes", b"a\nX-Injected: yes", b"a\r\n X-Injected: yes", b"a\x00b"],
    ids=["bare CR", "bare LF", "obsolete folding", "NUL"],
)
def test_cr_lf_and_nul_in_a_header_value_never_split_the_response(server: Server, value: bytes):
    smuggled = (
        b"\r\n\r\nGET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + MONITOR_TOKEN.encode()
    )
    answer = server.request(
        "GET",
        "/v1/models",
        [b"Authorization: Bearer " + PROXY_TOKEN.encode(), b"X-Request-ID: " + value + smuggled],
    )
    status = status_of(answer)
    assert status is None or status < 500, answer[:300]
    assert b"x-injected" not in answer.lower()
    # One request, one answer: nothing after the first response was taken for a second one
    # (the smuggled /metrics call would answer with Prometheus text).
    assert len(re.findall(rb"(?:^|\r\n)HTTP/1\.[01] \d{3} ", answer)) <= 1, answer[:500]
    assert b"# HELP" not in answer
    server.still_serving()


@pytest.mark.parametrize(
    ("method", "path", "token"),
    [
        ("POST", "/v1/chat/completions", PROXY_TOKEN),
        ("GET", "/api/usage", MONITOR_TOKEN),
        ("GET", "/v1/usage/stats", MONITOR_TOKEN),
        ("GET", "/dashboard/", None),
    ],
)
def test_a_host_outside_allowed_hosts_is_a_400_without_internals(
    server: Server, method: str, path: str, token: str | None
):
    headers = [b"Content-Type: application/json"]
    if token:
        headers.append(b"Authorization: Bearer " + token.encode())
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: evil.example", *headers]
    lines += [b"Connection: close", f"Content-Length: {len(CHAT)}".encode()]
    answer = server.exchange(b"\r\n".join(lines) + b"\r\n\r\n" + CHAT)
    assert status_of(answer) == 400, answer[:500]
    assert not INTERNALS.search(answer), answer[:2000]
    server.still_serving()
    # Logged as one warning line (llmrotate_site.logging.OneLineWarning), not as Django's
    # ERROR with a traceback; the fixture's teardown finds no traceback in the whole log.
    warning = "WARNING django.security.DisallowedHost: Invalid HTTP_HOST header: 'evil.example'"
    wait_for(lambda: warning in server.process.output(), timeout=10, message="no warning line")


@pytest.mark.parametrize(
    "value", [b"x" * 8000, b"abc\tdef<script>", b"../../etc/passwd"], ids=["8 KB", "odd", "path"]
)
def test_a_callers_request_id_is_never_echoed(server: Server, value: bytes):
    answer = server.request(
        "POST",
        "/v1/chat/completions",
        [
            b"Authorization: Bearer " + PROXY_TOKEN.encode(),
            b"Content-Type: application/json",
            b"X-Request-ID: " + value,
        ],
        CHAT,
    )
    assert status_of(answer) == 200, answer[:500]
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert value not in head
    ids = head_of(answer).get(b"x-llmrotate-request-id")
    assert ids and re.fullmatch(rb"[0-9a-f]{32}", ids[0]), head  # the gateway's own id
