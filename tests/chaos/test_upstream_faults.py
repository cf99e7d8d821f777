"""The gateway in front of an upstream that misbehaves at the HTTP level (hostile_upstream.py).

Each scenario sends steady traffic with the official SDKs (openai and anthropic, JSON and
streams, all at once) and then asks the same four questions: did every client get a success or
a documented error (docs/errors.md) within the configured bounds, and never a 500 or a hang;
is there exactly one call record per attempt the upstream saw; are the keys and the circuit
breaker in the state the faults call for, with no call left in flight; did the gateway's
memory stay bounded whatever the upstream sent.

The bounds are set small (`bounds`), so that each scenario lasts a few seconds: a 3 s request
deadline, a 2 s read timeout (a byte a second is never silent that long), 1 MiB answers and
events, 2 s streams.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.chaos.hostile_upstream import (
    HELLO,
    ROUTE,
    Chaos,
    HostileUpstream,
    assert_documented,
    chaos_gateway,
    keys_idle,
    rss_bytes,
    storm,
    upstream_records,
)
from tests.e2e.conftest import wait_for

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(60)]

DEADLINE = 3.0
READ_TIMEOUT = 2.0
MAX_STREAM = 2.0
MIB = 1024 * 1024
# Every kind of call, at once: ten clients.
MIX = ["openai_json"] * 3 + ["openai_stream"] * 3 + ["anthropic_json"] * 2
MIX += ["anthropic_stream"] * 2
JSON_ONLY = ["openai_json"] * 6 + ["anthropic_json"] * 4
STREAMS_ONLY = ["openai_stream"] * 6 + ["anthropic_stream"] * 4


@pytest.fixture
def bounds(settings: Any) -> None:
    settings.LLMROTATE_REQUEST_DEADLINE_SECONDS = DEADLINE
    settings.LLMROTATE_READ_TIMEOUT_SECONDS = READ_TIMEOUT
    settings.LLMROTATE_CONNECT_TIMEOUT_SECONDS = 2.0
    settings.LLMROTATE_MAX_RESPONSE_BYTES = MIB
    settings.LLMROTATE_MAX_SSE_EVENT_BYTES = MIB
    settings.LLMROTATE_MAX_STREAM_SECONDS = MAX_STREAM
    settings.LLMROTATE_UPSTREAM_MAX_CONNECTIONS = 1200


@pytest.fixture
def gateway(transactional_db: None, upstream: HostileUpstream, bounds: None) -> Iterator[Chaos]:
    with chaos_gateway(upstream.base_url) as gateway:
        yield gateway


def records_match(upstream: HostileUpstream) -> list[Any]:
    """The attempts' records, once there are as many as attempts reached the upstream (and
    never more)."""

    def ready() -> list[Any] | None:
        records = upstream_records()
        assert len(records) <= upstream.attempts(), (len(records), upstream.requests)
        return records if len(records) == upstream.attempts() else None

    return wait_for(ready, timeout=15, message=f"records differ from attempts {upstream.requests}")


def outcomes(records: list[Any]) -> Counter[tuple[str, str]]:
    return Counter((r.outcome, r.error_type) for r in records)


def breaker(gateway: Chaos, state: str) -> None:
    """The state the proxy acts on: this process's copy of the endpoint's breaker. (The shared
    store is written behind it, in the background, on the gateway's one database thread.)"""
    from healthchecks import breaker as breakers
    from healthchecks.gate import get_breaker_gate

    def current() -> str:
        copy = get_breaker_gate()._states.get(gateway.upstream_url)
        return "closed" if copy is None else breakers.effective(copy, now=time.time()).status

    wait_for(
        lambda: current() == state,
        timeout=30,
        message=f"the breaker is not {state}: {current()}",
    )


def every_call_ends_as(
    gateway: Chaos,
    upstream: HostileUpstream,
    mode: str,
    kinds: Any,
    *,
    answer: tuple[int, str],
    outcome: tuple[str, str],
) -> dict[str, Any]:
    """Calls of `kinds` into an upstream in `mode`: each answered within the deadline with
    `answer`, after one attempt recorded with `outcome`. The keys' states, once idle."""
    upstream.mode = mode
    results = gateway.traffic(kinds, timeout=30)
    assert_documented(results, bound=DEADLINE + 2)
    assert {(r.status, r.code) for r in results} == {answer}, results
    # As many records as attempts, one a call: the deadline left no time for a second key.
    assert outcomes(records_match(upstream)) == {outcome: len(kinds)}
    return keys_idle()


def test_a_head_sent_a_byte_a_second_is_cut_at_the_request_deadline(
    gateway: Chaos, upstream: HostileUpstream
) -> None:
    states = every_call_ends_as(
        gateway, upstream, "slow_head", MIX,
        answer=(504, "upstream_timeout"), outcome=("timeout", "deadline"),
    )  # fmt: skip
    assert {s.status for s in states.values()} == {"cooldown"}, states
    breaker(gateway, "open")


def test_a_body_sent_a_byte_a_second_is_cut_at_the_request_deadline(
    gateway: Chaos, upstream: HostileUpstream
) -> None:
    states = every_call_ends_as(
        gateway, upstream, "slow_body", JSON_ONLY,
        answer=(504, "upstream_timeout"), outcome=("timeout", "deadline"),
    )  # fmt: skip
    assert {s.status for s in states.values()} == {"cooldown"}, states
    breaker(gateway, "open")


def test_an_endless_json_body_is_read_no_further_than_the_response_bound(
    gateway: Chaos, upstream: HostileUpstream
) -> None:
    before = rss_bytes()
    # Not the key's fault, and another key would get the same: one attempt each.
    states = every_call_ends_as(
        gateway, upstream, "endless_json", JSON_ONLY,
        answer=(502, "upstream_error"), outcome=("bad_response", "response_too_large"),
    )  # fmt: skip
    grown = rss_bytes() - before
    assert all(s.status == "active" and s.consecutive_failures == 0 for s in states.values())
    breaker(gateway, "closed")
    # Ten answers cut at 1 MiB each; the upstream would have sent gigabytes.
    assert grown < 48 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"


def test_an_sse_line_of_megabytes_past_the_event_bound_ends_the_stream(
    gateway: Chaos, upstream: HostileUpstream
) -> None:
    before = rss_bytes()
    states = every_call_ends_as(
        gateway, upstream, "huge_sse", STREAMS_ONLY,
        answer=(200, "event_too_large"), outcome=("stream_error", "event_too_large"),
    )  # fmt: skip
    grown = rss_bytes() - before
    assert all(s.consecutive_failures >= 3 for s in states.values()), states
    assert grown < 48 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"


def test_an_sse_line_of_megabytes_under_the_event_bound_is_relayed_whole(
    gateway: Chaos, upstream: HostileUpstream, settings: Any
) -> None:
    settings.LLMROTATE_MAX_SSE_EVENT_BYTES = 8 * MIB
    upstream.mode = "huge_sse"
    upstream.line_bytes = 3 * MIB
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=gateway.token, max_retries=0)
    with client:
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(model=ROUTE, messages=HELLO, stream=True)
            if chunk.choices
        )
    assert text.count("z") == 3 * MIB and text.endswith("word4 ")
    assert outcomes(records_match(upstream)) == {("success", ""): 1}
    keys_idle()


