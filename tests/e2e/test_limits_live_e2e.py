"""Limits through the live gateway (one process, a real socket, the real fake upstream): what a
request reserved is settled from what it used; the official OpenAI SDK's retries read our 429;
a Redis that dies under the limiter fails open within its timeout (or closed, if so set); and
every refusal leaves exactly one call record.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import httpx2
import openai
import pytest
from django.conf import settings

from tests.e2e.conftest import ROUTE, LiveGateway, call_records, metric_sum, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _empty_limiter() -> Iterator[None]:
    """No counters from another test (in process, and the test leg's Redis prefix)."""
    from keys.limits import get_limiter, reset_limiter

    reset_limiter()
    get_limiter().clear()
    yield
    get_limiter().clear()
    reset_limiter()


def limit(**fields: Any) -> Any:
    """A Limit on the gateway's client token, seen by the gateway at once."""
    from keys.models import ClientToken, Limit
    from keys.routing import invalidate_routing_cache

    row = Limit.objects.create(client=ClientToken.objects.get(name="e2e"), **fields)
    invalidate_routing_cache()
    return row


def used(row: Any, kind: str, period: str, *, since: float) -> int:
    """A limit's counter of `kind` per `period`, summed over the windows since `since` (a
    request that crossed a minute boundary counted in the window it started in)."""
    from keys.limits import get_limiter, window

    zone = settings.LLMROTATE_LIMITS_TIME_ZONE
    keys = sorted(
        {f"l{row.pk}:{kind}:{period}:{window(period, t, zone)[0]}" for t in (since, time.time())}
    )
    reading = get_limiter().read(keys, [], now=time.time())
    assert not reading.error
    return sum(reading.used)


def post(gateway: LiveGateway, body: dict[str, Any], *, token: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {token or gateway.token}"},
        timeout=20,
    )


CHAT = {"model": ROUTE, "messages": [{"role": "user", "content": "Say hi"}]}


# --- settlement -------------------------------------------------------------------------------


def test_a_stream_cut_midway_settles_the_tokens_it_used(live_gateway: LiveGateway) -> None:
    row = limit(tokens_per_minute=1_000_000, tokens_per_day=1_000_000)
    # The upstream dies after the role chunk and three words: no usage chunk ever comes.
    live_gateway.script(key_a={"default": {"fault": "cut", "cut_after": 4}})
    live_gateway.script(key_b={"default": {"fault": "cut", "cut_after": 4}})
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 500}
    raw = json.dumps(body).encode()
    reservation = math.ceil(len(raw) / 4) + 500
    since = time.time()
    with (
        httpx.Client(timeout=20) as http,
        http.stream(
            "POST",
            f"{live_gateway.base_url}/v1/chat/completions",
            content=raw,
            headers={
                "Authorization": f"Bearer {live_gateway.token}",
                "Content-Type": "application/json",
            },
        ) as response,
    ):
        assert response.status_code == 200
        assert int(response.headers["x-ratelimit-remaining-tokens"]) == 1_000_000 - reservation
        text = ""
        try:
            for piece in response.iter_text():
                text += piece
        except httpx.HTTPError:
            pass  # the relay may end the stream as abruptly as the upstream did
    assert "[DONE]" not in text

    [record] = call_records(1)
    tokens = record.prompt_tokens + record.completion_tokens
    assert record.completion_tokens > 0  # it did use some: the words that were relayed
    assert tokens < reservation
    # The record was settled before it was written: the counters hold what the stream used,
    # not what it reserved.
    assert used(row, "tokens", "minute", since=since) == tokens
    assert used(row, "tokens", "day", since=since) == tokens


def test_a_failed_over_request_counts_once_against_requests_and_tokens(
    live_gateway: LiveGateway,
) -> None:
    live_gateway.prefer("key-a")
    row = limit(requests_per_minute=100, tokens_per_minute=1_000_000)
    live_gateway.script(key_a=[{"fault": "429"}])
    since = time.time()

    response = post(live_gateway, CHAT)
    assert response.status_code == 200, response.text
    assert response.headers["x-llmrotate-key"] == "key-b"
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert live_gateway.requests_per_key() == {"key-a": 1, "key-b": 1}

    first, second = call_records(2)
    assert (first.key_id, first.status_code, first.final) == ("key-a", 429, False)
    assert (second.key_id, second.status_code, second.final) == ("key-b", 200, True)
    answered = second.prompt_tokens + second.completion_tokens
    assert answered > 0
    assert used(row, "requests", "minute", since=since) == 1
    # The 429 used nothing; the answer's tokens count once, and the reservation is gone.
    recorded = sum(r.prompt_tokens + r.completion_tokens for r in (first, second))
    assert used(row, "tokens", "minute", since=since) == answered == recorded


# --- the OpenAI SDK's retries ---------------------------------------------------------------


