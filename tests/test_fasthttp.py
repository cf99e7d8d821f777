"""common/fasthttp.py against real servers on 127.0.0.1: the fake upstream for the OpenAI wire
format, and small asyncio servers in each test for keep-alive, limits and misbehaviour. Every
test runs on the default event loop and on uvloop (the gateway's)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import ipaddress
import json
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from common.fasthttp import HIGH_WATER, FastTransport, _Pool
from fake_upstream import FakeUpstream
from tests.conftest import free_port

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
AUTH = {"Authorization": "Bearer k1"}
Run = Callable[[Coroutine[Any, Any, Any]], Any]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def go(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    return go


# ---- a small server in the test's own loop -------------------------------------------------


class Server:
    """Counts connections; each is handed to `handler` (which reads and writes raw bytes)."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.closed = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    """(request line, headers lowercased, body), or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    line, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for item in rest:
        if item:
            name, _, value = item.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            body = body[:-2]
            if size == 0:
                break
    return line, headers, body


def answer(body: bytes = b"ok", *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def keep_alive(reply: Callable[[str, dict[str, str], bytes], bytes]) -> Handler:
    """A well-behaved keep-alive server answering each request with `reply(...)`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            writer.write(reply(*request))
            await writer.drain()

    return handler


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def client(**kwargs: Any) -> httpx.AsyncClient:
    timeout = kwargs.pop("timeout", 5.0)
    return httpx.AsyncClient(transport=FastTransport(**kwargs), timeout=timeout)


def only_pool(transport: httpx.AsyncBaseTransport) -> _Pool:
    assert isinstance(transport, FastTransport)
    (pool,) = transport._pools.values()
    return pool


# ---- the fake upstream: the OpenAI wire format ---------------------------------------------


def test_json_and_sse_through_the_fake_upstream(run: Run, fake: FakeUpstream) -> None:
    fake.script(default={"token_delay_ms": 40})

    async def main() -> None:
        async with client() as c:
            r = await c.post(f"{fake.base_url}/chat/completions", json=CHAT, headers=AUTH)
            assert r.status_code == 200 and r.http_version == "HTTP/1.1"
            assert r.reason_phrase == "OK"
            assert r.json()["object"] == "chat.completion"
            assert r.headers["x-ratelimit-limit-requests"]

            arrivals: list[float] = []
            events: list[str] = []
            stream = {**CHAT, "stream": True, "max_tokens": 8}
            async with c.stream(
                "POST", f"{fake.base_url}/chat/completions", json=stream, headers=AUTH
            ) as s:
                assert s.headers["content-type"].startswith("text/event-stream")
                async for line in s.aiter_lines():
                    if line:
                        arrivals.append(time.monotonic())
                        events.append(line)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[0]["object"] == "chat.completion.chunk"
        # Streamed as sent, not buffered: the first event came long before the last.
        assert arrivals[-1] - arrivals[0] > 0.2

    run(main())


def test_a_cut_stream_is_a_protocol_error(run: Run, fake: FakeUpstream) -> None:
    fake.script(keys={"k1": {"queue": [{"fault": "cut", "cut_after": 3}, "cut"]}})

    async def main() -> None:
        async with client() as c:
            seen: list[str] = []
            stream = {**CHAT, "stream": True}
            with pytest.raises(httpx.RemoteProtocolError):
                async with c.stream(
                    "POST", f"{fake.base_url}/chat/completions", json=stream, headers=AUTH
                ) as s:
                    async for line in s.aiter_lines():
                        if line:
                            seen.append(line)
            assert len(seen) == 3
            with pytest.raises(httpx.RemoteProtocolError):  # a short Content-Length body
                await c.post(f"{fake.base_url}/chat/completions", json=CHAT, headers=AUTH)
            r = await c.post(f"{fake.base_url}/chat/completions", json=CHAT, headers=AUTH)
            assert r.status_code == 200

    run(main())


# ---- keep-alive and the pool ---------------------------------------------------------------


def test_sequential_calls_share_one_connection(run: Run) -> None:
    async def main() -> None:
        async with Server(keep_alive(lambda line, h, body: answer(body))) as srv, client() as c:
            for i in range(5):
                r = await c.post(srv.url("/echo?x=1"), content=f"call {i}".encode())
                assert r.content == f"call {i}".encode()
            assert srv.connections == 1

    run(main())


def test_the_request_goes_out_as_httpx_built_it(run: Run) -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []

    def reply(line: str, headers: dict[str, str], body: bytes) -> bytes:
        seen.append((line, headers, body))
        return answer()

    async def main() -> None:
        async with Server(keep_alive(reply)) as srv, client() as c:
            await c.post(srv.url("/v1/a%20b?q=1&r=%2F"), json={"a": 1}, headers={"X-Tag": "t"})
        line, headers, body = seen[0]
        assert line == "POST /v1/a%20b?q=1&r=%2F HTTP/1.1"
        assert next(iter(headers)) == "host" and headers["host"] == f"127.0.0.1:{srv.port}"
        assert headers["x-tag"] == "t" and headers["content-type"] == "application/json"
        assert json.loads(body) == {"a": 1}

    run(main())


def test_a_streamed_request_body_is_sent_chunked(run: Run) -> None:
    seen: list[tuple[dict[str, str], bytes]] = []

    def reply(line: str, headers: dict[str, str], body: bytes) -> bytes:
        seen.append((headers, body))
        return answer(body)

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one ", b"", b"two ", b"three"):
            yield part

    async def main() -> None:
        async with Server(keep_alive(reply)) as srv, client() as c:
            r = await c.post(srv.url(), content=parts())
            assert r.content == b"one two three"
        assert seen[0][0]["transfer-encoding"] == "chunked"

    run(main())


def test_a_header_that_would_smuggle_another_is_refused(run: Run) -> None:
    async def main() -> None:
        async with Server(keep_alive(lambda *a: answer())) as srv, client() as c:
            with pytest.raises(httpx.LocalProtocolError):
                await c.get(srv.url(), headers={"X-A": "b\r\nX-Injected: 1"})
            assert (await c.get(srv.url())).status_code == 200  # the slot was given back

    run(main())


def test_idle_connections_closed_by_the_server_are_dropped(run: Run) -> None:
    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer())  # keep-alive, then closed: an idle timeout on the server
        await writer.drain()

    async def main() -> None:
        async with Server(close_after_one) as srv, client() as c:
            assert (await c.get(srv.url())).status_code == 200
            pool = only_pool(c._transport)
            await until(lambda: not pool.idle)  # seen from connection_lost, not a poll
            assert pool.count == 0
            assert (await c.get(srv.url())).status_code == 200
            assert srv.connections == 2

    run(main())


def test_connection_close_and_http10_answers_are_not_reused(run: Run) -> None:
    # (answer, whether the server closes after it: the body's end is the connection's)
    replies = iter(
        [
            (answer(b"a", "Connection: close"), False),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb", False),
            (b"HTTP/1.0 200 OK\r\n\r\nread until the end", True),
        ]
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        reply, closes = next(replies)
        writer.write(reply)
        await writer.drain()
        if not closes:
            # The server leaves it to the client to close.
            with contextlib.suppress(asyncio.IncompleteReadError):
                await reader.readexactly(1)

    async def main() -> None:
        async with Server(handler) as srv, client() as c:
            assert (await c.get(srv.url())).content == b"a"
            assert (await c.get(srv.url())).content == b"b"
            r = await c.get(srv.url())
            assert r.content == b"read until the end"
            assert srv.connections == 3
            await until(lambda: srv.closed == 3)  # the client closed all three
            assert only_pool(c._transport).count == 0

    run(main())


def test_pool_limits_and_pool_timeout(run: Run) -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await read_request(reader) is not None:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
                await writer.drain()
                await gate.wait()
                writer.write(b"cd")
                await writer.drain()

        limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
        timeout = httpx.Timeout(5.0, pool=0.2)
        async with Server(slow) as srv, client(limits=limits, timeout=timeout) as c:
            first = await c.send(c.build_request("GET", srv.url()), stream=True)
            second = await c.send(c.build_request("GET", srv.url()), stream=True)
            t0 = time.monotonic()
            with pytest.raises(httpx.PoolTimeout):
                await c.get(srv.url())
            assert time.monotonic() - t0 >= 0.15
            third = asyncio.create_task(c.get(srv.url(), timeout=5.0))
            await until(lambda: len(only_pool(c._transport).waiters) == 1)  # waits for a slot
            assert not third.done()
            gate.set()
            assert await first.aread() == b"abcd"
            assert await second.aread() == b"abcd"
            assert (await third).content == b"abcd"
            assert srv.connections == 2
            pool = only_pool(c._transport)
            assert len(pool.idle) == 1 and pool.count == 1  # one kept, the other closed
            await until(lambda: srv.closed == 1)

    run(main())


def test_the_most_recently_used_connection_is_taken_first(run: Run) -> None:
    async def main() -> None:
        async with Server(keep_alive(lambda *a: answer())) as srv, client() as c:
            responses = [await c.send(c.build_request("GET", srv.url()), stream=True) for _ in "ab"]
            for r in responses:
                await r.aread()
            pool = only_pool(c._transport)
            newest = pool.idle[-1]
            await c.get(srv.url())
            assert pool.idle[-1] is newest and len(pool.idle) == 2

    run(main())


# ---- errors --------------------------------------------------------------------------------


def test_connection_refused_is_a_connect_error(run: Run) -> None:
    async def main() -> None:
        async with client() as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(f"http://127.0.0.1:{free_port()}/")
            assert only_pool(c._transport).count == 0

    run(main())


def test_a_tls_handshake_that_never_comes_is_a_connect_timeout(run: Run) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def main() -> None:
        async with Server(silent) as srv, client(timeout=httpx.Timeout(5.0, connect=0.2)) as c:
            t0 = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                await c.get(srv.url(scheme="https"))
            assert time.monotonic() - t0 < 2
            assert only_pool(c._transport).count == 0

    run(main())


def test_a_stalled_body_is_a_read_timeout(run: Run) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(stall) as srv, client(timeout=httpx.Timeout(5.0, read=0.2)) as c:
            async with c.stream("GET", srv.url()) as r:
                assert r.status_code == 200
                got = b""
                with pytest.raises(httpx.ReadTimeout):
                    async for part in r.aiter_raw():
                        got += part
                assert got == b"0123456789"
            await until(lambda: srv.closed == 1)  # the connection was closed, not pooled
            assert only_pool(c._transport).count == 0

    run(main())


def test_no_answer_in_time_is_a_read_timeout(run: Run) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def main() -> None:
        async with Server(mute) as srv, client(timeout=httpx.Timeout(5.0, read=0.2)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get(srv.url())

    run(main())


def test_a_reset_mid_body_is_a_read_error(run: Run) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with linger 0: RST, not FIN

    async def main() -> None:
        async with Server(reset) as srv, client() as c:
            with pytest.raises(httpx.ReadError):
                await c.get(srv.url())

    run(main())


def test_a_close_mid_body_and_a_silent_close_are_protocol_errors(run: Run) -> None:
    replies = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", b""])

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(next(replies))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv, client() as c:
            with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
                await c.get(srv.url())
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await c.get(srv.url())

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [b"HTTP/1.1 OK\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"],
)
def test_a_malformed_answer_is_a_protocol_error(run: Run, garbage: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(garbage)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(handler) as srv, client() as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(srv.url())
            assert only_pool(c._transport).count == 0

    run(main())


# ---- bodies --------------------------------------------------------------------------------


def test_chunked_gzip_head_and_bodiless_answers(run: Run) -> None:
    packed = gzip.compress(json.dumps({"hello": "world"}).encode())

    def reply(line: str, headers: dict[str, str], body: bytes) -> bytes:
        path = line.split()[1]
        if path == "/chunked":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (
                b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
            )
        if path == "/gzip":
            return answer(packed, "Content-Encoding: gzip", "Content-Type: application/json")
        if path == "/continue":
            return b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"after")
        if path == "/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if path == "/304":
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"
        if path == "/head":  # the Content-Length of the body a GET would get, no body
            return answer(b"not for HEAD")[: -len(b"not for HEAD")]
        return answer()

    async def main() -> None:
        async with Server(keep_alive(reply)) as srv, client() as c:
            assert (await c.get(srv.url("/chunked"))).content == b"hello world"
            assert (await c.get(srv.url("/gzip"))).json() == {"hello": "world"}
            assert (await c.get(srv.url("/continue"))).content == b"after"
            head = await c.head(srv.url("/head"))
            assert head.headers["content-length"] == "12" and head.content == b""
            assert (await c.get(srv.url("/204"))).status_code == 204
            assert (await c.get(srv.url("/304"))).content == b""
            assert (await c.get(srv.url("/chunked"))).content == b"hello world"
            assert srv.connections == 1

    run(main())


def test_a_body_larger_than_the_bound_waits_for_its_reader(run: Run) -> None:
    big = bytes(range(256)) * (8 * HIGH_WATER // 256)

    async def main() -> None:
        async with Server(keep_alive(lambda *a: answer(big))) as srv, client() as c:
            async with c.stream("GET", srv.url()) as r:
                pool = only_pool(c._transport)
                (conn,) = pool.conns
                await until(lambda: conn.read_paused)  # nobody reads: the socket is not read
                await asyncio.sleep(0.05)
                assert conn.buffered < 2 * HIGH_WATER
                assert await r.aread() == big
            assert (await c.get(srv.url())).content == big
            assert srv.connections == 1

    run(main())


def test_a_connection_closed_with_its_body_unread_is_not_reused(run: Run) -> None:
    # All of a body past the bound arrives while nobody reads it (reading paused), then the
    # caller closes the response: reused, the next exchange on it would never be read.
    body = b"x" * (HIGH_WATER + 50_000)

    async def main() -> None:
        async with Server(keep_alive(lambda *a: answer(body))) as srv, client(timeout=2) as c:
            async with c.stream("GET", srv.url()) as r:
                (conn,) = only_pool(c._transport).conns
                await until(lambda: conn.complete and conn.read_paused)
            assert r.is_closed
            started = time.monotonic()
            assert (await c.get(srv.url())).content == body
            assert time.monotonic() - started < 1.0  # not a read timeout's wait
            assert srv.connections == 2  # a new connection; the paused one was closed

    run(main())


# ---- cancellation and closing --------------------------------------------------------------


def test_cancelled_mid_body_or_mid_head_releases_the_slot(run: Run) -> None:
    async def main() -> None:
        stalled = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line, _, _ = await read_request(reader) or ("", {}, b"")
            if "/stall-body" in line:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01")
            elif "/ok" in line:
                writer.write(answer())
            await writer.drain()
            stalled.set()
            await reader.read()

        limits = httpx.Limits(max_connections=1)
        async with Server(handler) as srv, client(limits=limits) as c:
            for path in ("/stall-body", "/stall-head"):
                stalled.clear()
                task = asyncio.create_task(c.get(srv.url(path)))
                await stalled.wait()
                await asyncio.sleep(0.02)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                pool = only_pool(c._transport)
                assert pool.count == 0 and not pool.conns
            assert (await c.get(srv.url("/ok"), timeout=httpx.Timeout(2, pool=1))).content
            await until(lambda: srv.closed >= 2)

    run(main())


def test_closing_the_transport_closes_every_connection(run: Run) -> None:
    async def main() -> None:
        async with Server(keep_alive(lambda *a: answer())) as srv:
            c = client()
            busy = await c.send(c.build_request("GET", srv.url()), stream=True)
            await c.get(srv.url())
            assert srv.connections == 2
            await c.aclose()
            await until(lambda: srv.closed == 2)
            del busy

    run(main())


# ---- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a leaf for 127.0.0.1 and localhost signed by it, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmrotate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    root = tmp_path_factory.mktemp("tls")
    files = {"ca": root / "ca.pem", "cert": root / "leaf.pem", "key": root / "leaf.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def test_tls_is_verified_and_speaks_http11(run: Run, certificates: dict[str, Path]) -> None:
    offered: list[str | None] = []

    def server_context() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificates["cert"], certificates["key"])
        context.set_alpn_protocols(["h2", "http/1.1"])
        return context

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        offered.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
        await keep_alive(lambda *a: answer(b"secret"))(reader, writer)

    async def main() -> None:
        async with Server(handler, server_context()) as srv:
            async with client() as c:  # certifi's CAs: a self-signed chain is refused
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await c.get(srv.url(scheme="https"))
                assert only_pool(c._transport).count == 0
            trusting = ssl.create_default_context(cafile=str(certificates["ca"]))
            async with client(ssl_context=trusting) as c:
                for host in ("127.0.0.1", "localhost"):
                    r = await c.get(f"https://{host}:{srv.port}/")
                    assert r.content == b"secret"
                assert (await c.get(srv.url(scheme="https"))).content == b"secret"
            assert offered and set(offered) == {"http/1.1"}
            assert srv.connections == 2  # one per host name, kept alive (the refused one
            # never finished its handshake)

    run(main())


# ---- what it does not speak, and the wiring ------------------------------------------------


def test_another_scheme_goes_to_httpx_own_transport(run: Run) -> None:
    async def main() -> None:
        transport = FastTransport()
        with pytest.raises(httpx.UnsupportedProtocol):
            await transport.handle_async_request(httpx.Request("GET", "ftp://127.0.0.1/"))
        assert isinstance(transport._fallback_transport, httpx.AsyncHTTPTransport)
        await transport.aclose()

    run(main())


def test_the_gateway_uses_it_unless_told_otherwise(settings: Any) -> None:
    from common.upstream import ShardedTransport, _network_transport

    settings.LLMROTATE_UPSTREAM_MAX_CONNECTIONS = 50
    settings.LLMROTATE_UPSTREAM_POOL_SHARDS = 8
    transport = _network_transport()
    assert isinstance(transport, FastTransport)
    assert transport.limits.max_connections == 50
    assert transport.limits.max_keepalive_connections == 50
    settings.LLMROTATE_UPSTREAM_TRANSPORT = "httpx"
    assert isinstance(_network_transport(), ShardedTransport)
