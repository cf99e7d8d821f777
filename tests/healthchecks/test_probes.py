"""Probe classification: ICMP with icmplib mocked, HTTP by status, error and timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from unittest import mock

import httpx
import icmplib
import pytest

from healthchecks.models import ProbeStatus
from healthchecks.probes import classify_http, classify_http_error, http_probe, ping_probe


def host(alive: bool) -> icmplib.Host:
    return icmplib.Host("127.0.0.1", 1, [0.42] if alive else [])


@pytest.mark.parametrize("privileged", [True, False])
def test_a_ping_answered_is_ok_with_its_round_trip_time(privileged: bool):
    with mock.patch("icmplib.ping", return_value=host(True)) as ping:
        result = ping_probe(host="api.example.test", timeout=2, privileged=privileged)
    assert result.status == ProbeStatus.OK and result.latency_ms == pytest.approx(0.42)
    assert ping.call_args.kwargs["privileged"] is privileged


def test_a_ping_without_reply_is_a_failure():
    with mock.patch("icmplib.ping", return_value=host(False)):
        result = ping_probe(host="10.255.255.1", timeout=2, privileged=True)
    assert result.status == ProbeStatus.FAILED and result.counts


def test_a_refused_icmp_socket_makes_the_ping_unavailable_not_failed():
    with mock.patch("icmplib.ping", side_effect=icmplib.SocketPermissionError(False)):
        result = ping_probe(host="127.0.0.1", timeout=2, privileged=False)
    assert result.status == ProbeStatus.UNAVAILABLE
    assert not result.counts  # health then rests on the HTTP probe alone
    assert "ping_group_range" in result.error


def test_root_without_cap_net_raw_falls_back_to_the_unprivileged_socket():
    refused = icmplib.SocketPermissionError(True)
    with mock.patch("icmplib.ping", side_effect=[refused, host(True)]) as ping:
        result = ping_probe(host="api.example.test", timeout=2, privileged=True)
    assert result.status == ProbeStatus.OK
    assert [c.kwargs["privileged"] for c in ping.call_args_list] == [True, False]
    with mock.patch("icmplib.ping", side_effect=[refused, icmplib.SocketPermissionError(False)]):
        result = ping_probe(host="api.example.test", timeout=2, privileged=True)
    assert result.status == ProbeStatus.UNAVAILABLE and "CAP_NET_RAW" in result.error


def test_any_other_socket_trouble_is_unavailable_too_and_never_raises():
    with mock.patch("icmplib.ping", side_effect=OSError("Address family not supported")):
        assert ping_probe(host="::1", timeout=2, privileged=True).status == "unavailable"


def test_an_unresolvable_host_or_unreachable_destination_is_a_failure():
    with mock.patch("icmplib.ping", side_effect=icmplib.NameLookupError("nope.test")):
        assert ping_probe(host="nope.test", timeout=2, privileged=True).status == "failed"
    unreachable = icmplib.ICMPv4DestinationUnreachable(mock.Mock(source="10.0.0.1", code=1))
    with mock.patch("icmplib.ping", side_effect=unreachable):
        assert ping_probe(host="10.0.0.2", timeout=2, privileged=True).status == "failed"


@pytest.mark.parametrize(
    ("status", "expected", "ok"),
    [
        (200, None, True),
        (404, None, True),  # it answered; a wrong probe URL is not an outage
        (401, None, True),  # the key is bad, not the endpoint
        (403, 200, True),
        (500, None, False),
        (503, None, False),
        (204, 200, False),
        (200, 200, True),
    ],
)
def test_http_answers_are_judged_by_status(status: int, expected: int | None, ok: bool):
    result = classify_http(status, latency_ms=3.0, expected=expected)
    assert result.ok is ok and result.status_code == status and result.latency_ms == 3.0


@pytest.mark.parametrize(
    ("exc", "word"),
    [
        (httpx.ConnectError("refused"), "connection error"),
        (httpx.ReadTimeout("slow"), "timeout"),
        (httpx.ConnectTimeout("slow"), "timeout"),
    ],
)
def test_timeouts_and_connection_errors_are_failures(exc: Exception, word: str):
    result = classify_http_error(exc)
    assert result.status == ProbeStatus.FAILED and word in result.error


def test_the_http_probe_sends_the_headers_and_times_the_answer():
    from fake_upstream import FakeUpstream

    with FakeUpstream(allowed_keys={"sk-probe-key-0123456789"}) as fake:
        good = http_probe(
            url=f"{fake.base_url}/models",
            headers={"Authorization": "Bearer sk-probe-key-0123456789"},
            timeout=5, expected=None,
        )  # fmt: skip
        rejected = http_probe(
            url=f"{fake.base_url}/models", headers={"Authorization": "Bearer sk-wrong"},
            timeout=5, expected=200,
        )  # fmt: skip
    assert good.ok and good.status_code == 200 and good.latency_ms is not None
    assert rejected.ok and rejected.status_code == 401
    down = http_probe(url=f"{fake.base_url}/models", headers={}, timeout=1, expected=None)
    assert down.status == ProbeStatus.FAILED and "connection error" in down.error


def test_the_http_timeout_bounds_the_whole_request_not_each_read(mock_upstream):
    async def drip() -> AsyncIterator[bytes]:
        for _ in range(40):  # each chunk well within the timeout, all of them far beyond it
            await asyncio.sleep(0.25)
            yield b" "

    async def slow_body(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=drip())

    mock_upstream(slow_body)  # the probe goes through the proxy's injected transport too
    started = time.monotonic()
    result = http_probe(
        url="https://api.example.test/v1/models", headers={}, timeout=1, expected=None
    )
    assert result.status == ProbeStatus.FAILED and "timeout" in result.error
    assert time.monotonic() - started < 5  # the drip alone takes 10 s