def test_the_openai_sdk_waits_out_our_429_and_then_succeeds(live_gateway: LiveGateway) -> None:
    live_gateway.prefer("key-a")
    limit(max_concurrent=1)
    live_gateway.script(key_a=[{"latency_ms": 500}])  # the first request holds the only slot
    first: dict[str, Any] = {}

    def slow() -> None:
        first["response"] = post(live_gateway, CHAT)

    holder = threading.Thread(target=slow)
    holder.start()
    wait_for(lambda: live_gateway.upstream.stats()["total"] == 1, message="first not sent")

    seen: list[tuple[str, float, int, httpx2.Headers | None]] = []

    def on_request(request: httpx2.Request) -> None:
        seen.append(("request", time.monotonic(), 0, None))

    def on_response(response: httpx2.Response) -> None:
        seen.append(("response", time.monotonic(), response.status_code, response.headers))

    # The SDK's own HTTP client (the openai package ships httpx2), watched from outside.
    http = httpx2.Client(event_hooks={"request": [on_request], "response": [on_response]})
    sdk = openai.OpenAI(
        base_url=f"{live_gateway.base_url}/v1",
        api_key=live_gateway.token,
        max_retries=2,
        timeout=20,
        http_client=http,
    )
    try:
        completion = sdk.chat.completions.create(
            model=ROUTE, messages=[{"role": "user", "content": "Say hi"}]
        )
    finally:
        sdk.close()
        holder.join(20)
    assert completion.choices[0].message.content
    assert first["response"].status_code == 200

    statuses = [status for what, _, status, _ in seen if what == "response"]
    assert statuses[0] == 429 and statuses[-1] == 200, statuses
    assert set(statuses[:-1]) == {429}
    for i, (what, at, status, headers) in enumerate(seen[:-1]):
        if what == "response" and status == 429:
            assert headers is not None
            wait = int(headers["retry-after-ms"]) / 1000
            assert math.isclose(wait, float(headers["retry-after"]), abs_tol=1)
            retried_at = seen[i + 1][1]  # the SDK's next request
            assert retried_at - at >= wait * 0.9, (retried_at - at, wait)

    # The gateway saw the refusal, then the success, at least Retry-After apart.
    rows = call_records(1 + len(statuses))  # the slow one, each refusal, the success
    refused = [r for r in rows if r.client_status == 429]
    assert len(refused) == len(statuses) - 1
    assert {(r.attempt, r.outcome, r.error_type) for r in refused} == {
        (0, "rate_limited_by_gateway", "concurrency_limit_exceeded")
    }
    retried = [r for r in rows if r.client_status == 200 and r.started_at > refused[0].started_at]
    assert len(retried) == 1
    gap = (retried[0].started_at - refused[-1].finished_at).total_seconds()
    assert gap >= 0.9, gap


# --- Redis dies under the limiter -----------------------------------------------------------


