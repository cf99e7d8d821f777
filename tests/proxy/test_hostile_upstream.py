"""Whatever an upstream sends is bounded before it is believed, kept or shown: waits it imposes
on a key, cookies, the size of its answers, its error codes and its error bodies."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, override_settings

from keys.state_store import get_key_state_store
from tests.proxy.conftest import Gateway, completion, status
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MAX_WAIT = 6 * 3600


async def post(gateway: Gateway, body: dict | None = None, *, path: str = "/v1/chat/completions"):
    return await AsyncClient().post(
        path, data=json.dumps(body or BODY), content_type="application/json",
        headers=gateway.headers(),
    )  # fmt: skip


def cooldown_left(key_id: str) -> float:
    state, _ = get_key_state_store().get_many([key_id], now=time.time())[key_id]
    return max(state.cooldown_until, state.exhausted_until) - time.time()


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "99999999999"},
        {"retry-after": "3e11"},
        {"retry-after": "1e308"},
        {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
        {"retry-after-ms": "1e300"},
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "99999999999999h"},
    ],
)
async def test_an_upstream_cannot_bench_a_key_past_the_maximum_wait(gateway: Gateway, headers):
    gateway.upstream.then("k1", status(429, headers=headers))
    gateway.upstream.then("k2", status(429, headers=headers))
    response = await post(gateway)
    assert response.status_code == 503
    # The client is told a sane wait too, not a 309-digit one.
    assert 1 <= int(response["Retry-After"]) <= MAX_WAIT * 1.1 + 1
    for key_id in ("openai-1", "openai-2"):
        assert 0 < cooldown_left(key_id) <= MAX_WAIT * 1.1 + 1


async def test_the_maximum_wait_is_a_setting(gateway: Gateway):
    with override_settings(LLMROTATE_MAX_UPSTREAM_WAIT_SECONDS=60):
        from keys.routing import invalidate_routing_cache

        invalidate_routing_cache()  # the policy is part of the routing snapshot
        gateway.upstream.then("k1", status(429, headers={"retry-after": "86400"}))
        await post(gateway)
        assert cooldown_left("openai-1") <= 66 + 1


async def test_no_cookie_an_upstream_sets_is_ever_sent_back(gateway: Gateway):
    def sets_cookie(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(
            200,
            json=completion(body["model"]),
            headers={"set-cookie": "__cf_bm=tracker; Path=/; Domain=upstream.test; Secure"},
        )

    gateway.upstream.default = sets_cookie
    for _ in range(4):  # both keys, twice: any jar would have replayed it by now
        assert (await post(gateway)).status_code == 200
    sent = [request.headers.get("cookie") for request in gateway.upstream.requests]
    assert sent == [None] * 4


async def test_a_client_cookie_is_not_forwarded_either(gateway: Gateway):
    await AsyncClient().post(
        "/v1/chat/completions", data=json.dumps(BODY), content_type="application/json",
        headers={**gateway.headers(), "Cookie": "sessionid=abc"},
    )  # fmt: skip
    assert gateway.upstream.requests[0].headers.get("cookie") is None


async def test_an_answer_larger_than_the_limit_is_not_held_and_fails_over(
    gateway: Gateway, flush_records
):
    huge = json.dumps(completion("gpt-4o-mini", text="x" * 5000)).encode()

    def too_big(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=huge, headers={"content-type": "application/json"})

    gateway.upstream.first(too_big)
    with override_settings(LLMROTATE_MAX_RESPONSE_BYTES=4096):
        response = await post(gateway, {**BODY, "model": "with-fallback"})
    # The deployment is left (another key would send the same), and the fallback answers.
    assert response.status_code == 200, response.content
    hosts = [request.url.host for request in gateway.upstream.requests]
    assert hosts == ["upstream.test", "backup.test"]
    await sync_to_async(flush_records)()
    first = await CallRecord.objects.order_by("id").afirst()
    assert first is not None
    assert (first.outcome, first.error_type) == ("bad_response", "response_too_large")


async def test_a_compressed_answer_reaches_the_client_decoded(gateway: Gateway):
    answer = completion("gpt-4o-mini", text="squeezed")

    def gzipped(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            content=gzip.compress(json.dumps(answer).encode()),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )

    gateway.upstream.first(gzipped)
    response = await post(gateway, BODY)
    assert response.status_code == 200, response.content
    assert json.loads(response.content)["choices"][0]["message"]["content"] == "squeezed"


async def test_a_compressed_answer_is_measured_after_decompression(gateway: Gateway, flush_records):
    # 64 KiB of JSON in a few hundred bytes of gzip: the limit is on what it unpacks to.
    packed = gzip.compress(json.dumps(completion("gpt-4o-mini", text="x" * 65536)).encode())
    assert len(packed) < 4096

    def bomb(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            content=packed,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )

    gateway.upstream.first(bomb)
    with override_settings(LLMROTATE_MAX_RESPONSE_BYTES=4096):
        await post(gateway, {**BODY, "model": "with-fallback"})
    await sync_to_async(flush_records)()
    first = await CallRecord.objects.order_by("id").afirst()
    assert first is not None
    assert (first.outcome, first.error_type) == ("bad_response", "response_too_large")


async def test_an_error_code_is_cut_to_a_bounded_printable_length(gateway: Gateway, flush_records):
    code = "E" * 100_000 + "\n\x00"
    gateway.upstream.then("k1", status(500, error_code=code))
    gateway.upstream.then("k2", status(500, error_code=code))
    response = await post(gateway)
    assert response.status_code == 502
    assert len(response.content) < 1000
    state, _ = get_key_state_store().get_many(["openai-1"], now=time.time())["openai-1"]
    assert state.last_error_type == "E" * 64
    await sync_to_async(flush_records)()
    async for record in CallRecord.objects.all():
        assert record.error_type == "E" * 64


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", None])
async def test_a_non_json_4xx_reaches_the_client_as_json_in_its_envelope(
    gateway: Gateway, content_type
):
    def html(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": content_type} if content_type else {}
        return httpx.Response(400, content=b"<html><h1>Bad Request</h1></html>", headers=headers)

    gateway.upstream.first(html)
    response = await post(gateway)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "upstream_non_json_error"
    assert "<html>" not in response.content.decode()


async def test_a_json_4xx_is_relayed_as_json_whatever_its_content_type(gateway: Gateway):
    def mislabelled(request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "bad", "type": "invalid_request_error", "code": "x"}}
        return httpx.Response(400, json=body, headers={"content-type": "text/html"})

    gateway.upstream.first(mislabelled)
    response = await post(gateway)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "x"


async def test_a_long_prompt_without_usage_is_sampled_not_copied_for_the_estimate(
    gateway: Gateway, monkeypatch
):
    from usage import recorder

    seen: list[tuple[str, str]] = []
    original = recorder.record_call

    def spy(data):
        if data.estimate is not None:
            seen.append(data.estimate)
            chars.append(data.estimate_chars)
        original(data)

    chars: list[tuple[int, int] | None] = []
    monkeypatch.setattr("proxy.calls.record_call", spy)

    def no_usage(request: httpx.Request) -> httpx.Response:
        body = completion("gpt-4o-mini", text="y" * 200_000)
        del body["usage"]
        return httpx.Response(200, json=body)

    gateway.upstream.first(no_usage)
    prompt = "z" * 300_000
    with override_settings(LLMROTATE_ESTIMATE_MAX_CHARS=1000):
        response = await post(gateway, {**BODY, "messages": [{"role": "user", "content": prompt}]})
    assert response.status_code == 200
    [(prompt_sample, completion_sample)] = seen
    assert len(prompt_sample) <= 1000 and len(completion_sample) <= 1000
    # The whole lengths go along, for the estimate to scale to: "user\n" + the prompt.
    assert chars == [(300_005, 200_000)]


async def test_no_attempt_starts_once_a_trickling_answer_has_used_up_the_deadline(
    gateway: Gateway, flush_records, monkeypatch
):
    """uvloop's clock is libuv's, read once per loop pass in whole milliseconds, so the
    deadline's timer can fire a little before the request's own clock says the deadline has
    passed. An attempt cut by the deadline must end the request even then, not start another
    that the upstream never sees but the records count."""
    from proxy import engine

    class StaleLoop:
        """The running loop, its clock read 20 ms late, as uvloop's can be under load."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop

        def time(self) -> float:
            return self._loop.time() - 0.02

        def __getattr__(self, name: str) -> Any:
            return getattr(self._loop, name)

    class StaleAsyncio:
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        def get_running_loop(self) -> StaleLoop:
            return StaleLoop(asyncio.get_running_loop())

    monkeypatch.setattr(engine, "asyncio", StaleAsyncio())

    async def a_byte_at_a_time() -> AsyncIterator[bytes]:
        while True:
            yield b" "
            await asyncio.sleep(0.05)

    gateway.upstream.first(
        lambda request: httpx.Response(
            200, headers={"content-type": "application/json"}, content=a_byte_at_a_time()
        )
    )
    with override_settings(LLMROTATE_REQUEST_DEADLINE_SECONDS=0.5):
        response = await post(gateway)
    assert response.status_code == 504, response.content
    assert len(gateway.upstream.requests) == 1
    await sync_to_async(flush_records)()
    outcomes = [(r.outcome, r.error_type) async for r in CallRecord.objects.order_by("id")]
    assert outcomes == [("timeout", "deadline")]
