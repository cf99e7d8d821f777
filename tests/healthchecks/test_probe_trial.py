"""A half-open breaker lets one trial through, whether a probe or a live request is first: a
probe claims the same slot in the shared store as the proxy does, before it is sent."""

from __future__ import annotations

import time
from typing import Any
from unittest import mock

import pytest

from healthchecks import breaker, breakers, services
from healthchecks.breaker import BreakerStatus
from healthchecks.breaker_store import get_breaker_store
from healthchecks.models import Endpoint, ProbeStatus
from healthchecks.probes import ProbeResult
from tests.factories import ProviderFactory
from tests.healthchecks.conftest import open_breaker, stored

pytestmark = pytest.mark.django_db

OK = ProbeResult(ProbeStatus.OK, latency_ms=12.5, status_code=200)
DOWN = ProbeResult(ProbeStatus.FAILED, error="HTTP 503", status_code=503)


@pytest.fixture
def endpoint() -> Endpoint:
    ProviderFactory(name="acme", base_url="https://acme.example.test/v1")
    services.endpoints_sync()
    endpoint = Endpoint.objects.get()
    open_breaker(endpoint.base_url, open_until=time.time() - 1)  # half-open
    return endpoint


def live_claim(endpoint: Endpoint) -> bool:
    """What the proxy does before it sends a request to a half-open endpoint."""
    now = time.time()
    policy = breakers.breaker_policy()
    _, _, claimed = get_breaker_store().update(
        endpoint.base_url, lambda s: breaker.claim_trial(s, now=now, policy=policy)
    )
    return claimed


def probe(endpoint: Endpoint, **mocked: Any) -> ProbeResult | None:
    with mock.patch("healthchecks.services.http_probe", **mocked):
        return services.endpoint_probe(endpoint_id=endpoint.pk, kind="http")


def test_a_probe_holds_the_trial_while_it_runs_so_live_traffic_waits(endpoint: Endpoint):
    live_claims_during_the_probe: list[bool] = []

    def answer(**kwargs: Any) -> ProbeResult:
        live_claims_during_the_probe.append(live_claim(endpoint))
        return OK

    assert probe(endpoint, side_effect=answer) == OK
    assert live_claims_during_the_probe == [False]
    state = stored(endpoint.base_url)
    assert state.status == BreakerStatus.CLOSED and state.reason == "http probe ok"


def test_a_failed_probe_trial_reopens_the_breaker_with_a_longer_wait(endpoint: Endpoint):
    probe(endpoint, return_value=DOWN)
    state = stored(endpoint.base_url)
    assert state.status == BreakerStatus.OPEN and state.trips == 2
    assert state.open_until - state.changed_at == pytest.approx(60)


def test_no_probe_is_sent_while_a_live_trial_is_in_flight(endpoint: Endpoint):
    assert live_claim(endpoint)
    with mock.patch("healthchecks.services.http_probe", return_value=OK) as http:
        assert services.endpoint_probe(endpoint_id=endpoint.pk, kind="http") is None
    http.assert_not_called()
    assert stored(endpoint.base_url).status == BreakerStatus.HALF_OPEN  # the live call decides


def test_a_probe_sent_before_the_breaker_half_opened_does_not_decide_it(endpoint: Endpoint):
    # It went out while the breaker was open; a live trial may have gone out since.
    services.probe_record(endpoint=endpoint, kind="http", result=OK)
    assert stored(endpoint.base_url).status == BreakerStatus.HALF_OPEN
    assert live_claim(endpoint)


def test_a_probe_that_crashes_frees_the_trial_at_once(endpoint: Endpoint):
    with pytest.raises(RuntimeError):
        probe(endpoint, side_effect=RuntimeError("worker trouble"))
    assert stored(endpoint.base_url).status == BreakerStatus.HALF_OPEN
    assert live_claim(endpoint)


def test_a_probe_of_a_closed_breaker_claims_nothing_before_it_is_sent():
    ProviderFactory(name="calm", base_url="https://calm.example.test/v1")
    services.endpoints_sync()
    calm = Endpoint.objects.get()
    store = get_breaker_store()
    writes_before_sending: list[int] = []

    with mock.patch.object(store, "update", wraps=store.update) as update:

        def answer(**kwargs: Any) -> ProbeResult:
            writes_before_sending.append(update.call_count)
            return OK

        probe(calm, side_effect=answer)
    # No locking transaction ahead of the probe; its result is the one write.
    assert writes_before_sending == [0]
    assert update.call_count == 1
    assert stored(calm.base_url).status == BreakerStatus.CLOSED