class Forwarder:
    """A TCP forwarder on 127.0.0.1 in front of the real Redis: the gateway's REDIS_URL points
    here, and `stop()` is Redis dying (the listener and every connection closed)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        """Listen (again, on the same port once it has one): Redis is back."""
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.stopped:
                    client.close()
                    upstream.close()
                    return
                self.sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            sockets, self.sockets = self.sockets, set()
        self.listener.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def redis_via_forwarder(settings: Any) -> Iterator[Forwarder]:
    """Every Redis client of the gateway (limiter, key state, breakers) goes through a
    forwarder; the stores are rebuilt on it (the live gateway starts after this)."""
    from healthchecks.gate import reset_breaker_gate
    from keys.limits import reset_limiter
    from keys.state_store import reset_key_state_store

    real = urlsplit(settings.REDIS_URL)
    forwarder = Forwarder(real.hostname or "127.0.0.1", real.port or 6379)
    settings.REDIS_URL = urlunsplit(real._replace(netloc=f"127.0.0.1:{forwarder.port}"))
    for reset in (reset_limiter, reset_key_state_store, reset_breaker_gate):
        reset()
    yield forwarder
    forwarder.stop()
    for reset in (reset_limiter, reset_key_state_store, reset_breaker_gate):
        reset()


@dataclass
class Sent:
    started: float
    seconds: float
    status: int
    code: str


def limiter_errors(gateway: LiveGateway, token: str) -> float:
    return metric_sum(gateway.base_url, token, "llmrotate_limiter_errors_total")


@pytest.mark.scaled
def test_redis_dying_mid_traffic_fails_open_within_the_timeout_then_closed_with_503(
    redis_via_forwarder: Forwarder,
    live_gateway: LiveGateway,
    settings: Any,
    request: pytest.FixtureRequest,
) -> None:
    from keys.limits_redis import RedisLimiter
    from keys.services import client_token_create

    _, monitor = client_token_create(name="prometheus", routes=["*"], scopes=["monitor"])
    row = limit(requests_per_minute=100_000)
    real = RedisLimiter(
        settings.REDIS_URL.replace(f":{redis_via_forwarder.port}", ":6379"),
        prefix=settings.LLMROTATE_REDIS_PREFIX + "lim:",
        timeout=2,
    )
    request.addfinalizer(real.close)
    bound = settings.LLMROTATE_LIMITS_REDIS_TIMEOUT_SECONDS + 0.4  # the slack of a busy box
    sent: list[Sent] = []
    halt = threading.Event()

    def traffic() -> None:
        with httpx.Client(
            base_url=live_gateway.base_url,
            headers={"Authorization": f"Bearer {live_gateway.token}"},
            timeout=20,
        ) as http:
            while not halt.is_set():
                t0 = time.monotonic()
                response = http.post("/v1/chat/completions", json=CHAT)
                code = "" if response.status_code == 200 else response.json()["error"]["code"]
                sent.append(Sent(t0, time.monotonic() - t0, response.status_code, code))

    errors_before = limiter_errors(live_gateway, monitor)  # counters of earlier tests stay
    since = time.time()
    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        wait_for(lambda: len(sent) >= 10, message="no traffic")
        # Counted in the real Redis, through the forwarder.
        assert used_in(real, row, since) >= 10
        assert limiter_errors(live_gateway, monitor) == errors_before
        stopped_at = time.monotonic()
        redis_via_forwarder.stop()
        wait_for(
            lambda: sum(s.started > stopped_at for s in sent) >= 30,
            timeout=20,
            message="traffic stalled once Redis was gone",
        )
    finally:
        halt.set()
        sender.join(20)
    real_count = used_in(real, row, since)

    assert {s.status for s in sent} == {200}, {(s.status, s.code) for s in sent}
    during = [s.seconds for s in sent if s.started + s.seconds > stopped_at]
    assert max(during) <= bound, sorted(during)[-5:]
    assert real_count < len(sent)  # the requests after the stop were admitted uncounted

    # Set to fail closed: refused at once, with the limits' own code.
    settings.LLMROTATE_LIMITS_FAIL_OPEN = False
    for _ in range(3):
        t0 = time.monotonic()
        response = post(live_gateway, CHAT)
        assert time.monotonic() - t0 <= bound
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "limits_unavailable"
        assert "retry-after" in response.headers

    # Redis is back: requests are counted again (after the limiter's short outage pause), and
    # the scrape (which needs Redis for the breaker gauges) shows the failures it counted.
    redis_via_forwarder.start()
    before = used_in(real, row, since)
    wait_for(
        lambda: post(live_gateway, CHAT).status_code == 200 and used_in(real, row, since) > before,
        timeout=15,
        message="the limiter did not come back with Redis",
    )
    assert limiter_errors(live_gateway, monitor) > errors_before


def used_in(limiter: Any, row: Any, since: float) -> int:
    from keys.limits import window

    keys = sorted(
        {f"l{row.pk}:requests:minute:{window('minute', t, 'UTC')[0]}" for t in (since, time.time())}
    )
    reading = limiter.read(keys, [], now=time.time())
    assert not reading.error
    return sum(reading.used)


# --- refusals are recorded ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "status", "code", "outcome"),
    [
        ("bad_token", 401, "invalid_api_key", "refused"),
        ("route_not_allowed", 403, "route_not_allowed", "refused"),
        ("unknown_model", 404, "model_not_found", "refused"),
        ("our_limit", 429, "rate_limit_exceeded", "rate_limited_by_gateway"),
    ],
)
def test_a_refusal_leaves_exactly_one_record(
    live_gateway: LiveGateway, case: str, status: int, code: str, outcome: str
) -> None:
    from keys.services import client_token_create

    expected_records, client = 1, "e2e"
    body, token = dict(CHAT), None
    if case == "bad_token":
        token, client = "llmr_nosuchtoken_0123456789abcdefghijklmnop", ""
    elif case == "route_not_allowed":
        _, token = client_token_create(name="narrow", routes=["another-route"], scopes=["proxy"])
        client = "narrow"
    elif case == "unknown_model":
        body["model"] = "no-such-model"
    else:
        limit(requests_per_day=1)
        assert post(live_gateway, CHAT).status_code == 200
        expected_records = 2

    response = post(live_gateway, body, token=token)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code

    rows = call_records(expected_records)
    refused = [r for r in rows if r.client_status == status]
    assert len(refused) == 1, rows
    [row] = refused
    assert (row.attempt, row.key_id, row.provider, row.final) == (0, "", "", True)
    assert (row.outcome, row.client_status, row.error_type) == (outcome, status, code)
    assert row.client == client
    # Refused before any upstream was asked.
    assert live_gateway.upstream.stats()["total"] == expected_records - 1
