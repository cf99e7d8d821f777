"""Limits are exact across processes: four gateway processes (`manage.py serve`, one web worker
each, on the test database and one Redis) share every counter, so a burst spread over all of
them gets exactly what the limit allows, never a process's share more.

The four processes start once for the module (starting them is most of the cost); each test has
a client token and a Limit of its own, so no test sees another's counters. The configuration is
committed once, before the processes start, so `transactional_db` is overridden here: it gives
each test the database without flushing it afterwards; the module flushes it at its end, as a
transactional test would.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.conf import settings

from fake_upstream import FakeUpstream
from tests.conftest import free_port
from tests.e2e.conftest import (
    ROUTE,
    ServeProcess,
    gateway_config,
    scaled_worker_env,
    wait_for,
    web_worker,
)

pytestmark = [pytest.mark.scaled, pytest.mark.timeout(120)]

WORKERS = 4
PRICED_ROUTE = "priced"
PRICED_MODEL = "llmrotate-e2e-priced-model"
# $ per million tokens of the priced model: a request of 60 prompt and 40 output tokens
# reserves 60 * 10e-6 + 40 * 100e-6 = $0.0046.
INPUT_PER_MTOK, OUTPUT_PER_MTOK = Decimal(10), Decimal(100)
BUDGET = Decimal("0.05")
LIMITS: dict[str, dict[str, Any]] = {
    "rpm": {"requests_per_minute": 100},
    "tpm": {"tokens_per_minute": 100 * 100},  # a hundred requests of exactly 100 tokens
    "conc": {"max_concurrent": 3},
    "budget": {"usd_per_day": str(BUDGET)},
}
# A burst that starts with fewer seconds than this left in the clock minute waits for the next:
# a per-minute limit admits its count again in a new window.
MINUTE_HEADROOM_SECONDS = 20


@dataclass
class Cluster:
    urls: list[str]
    tokens: dict[str, str]  # client name -> token
    limit_ids: dict[str, int]  # client name -> Limit id (its counters' scope)
    prefix: str  # the workers' Redis prefix
    upstream: FakeUpstream


@dataclass(frozen=True)
class Answer:
    worker: int
    status: int
    code: str
    headers: httpx.Headers


@pytest.fixture(scope="module")
def cluster(
    django_db_setup: None,
    django_db_blocker: Any,
    _fake_upstream_server: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from keys.config_io import config_import
    from keys.limits_redis import RedisLimiter
    from keys.models import Limit
    from keys.state_store import RedisKeyStateStore
    from usage.models import ModelPrice

    assert settings.REDIS_URL, "the scaled leg sets REDIS_URL"
    prefix = f"llmrotate-limits-e2e-{uuid.uuid4().hex[:12]}:"
    config = gateway_config(_fake_upstream_server.base_url)
    config["routes"][PRICED_ROUTE] = {
        "strategy": "round_robin",
        "deployments": [{"provider": "fake", "model": PRICED_MODEL}],
    }
    config["clients"] = [{"name": name, "routes": ["*"], "scopes": ["proxy"]} for name in LIMITS]
    config["limits"] = [{"client": name, **fields} for name, fields in LIMITS.items()]
    with django_db_blocker.unblock():
        # The first admin exists already: four processes starting on an empty database would
        # all try to create it.
        get_user_model().objects.create_superuser(username="admin", email="", password="x" * 20)
        tokens = config_import(data=config).generated_tokens
        ModelPrice.objects.create(
            model=PRICED_MODEL, input_per_mtok=INPUT_PER_MTOK, output_per_mtok=OUTPUT_PER_MTOK
        )
        limit_ids = {name: Limit.objects.get(client__name=name, route=None).pk for name in LIMITS}
    tmp = tmp_path_factory.mktemp("limits-cluster")
    processes: list[ServeProcess] = []
    urls: list[str] = []
    try:
        for n in range(WORKERS):
            env = scaled_worker_env(
                prefix,
                tmp / f"data-{n}",  # one each: `serve` resets its metrics directory at start
                LLMROTATE_RECORD_FLUSH_SECONDS="0.2",  # settlements land sooner
                LLMROTATE_CONFIG_CACHE_SECONDS="60",
                # Exactness is the claim while Redis answers: a loaded CI machine must not
                # turn a slow answer into a fail-open admission.
                LLMROTATE_LIMITS_REDIS_TIMEOUT_SECONDS="5",
            )
            port = free_port()
            processes.append(web_worker(port, env=env, log=tmp / f"worker-{n}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        auth = {"Authorization": f"Bearer {tokens['rpm']}"}
        for process, url in zip(processes, urls, strict=True):
            process.wait_ready(f"{url}/v1/models", headers=auth, timeout=60)
        yield Cluster(
            urls=urls,
            tokens=tokens,
            limit_ids=limit_ids,
            prefix=prefix,
            upstream=_fake_upstream_server,
        )
    finally:
        for process in processes:  # all at once: each takes a moment to stop
            if process.proc.poll() is None:
                process.proc.send_signal(signal.SIGTERM)
        for process in processes:  # before the database is flushed: they write to it
            process.stop()
        with django_db_blocker.unblock():
            call_command("flush", verbosity=0, interactive=False)
        limiter = RedisLimiter(settings.REDIS_URL, prefix=f"{prefix}lim:")
        limiter.clear()
        limiter.close()
        state = RedisKeyStateStore(settings.REDIS_URL, prefix=prefix)
        state.clear()
        state.close()


@pytest.fixture
def transactional_db(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """The committed database of the module, open to the test, never flushed in between (the
    workers cache what the cluster fixture wrote). Named so that pytest-django sets up the
    test database for these tests."""
    with django_db_blocker.unblock():
        yield


def chat(model: str = ROUTE) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi"}]}
    return json.dumps(body).encode()


def sized_chat(*, prompt_tokens: int, max_tokens: int, model: str = ROUTE) -> bytes:
    """A body whose token reservation (ceil(bytes / 4) + max_tokens) is exactly
    prompt_tokens + max_tokens, and whose prompt the fake upstream counts as exactly
    `prompt_tokens` tokens (it counts words): `prompt_tokens` words, the last one padded."""
    words = ["w"] * prompt_tokens

    def encode() -> bytes:
        body = {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": " ".join(words)}],
        }
        return json.dumps(body, separators=(",", ":")).encode()

    short = 4 * prompt_tokens - len(encode())
    assert short >= 0, "too few words for the JSON around them"
    words[-1] += "w" * short
    raw = encode()
    assert math.ceil(len(raw) / 4) == prompt_tokens
    return raw


def burst(
    cluster: Cluster,
    client: str,
    body: bytes,
    count: int,
    *,
    parallel: int,
    on_answer: Callable[[Answer], None] | None = None,
) -> list[Answer]:
    """`count` requests, `parallel` at a time, spread evenly over the workers (request i goes
    to worker i % 4); `on_answer` sees each answer as it comes."""

    async def run() -> list[Answer]:
        gate = asyncio.Semaphore(parallel)
        headers = {
            "Authorization": f"Bearer {cluster.tokens[client]}",
            "Content-Type": "application/json",
        }
        limits = httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel)
        clients = [
            httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits)
            for url in cluster.urls
        ]

        async def one(i: int) -> Answer:
            worker = i % len(clients)
            async with gate:
                response = await clients[worker].post("/v1/chat/completions", content=body)
            code = "" if response.status_code == 200 else response.json()["error"]["code"]
            answer = Answer(worker, response.status_code, code, response.headers)
            if on_answer is not None:
                on_answer(answer)
            return answer

        try:
            return list(await asyncio.gather(*(one(i) for i in range(count))))
        finally:
            for c in clients:
                await c.aclose()

    return asyncio.run(run())


def fresh_minute() -> int:
    """The clock minute (unix minutes) a burst can start in with MINUTE_HEADROOM_SECONDS to
    spare: this one, or (polling the clock) the next."""
    deadline = time.time() + 61
    while 60 - time.time() % 60 < MINUTE_HEADROOM_SECONDS:
        assert time.time() < deadline
        time.sleep(0.05)
    return int(time.time() // 60)


def records(client: str, count: int, *, timeout: float = 20) -> list[Any]:
    """The client's `count` call records, once the workers have written them all (each
    record is settled against the limits before it is written)."""
    from usage.models import CallRecord

    def ready() -> list[Any] | None:
        rows = list(CallRecord.objects.filter(client=client))
        assert len(rows) <= count, f"more records than expected: {len(rows)} > {count}"
        return rows if len(rows) == count else None

    return wait_for(ready, timeout=timeout, message=f"expected {count} records of {client}")


def counter(cluster: Cluster, key: str) -> int:
    """A limiter counter as the workers keep it in Redis."""
    from keys.limits_redis import RedisLimiter

    limiter = RedisLimiter(settings.REDIS_URL, prefix=f"{cluster.prefix}lim:", timeout=2)
    try:
        reading = limiter.read([key], [], now=time.time())
    finally:
        limiter.close()
    assert not reading.error
    return reading.used[0]


def test_four_processes_admit_exactly_the_requests_per_minute(
    cluster: Cluster, transactional_db: None
) -> None:
    cluster.upstream.reset()
    minute = fresh_minute()
    answers = burst(cluster, "rpm", chat(), 400, parallel=64)
    assert int(time.time() // 60) == minute, "the burst ran into the next minute"

    assert Counter(a.status for a in answers) == {200: 100, 429: 300}
    assert {a.code for a in answers if a.status == 429} == {"rate_limit_exceeded"}
    assert cluster.upstream.stats()["total"] == 100  # refusals never reached the upstream
    # One counter for all four: each admitted request took the next unit of the same hundred,
    # so the remaining counts they were told are 99 down to 0, each exactly once.
    admitted = [a.headers for a in answers if a.status == 200]
    assert {h["x-ratelimit-limit-requests"] for h in admitted} == {"100"}
    assert sorted(int(h["x-ratelimit-remaining-requests"]) for h in admitted) == list(range(100))
    refused = [a.headers for a in answers if a.status == 429]
    assert all(0 < float(h["retry-after"]) <= 60 for h in refused)
    key = f"l{cluster.limit_ids['rpm']}:requests:minute:m{minute}"
    assert counter(cluster, key) == 100


def test_four_processes_admit_exactly_the_tokens_per_minute(
    cluster: Cluster, transactional_db: None
) -> None:
    cluster.upstream.reset()
    # Every request reserves exactly 60 + 40 tokens and uses exactly as many (the fake counts
    # the 60 words of the prompt and answers 40 tokens), so settling changes nothing and a
    # limit of 10,000 holds exactly 100 of them whenever each one finishes.
    cluster.upstream.script(default={"completion_tokens": 40})
    body = sized_chat(prompt_tokens=60, max_tokens=40)
    minute = fresh_minute()
    answers = burst(cluster, "tpm", body, 400, parallel=64)
    assert int(time.time() // 60) == minute, "the burst ran into the next minute"

    assert Counter(a.status for a in answers) == {200: 100, 429: 300}
    assert {a.code for a in answers if a.status == 429} == {"rate_limit_exceeded"}
    assert cluster.upstream.stats()["total"] == 100
    admitted = [a.headers for a in answers if a.status == 200]
    assert sorted(int(h["x-ratelimit-remaining-tokens"]) for h in admitted) == [
        100 * n for n in range(100)
    ]
    rows = records("tpm", 400)
    used = [r.prompt_tokens + r.completion_tokens for r in rows if r.client_status == 200]
    assert used == [100] * 100
    # Settled (each record is settled before it is written): what was used, all of it.
    key = f"l{cluster.limit_ids['tpm']}:tokens:minute:m{minute}"
    assert counter(cluster, key) == 100 * 100


def test_four_processes_never_have_more_than_max_concurrent_in_flight(
    cluster: Cluster, transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = cluster.upstream
    upstream.reset()
    inflight = {"now": 0, "peak": 0}
    refused = {"count": 0}
    held = {"released": False}
    dispatch = upstream._dispatch

    async def counting(req: Any, writer: Any) -> bool:
        # On the fake's own loop (one thread): no lock needed.
        if req.path != "/v1/chat/completions":
            return await dispatch(req, writer)
        inflight["now"] += 1
        inflight["peak"] = max(inflight["peak"], inflight["now"])
        try:
            # Held until the rest of the burst has been refused and all three admitted calls
            # are here, however slowly a loaded machine sends them (a worker's first admitted
            # call can reach the upstream after every refusal is answered): so a fourth call
            # let through at any point of the burst would be in flight beside them.
            deadline = time.monotonic() + 20
            while not held["released"] and time.monotonic() < deadline:
                # Released together, once: the first to see it lets all three go.
                held["released"] = refused["count"] >= 21 and inflight["now"] >= 3
                await asyncio.sleep(0.01)
            return await dispatch(req, writer)
        finally:
            inflight["now"] -= 1

    def count_refusals(answer: Answer) -> None:
        refused["count"] += answer.status == 429

    monkeypatch.setattr(upstream, "_dispatch", counting)
    answers = burst(cluster, "conc", chat(), 24, parallel=24, on_answer=count_refusals)

    assert inflight["peak"] == 3
    assert Counter(a.status for a in answers) == {200: 3, 429: 21}
    assert {a.code for a in answers if a.status == 429} == {"concurrency_limit_exceeded"}
    assert upstream.stats()["total"] == 3
    # Their slots came back when they finished, whichever process held them.
    monkeypatch.setattr(upstream, "_dispatch", dispatch)  # nothing is held any more

    def three_at_once() -> bool:
        again = burst(cluster, "conc", chat(), 3, parallel=3)
        return all(a.status == 200 for a in again)

    wait_for(three_at_once, timeout=10, message="the concurrency slots were not given back")


def test_four_processes_never_overspend_a_daily_budget(
    cluster: Cluster, transactional_db: None
) -> None:
    cluster.upstream.reset()
    # Each request reserves 60 prompt and 40 output tokens at the priced model's rates
    # ($0.0046) and uses 60 and 30 ($0.0036): settling frees room, later waves use it, and the
    # spend converges on the budget without passing it.
    cluster.upstream.script(default={"completion_tokens": 30})
    body = sized_chat(prompt_tokens=60, max_tokens=40, model=PRICED_ROUTE)
    reservation = (60 * INPUT_PER_MTOK + 40 * OUTPUT_PER_MTOK) / 1_000_000
    answers: list[Answer] = []
    for _ in range(8):
        wave = burst(cluster, "budget", body, 40, parallel=40)
        answers += wave
        rows = records("budget", len(answers))  # written, so settled
        if not any(a.status == 200 for a in wave):
            break
    else:
        pytest.fail("eight waves, and the budget still admitted requests")

    refused = [a for a in answers if a.status != 200]
    assert {(a.status, a.code) for a in refused} == {(429, "budget_exceeded")}
    assert {a.headers["x-should-retry"] for a in refused} == {"false"}
    spent = sum((r.cost_usd or Decimal(0) for r in rows), Decimal(0))
    successes = [a for a in answers if a.status == 200]
    assert spent == len(successes) * (60 * INPUT_PER_MTOK + 30 * OUTPUT_PER_MTOK) / 1_000_000
    # Never past the budget by more than one reservation; and not refused early either: the
    # last wave found less room left than one request reserves.
    assert spent <= BUDGET + reservation, (spent, len(successes))
    assert spent > BUDGET - reservation - Decimal("0.0001"), (spent, len(successes))
