"""A raw HTTP/1.1 upstream that misbehaves on purpose, for the chaos tests.

The fake upstream (fake_upstream/) answers like a provider that sometimes fails; this one
answers like a broken network or a hostile server: a byte a second, bodies that never end,
megabyte-long SSE lines, invalid UTF-8, connections reset as soon as they are accepted. It
speaks just enough HTTP to be called by the gateway (a request head, a Content-Length body),
runs on its own event loop in a thread, and counts what it saw, so that a test can compare the
gateway's call records with the attempts that really reached the upstream.

The behaviour is the server's `mode`, set by the test between scenarios:

| mode | answer |
|---|---|
| `ok` | a chat completion, JSON or SSE (`events` chunks `event_delay` s apart, then `[DONE]`) |
| `slow_head` | the status line, then header bytes one every `drip` seconds, forever |
| `slow_body` | a whole head (Content-Length 100000), then a body byte every `drip` seconds |
| `endless_json` | 200 `application/json`, chunked, a string that never closes, as fast as read |
| `huge_sse` | a first chunk, a `data:` line of `line_bytes` bytes, the rest and `[DONE]` |
| `bad_utf8` | a JSON answer, or a stream's second chunk, with bytes that are not UTF-8 |
| `endless_sse` | chunks every `event_delay` s, never `[DONE]` |
| `firehose_sse` | chunks of `chunk_bytes` as fast as the socket takes them, never `[DONE]` |
| `reset` | the connection is reset (SO_LINGER 0) as soon as it is accepted, nothing read |
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Only the standard library at the top: `storm` runs its clients in a child process that
# imports this module, and the SDKs and the gateway's test helpers would double its start-up.


def completion(text: str = "hello there") -> dict[str, Any]:
    return {
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def chunk(content: str | None = None, *, role: bool = False, finish: bool = False) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    body = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if finish else None}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


class HostileUpstream:
    def __init__(self) -> None:
        self.reset()
        self.connections = 0  # accepted
        self.requests: Counter[str] = Counter()  # whole request heads read, by mode
        self.requests_reset = 0  # connections reset before anything was read
        self.bytes_sent = 0  # body bytes written (firehose_sse, endless_json)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def attempts(self) -> int:
        """What reached this upstream: each reset connection, each request read."""
        return self.requests.total() + self.requests_reset

    def reset(self) -> None:
        """Well-behaved again, with the default knobs, and nothing counted."""
        self.mode = "ok"
        self.drip = 1.0  # seconds between two bytes (slow_head, slow_body)
        self.events = 5  # content chunks of an `ok` stream
        self.event_delay = 0.0  # seconds between two chunks (ok, endless_sse)
        self.line_bytes = 4 * 1024 * 1024  # the huge_sse line
        self.chunk_bytes = 64 * 1024  # firehose_sse
        self.reset_counters()

    def reset_counters(self) -> None:
        self.connections = 0
        self.requests = Counter()
        self.requests_reset = 0
        self.bytes_sent = 0

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> HostileUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                self._server = await asyncio.start_server(
                    self._handle, "127.0.0.1", 0, backlog=4096, limit=1 << 20
                )
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()
                async with self._server:
                    await self._server.serve_forever()

            try:
                loop.run_until_complete(serve())
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="hostile-upstream", daemon=True)
        self._thread.start()
        assert ready.wait(10), "the hostile upstream did not start"
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        def shut() -> None:
            server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()

        loop.call_soon_threadsafe(shut)
        assert self._thread is not None
        self._thread.join(10)

    def __enter__(self) -> HostileUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- one connection -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.mode == "reset":
                self.requests_reset += 1
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                mode = self.mode
                self.requests[mode] += 1
                stream = b'"stream":true' in body.replace(b" ", b"")
                keep = await self._answer(mode, stream, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return
        finally:
            writer.transport.abort()

    async def _answer(self, mode: str, stream: bool, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection may carry another."""
        if mode == "slow_head":
            writer.write(b"HTTP/1.1 200 OK\r\n")
            while True:  # an endless header, a byte at a time
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(self.drip)
        if mode == "slow_body":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: 100000\r\n\r\n{"
            )
            while True:
                await writer.drain()
                await asyncio.sleep(self.drip)
                writer.write(b" ")
        if mode == "endless_json":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + _chunked(b'{"id": "')
            )
            piece = _chunked(b"a" * 65536)
            while True:
                writer.write(piece)
                self.bytes_sent += 65536
                await writer.drain()
        if mode == "reset":  # the mode changed while this connection was open
            return False
        if not stream:
            if mode == "bad_utf8":
                body = (
                    json.dumps(completion("caf\u00e9")).encode().replace(b"\xc3\xa9", b"\xff\xfe")
                )
            else:
                body = json.dumps(completion()).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            return True
        writer.write(SSE_HEAD + _chunked(chunk(role=True)))
        await writer.drain()
        if mode == "huge_sse":
            line = b'data: {"choices": [{"index": 0, "delta": {"content": "'
            writer.write(_chunked(line + b"z" * self.line_bytes + b'"}}]}\n\n'))
            await writer.drain()
        elif mode == "bad_utf8":
            writer.write(_chunked(chunk("caf\u00e9").replace(b"\xc3\xa9", b"\xff\xfe")))
            await writer.drain()
        elif mode == "endless_sse":
            while True:
                await asyncio.sleep(self.event_delay)
                writer.write(_chunked(chunk("more ")))
                await writer.drain()
        elif mode == "firehose_sse":
            data = b'data: {"choices": [{"index": 0, "delta": {"content": "'
            piece = _chunked(data + b"y" * (self.chunk_bytes - len(data) - 8) + b'"}}]}\n\n')
            while True:
                writer.write(piece)
                self.bytes_sent += len(piece)
                await writer.drain()
        for n in range(self.events):
            if self.event_delay:
                await asyncio.sleep(self.event_delay)
            writer.write(_chunked(chunk(f"word{n} ")))
            await writer.drain()
        usage = {"prompt_tokens": 3, "completion_tokens": self.events, "total_tokens": 8}
        tail = (
            chunk(finish=True)
            + b"data: "
            + json.dumps(
                {
                    "id": "chatcmpl-hostile",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "gpt-4o-mini",
                    "choices": [],
                    "usage": usage,
                }
            ).encode()
            + b"\n\ndata: [DONE]\n\n"
        )
        writer.write(_chunked(tail) + b"0\r\n\r\n")
        await writer.drain()
        return True


