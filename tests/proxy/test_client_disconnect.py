"""A client that hangs up: whenever it happens, its key is given back once and the attempt is
recorded as `client_disconnected`, without counting against the key or its endpoint."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from django.test import AsyncClient

from healthchecks.gate import get_breaker_gate
from keys.health import CallResult, KeyPolicy, KeyState, KeyStatus, Outcome
from keys.routing import routing_snapshot
from keys.state_store import get_key_state_store
from proxy.calls import CallContext, now_wall
from proxy.engine import Failover
from tests.proxy.conftest import (
    DONE,
    Gateway,
    asgi_request,
    chunk_event,
    eventually,
    slow,
    streaming,
)
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio

# The first words arrive, then the upstream takes its time with the rest.
SLOW_STREAM = streaming(
    chunk_event({"role": "assistant", "content": ""}),
    chunk_event({"content": "Hello there, this is the start of a long answer"}),
    30.0,
    chunk_event({"content": "never sent"}, "stop"),
    DONE,
)


def payload(*, stream: bool) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    }


async def post(gateway: Gateway, *, stream: bool = False) -> Any:
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(payload(stream=stream)),
        content_type="application/json",
        headers=gateway.headers(),
    )


def key(key_id: str = "openai-1") -> tuple[KeyState, int]:
    return get_key_state_store().get_many([key_id], now=time.time())[key_id]


async def only_a_probing_key() -> KeyState:
    """openai-1 half-open (one trial call allowed), openai-2 disabled: every call is the trial."""
    store, now, policy = get_key_state_store(), time.time(), KeyPolicy()
    await store.record("openai-1", CallResult(Outcome.AUTH_FAILED, now=now, policy=policy))
    assert store.recheck("openai-1", ok=True, now=now, policy=policy).status == KeyStatus.PROBING
    store.manual("openai-2", "disable", now=now)
    return key()[0]


async def the_record(flush: Callable[[], None]) -> CallRecord:
    flush()
    [record] = [r async for r in CallRecord.objects.all()]
    return record


async def test_a_request_cancelled_while_the_upstream_is_slow_gives_its_key_back(
    gateway: Gateway, flush_records, monkeypatch
):
    before = await only_a_probing_key()
    observed: list[bool] = []
    monkeypatch.setattr(
        get_breaker_gate(), "observe", lambda endpoint, **kw: observed.append(kw["failed"])
    )
    gateway.upstream.first(slow(30))
    task = asyncio.create_task(post(gateway))
    await eventually(lambda: gateway.upstream.requests)
    task.cancel()  # what Django does to the view when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task

    state, inflight = key()
    assert inflight == 0
    assert state.status == KeyStatus.PROBING
    assert (state.total_failures, state.consecutive_failures) == (
        before.total_failures,
        before.consecutive_failures,
    ), "a hang-up was counted against the key"
    assert observed == [], "a hang-up was reported to the endpoint's circuit breaker"
    store = get_key_state_store()
    assert await store.acquire("openai-1", now=time.time()), "the one trial is still taken"
    await store.release("openai-1")
    record = await the_record(flush_records)
    assert (record.key_id, record.outcome, record.status_code) == (
        "openai-1",
        "client_disconnected",
        None,
    )


async def test_a_stream_whose_reader_stops_early_gives_its_key_back_and_records_what_it_saw(
    gateway: Gateway, flush_records
):
    before = await only_a_probing_key()
    gateway.upstream.first(SLOW_STREAM)
    response = await post(gateway, stream=True)
    chunks = aiter(response.streaming_content)
    seen = b""
    while b"Hello" not in seen:
        seen += await anext(chunks)
    await chunks.aclose()
    # Django's wrappers do not pass aclose() down to the relay; its handler closes the
    # response, as here (through a thread, as Django does), once it stops sending.
    await sync_to_async(response.close)()

    await eventually(lambda: key()[1] == 0)
    state, _ = key()
    assert state.total_failures == before.total_failures
    store = get_key_state_store()
    assert await store.acquire("openai-1", now=time.time()), "the one trial is still taken"
    await store.release("openai-1")
    record = await the_record(flush_records)
    assert (record.outcome, record.status_code, record.stream) == ("client_disconnected", 200, True)
    # The words that did arrive were generated (and billed): they are counted.
    assert record.usage_source == "estimated" and record.completion_tokens >= 5
    assert record.ttft_ms is not None


async def engine_stream() -> StreamingHttpResponse:
    """A stream response straight from the failover engine, with no client holding on to it."""
    snapshot = await routing_snapshot()
    ctx = CallContext(
        request_id=uuid.uuid4().hex,
        client=snapshot.tokens[next(iter(snapshot.tokens))],
        route=snapshot.routes["gpt-4o-mini"],
        body=payload(stream=True),
        stream=True,
        strip_usage=True,
        started_wall=now_wall(),
        t0=time.perf_counter(),
    )
    response = await Failover(ctx).run()
    assert isinstance(response, StreamingHttpResponse)
    return response


@pytest.mark.parametrize("how", ["closed", "dropped"])
async def test_a_stream_response_nobody_reads_gives_its_key_back(
    gateway: Gateway, flush_records, how: str
):
    gateway.upstream.first(SLOW_STREAM)
    response = await engine_stream()
    key_id = response["x-llmrotate-key"]
    assert key(key_id)[1] == 1
    if how == "closed":
        # What Django's handler does with a response it could not send.
        await sync_to_async(response.close)()
    else:
        del response
        gc.collect()

    await eventually(lambda: key(key_id)[1] == 0)
    record = await the_record(flush_records)
    assert (record.key_id, record.outcome) == (key_id, "client_disconnected")


# ---- through the ASGI application, as uvicorn calls it


async def asgi_post(gateway: Gateway, *, stream: bool, hang_up: asyncio.Event) -> list[str]:
    """POST through the real ASGI app; the client disconnects once `hang_up` is set (or, for a
    stream, after the first events), and the message types it was sent until then come back."""
    result = await asgi_request(
        "/v1/chat/completions",
        body=json.dumps(payload(stream=stream)).encode(),
        headers=((b"authorization", f"Bearer {gateway.token}".encode()),),
        hang_up=hang_up,
        hang_up_after_first_body=stream,
    )
    return result.sent


@pytest.mark.parametrize("stream", [False, True], ids=["waiting-for-the-upstream", "mid-stream"])
async def test_a_client_that_disconnects_from_the_server_gives_its_key_back(
    gateway: Gateway, flush_records, stream: bool
):
    hang_up = asyncio.Event()
    if stream:
        gateway.upstream.first(SLOW_STREAM)
    else:

        async def hang_up_while_waiting(request: Any) -> Any:
            hang_up.set()
            return await slow(30)(request)

        gateway.upstream.first(hang_up_while_waiting)

    sent = await asgi_post(gateway, stream=stream, hang_up=hang_up)

    assert sent == (["http.response.start", "http.response.body"] if stream else [])
    [key_id] = gateway.upstream.keys_used()
    await eventually(lambda: key(key_id)[1] == 0)
    assert key(key_id)[0].total_failures == 0
    record = await the_record(flush_records)
    assert (record.key_id, record.outcome) == (key_id, "client_disconnected")