def test_invalid_utf8_from_the_upstream_never_becomes_a_500(
    gateway: Chaos, upstream: HostileUpstream
) -> None:
    upstream.mode = "bad_utf8"
    results = gateway.traffic(MIX, timeout=30)
    assert_documented(results, bound=DEADLINE + 2)
    records = records_match(upstream)
    assert all(r.outcome != "gateway_error" for r in records), outcomes(records)
    keys_idle()


def test_a_stream_that_never_ends_is_cut_at_the_stream_bound(
    gateway: Chaos, upstream: HostileUpstream
) -> None:
    upstream.mode = "endless_sse"
    upstream.event_delay = 0.05
    results = gateway.traffic(STREAMS_ONLY, timeout=30)
    assert_documented(results, bound=MAX_STREAM + 2)
    assert {(r.status, r.code) for r in results} == {(200, "stream_too_long")}, results
    assert all(r.seconds >= MAX_STREAM - 0.5 for r in results), results
    records = records_match(upstream)
    assert outcomes(records) == {("timeout", "stream_too_long"): len(STREAMS_ONLY)}
    keys_idle()


@pytest.mark.timeout(90)
def test_a_thousand_calls_into_connections_reset_on_accept(
    transactional_db: None, upstream: HostileUpstream, bounds: None, settings: Any
) -> None:
    """Keys that never cool down and no circuit breaker, so that every call tries both keys:
    two thousand connections reset, all at once."""
    settings.LLMROTATE_CIRCUIT_BREAKER = False
    upstream.mode = "reset"
    calls = 1000
    with chaos_gateway(upstream.base_url, cooldown=0) as gateway:
        before = rss_bytes()
        results = storm(gateway.port, gateway.token, [{"stream": False}] * calls, timeout=60)
        grown = rss_bytes() - before
        answers = Counter((r["status"], r["code"]) for r in results)
        assert answers == {(502, "upstream_error"): calls}, answers
        records = records_match(upstream)
        assert upstream.connections == upstream.attempts() == len(records) == 2 * calls
        assert {r.outcome for r in records} == {"connection_error"}
        states = keys_idle()
        assert all(s.consecutive_failures >= 3 for s in states.values()), states
        assert grown < 96 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"