# ---- the gateway in front of it, and what the tests ask of both ----------------------------

ROUTE = "gpt-4o-mini"
KEYS = ("key-a", "key-b")
# Every answer a client may get besides a success (docs/errors.md): (status, code).
DOCUMENTED = {
    (413, "request_too_large"),
    (502, "upstream_error"),
    (503, "no_key_available"),
    (504, "upstream_timeout"),
}
# The codes of a stream's closing error event (docs/errors.md, errors in the middle of a stream).
STREAM_CODES = {
    "stream_interrupted",
    "stream_truncated",
    "upstream_timeout",
    "event_too_large",
    "stream_too_long",
}


def chaos_config(base_url: str, *, cooldown: int = 30) -> dict[str, Any]:
    return {
        "providers": {
            "hostile": {
                "kind": "openai",
                "base_url": base_url,
                "cooldown_seconds": cooldown,
                "quarantine_seconds": 300,
            }
        },
        "keys": [
            {"id": key_id, "provider": "hostile", "secret": f"literal://sk-chaos-{key_id}-0000"}
            for key_id in KEYS
        ],
        "routes": {
            ROUTE: {
                "strategy": "round_robin",
                "deployments": [{"provider": "hostile", "model": ROUTE}],
            }
        },
        "clients": [{"name": "chaos", "routes": ["*"], "scopes": ["proxy"]}],
    }


def rss_bytes() -> int:
    """This process's resident set (the gateway runs in one of its threads)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@dataclass
class Result:
    kind: str
    status: int | None  # None: the call raised something that is not an API error
    code: str | None
    seconds: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.code is None


@dataclass
class Chaos:
    base_url: str  # http://127.0.0.1:<port>
    token: str
    upstream_url: str

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def call(self, kind: str, *, timeout: float) -> Result:
        """One call with an official SDK (retries off): `openai_json`, `openai_stream`,
        `anthropic_json`, `anthropic_stream`. Timed from the request, not the SDK's set-up."""
        import anthropic
        import openai

        status: int | None = 200
        code: str | None = None
        detail = ""
        gpt = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.token, max_retries=0, timeout=timeout
        )
        claude = anthropic.Anthropic(
            base_url=self.base_url, api_key=self.token, max_retries=0, timeout=timeout
        )
        t0 = time.monotonic()
        try:
            if kind == "openai_json":
                gpt.chat.completions.create(model=ROUTE, messages=HELLO)
            elif kind == "openai_stream":
                for _ in gpt.chat.completions.create(model=ROUTE, messages=HELLO, stream=True):
                    pass
            elif kind == "anthropic_json":
                claude.messages.create(model=ROUTE, max_tokens=16, messages=HELLO)
            else:
                with claude.messages.stream(model=ROUTE, max_tokens=16, messages=HELLO) as stream:
                    for _ in stream.text_stream:
                        pass
        except openai.APIStatusError as exc:
            status, code, detail = exc.status_code, exc.code, exc.response.text[:500]
        except anthropic.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error") if isinstance(body.get("error"), dict) else body
            status, code, detail = exc.status_code, error.get("code"), str(exc.body)[:500]
        except openai.APIError as exc:  # an error event in a stream that answered 200
            code, detail = exc.code or "?", str(exc.body)[:500]
        except Exception as exc:  # a hang cut by the client, a broken connection: not allowed
            status, code, detail = None, type(exc).__name__, repr(exc)[:500]
        finally:
            gpt.close()
            claude.close()
        return Result(kind, status, code, time.monotonic() - t0, detail)

    def traffic(self, kinds: list[str], *, timeout: float) -> list[Result]:
        """The calls, all at once, each in a thread of its own."""
        with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
            return list(pool.map(lambda kind: self.call(kind, timeout=timeout), kinds))

    def health(self) -> dict[str, Any]:
        import httpx

        answer = httpx.get(f"{self.base_url}/internal/health", timeout=10)
        return answer.json()["endpoint_health"][self.upstream_url]


