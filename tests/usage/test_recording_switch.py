"""LLMROTATE_USAGE_RECORDING off: no call record, no rollup and no usage log line, for any
request; key health (cooldown after a 429, quarantine after a 401) works the same."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.test import AsyncClient

from keys.state_store import get_key_state_store
from tests.proxy import conftest as proxy_fixtures
from tests.proxy.conftest import Gateway, status
from usage.models import (
    CallRecord,
    DayRollup,
    HourRollup,
    MinuteRollup,
    SessionRollup,
    ToolRollup,
)

gateway = proxy_fixtures.gateway

HI = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def post(gateway: Gateway, model: str = "gpt-4o-mini") -> Any:
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps({**HI, "model": model}),
        content_type="application/json",
        headers=gateway.headers(),
    )


@sync_to_async
def written(flush: Callable[[], None]) -> dict[str, int]:
    flush()
    return {
        "records": CallRecord.objects.count(),
        "rollups": sum(
            model.objects.count()
            for model in (MinuteRollup, HourRollup, DayRollup, SessionRollup, ToolRollup)
        ),
    }


def key_status(key_id: str) -> str:
    state, _ = get_key_state_store().get_many([key_id], now=time.time())[key_id]
    return str(state.status)


async def test_with_recording_on_a_call_is_recorded_and_logged(
    gateway: Gateway, flush_records: Callable[[], None], usage_log: list[str]
):
    # The control for the tests below: the same call, recording left on.
    assert (await post(gateway)).status_code == 200
    counts = await written(flush_records)
    assert counts["records"] == 1 and counts["rollups"] > 0
    assert len(usage_log) == 1


async def test_with_recording_off_nothing_is_recorded_or_logged(
    gateway: Gateway, flush_records: Callable[[], None], usage_log: list[str], settings
):
    settings.LLMROTATE_USAGE_RECORDING = False
    gateway.upstream.first(status(500))  # a failover: two attempts and a final row, were it on
    assert (await post(gateway)).status_code == 200
    # Answered without any attempt: an attempt-0 row, were it on.
    assert (await post(gateway, model="no-such-route")).status_code == 404
    assert await written(flush_records) == {"records": 0, "rollups": 0}
    assert usage_log == []


async def test_with_recording_off_a_429_still_cools_the_key_down(
    gateway: Gateway, flush_records: Callable[[], None], settings
):
    settings.LLMROTATE_USAGE_RECORDING = False
    gateway.upstream.first(status(429, headers={"retry-after": "20"}))
    response = await post(gateway)
    assert response.status_code == 200
    assert response["x-llmrotate-attempts"] == "2"
    first = gateway.upstream.keys_used()[0]
    assert key_status(first) == "cooldown"
    assert (await written(flush_records))["records"] == 0


async def test_with_recording_off_a_401_still_quarantines_the_key(
    gateway: Gateway, flush_records: Callable[[], None], settings
):
    settings.LLMROTATE_USAGE_RECORDING = False
    gateway.upstream.then("k1", status(401, error_code="invalid_api_key"))
    gateway.upstream.then("k2", status(401, error_code="invalid_api_key"))
    assert (await post(gateway)).status_code == 503
    assert {key_status("openai-1"), key_status("openai-2")} == {"quarantined"}
    assert (await written(flush_records))["records"] == 0


def test_with_recording_off_limit_settlements_leave_the_callers_thread(
    settings: Any, monkeypatch: Any
) -> None:
    """record_call runs on the event loop; settling may reach Redis, so it goes to a thread
    of its own, and the caller returns while it waits."""
    import threading

    import usage.recorder as recorder_module
    from tests.usage.conftest import make_call

    settings.LLMROTATE_USAGE_RECORDING = False
    release, seen = threading.Event(), []

    def settle(settlements: list[Any]) -> None:
        release.wait(10)
        seen.append((threading.current_thread().name, settlements))

    monkeypatch.setattr(recorder_module, "limits_settle_safely", settle)
    monkeypatch.setattr(recorder_module, "call_limit_settlements", lambda data, priced: ["s"])
    recorder_module.record_call(make_call())
    assert seen == []  # returned while the settlement still waits
    release.set()
    deadline = time.monotonic() + 10
    while not seen:
        assert time.monotonic() < deadline, "the settlement never ran"
        time.sleep(0.01)
    assert seen == [("llmrotate-settler", ["s"])]