HELLO: Any = [{"role": "user", "content": "hello"}]


def assert_documented(results: list[Result], *, bound: float) -> None:
    """Each call succeeded or got a documented error, in time; none got a 500 or a bare
    connection failure, and no error shows the gateway's internals."""
    for result in results:
        assert result.seconds <= bound, f"{result} took longer than {bound}s"
        if result.ok:
            continue
        assert result.status is not None, f"not an API error: {result}"
        if result.status == 200:
            assert result.code in STREAM_CODES, result
        else:
            assert (result.status, result.code) in DOCUMENTED, result
        assert "Traceback" not in result.detail and 'File "' not in result.detail, result


def upstream_records() -> list[Any]:
    """The call records of attempts that went upstream (refusals have attempt 0)."""
    from usage.models import CallRecord
    from usage.recorder import get_recorder

    assert get_recorder().flush(timeout=20), "call records were not written in time"
    return list(CallRecord.objects.filter(attempt__gte=1))


def keys_idle() -> dict[str, Any]:
    """Each key's state, once none has a call in flight (a settle lands just after the
    client's last byte)."""
    from keys.state_store import get_key_state_store
    from tests.e2e.conftest import wait_for

    store = get_key_state_store()

    def idle() -> dict[str, Any] | None:
        snapshot = store.get_many(list(KEYS), now=time.time())
        if any(inflight for _, inflight in snapshot.values()):
            return None
        return {key_id: state for key_id, (state, _) in snapshot.items()}

    return wait_for(idle, timeout=15, message="a key still has calls in flight")


@contextlib.contextmanager
def chaos_gateway(upstream_url: str, *, cooldown: int = 30) -> Iterator[Chaos]:
    """The gateway (uvicorn in a thread of this process) configured for `upstream_url`. The
    caller has applied its settings (pytest-django's `settings`) before: the gateway reads
    them when it starts and on each call."""
    from keys.config_io import config_import
    from tests.conftest import free_port
    from tests.e2e.conftest import GatewayThread
    from usage.recorder import get_recorder

    report = config_import(data=chaos_config(upstream_url, cooldown=cooldown))
    server = GatewayThread(free_port())
    server.start()
    try:
        yield Chaos(
            base_url=f"http://127.0.0.1:{server.port}",
            token=report.generated_tokens["chaos"],
            upstream_url=upstream_url,
        )
    finally:
        server.stop()
        gc.collect()
        assert get_recorder().stop(timeout=10), "call records were not written in time"


# ---- many raw clients, in a process of their own ------------------------------------------
# A thousand SDK clients in the test's process would share its interpreter lock with the
# gateway they measure; raw asyncio clients in a child process leave it the process.


async def raw_call(
    port: int, token: str, *, stream: bool, leave_after: int | None = None
) -> dict[str, Any]:
    """POST /v1/chat/completions over a socket of its own (`Connection: close`). With
    `leave_after`, the client hangs up once that many bytes of the answer's body arrived."""
    payload = {"model": ROUTE, "messages": HELLO, "stream": stream}
    body = json.dumps(payload).encode()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
        b"content-type: application/json\r\nauthorization: Bearer %s\r\n"
        b"content-length: %d\r\n\r\n%s" % (token.encode(), len(body), body)
    )
    result: dict[str, Any] = {"status": None, "code": None, "left": False}
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        result["status"] = int(head.split(b" ", 2)[1])
        data = b""
        while True:
            piece = await reader.read(65536)
            if not piece:
                break
            data += piece
            if leave_after is not None and len(data) >= leave_after:
                result["left"] = True
                break
        if result["status"] != 200:
            result["code"] = _error_code(data)
        elif stream and not result["left"]:
            result["code"] = None if b"data: [DONE]" in data else _error_code(data) or "no_done"
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        result["code"] = type(exc).__name__
    finally:
        result["seconds"] = time.monotonic() - t0
        writer.transport.abort() if result["left"] else writer.close()
    return result


def _error_code(data: bytes) -> str | None:
    start = data.find(b'{"error"')
    if start < 0:
        return "no_error_body"
    end = data.find(b"\n", start)
    try:
        return json.loads(data[start : end if end > 0 else None].split(b"\r\n")[0])["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unreadable"


def storm(port: int, token: str, plan: list[dict[str, Any]], *, timeout: float) -> list[Any]:
    """Run `plan` (one dict of raw_call's keywords per client) in a child process, all at
    once; each call's result, in plan order."""
    program = (
        "import asyncio, json, sys\n"
        "from tests.chaos.hostile_upstream import raw_call\n"
        "port, token, plan = json.loads(sys.stdin.read())\n"
        "async def main():\n"
        "    return await asyncio.gather(*(raw_call(port, token, **p) for p in plan))\n"
        "print(json.dumps(asyncio.run(main())))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        input=json.dumps([port, token, plan]),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return list(json.loads(done.stdout))
