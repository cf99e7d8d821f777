"""GET /metrics after real traffic: the official openai SDK through the live gateway to the
real fake upstream, then the Prometheus text as a scraper reads it.

The gateway thread runs in this process, so its counters carry what earlier tests counted:
every check compares two scrapes (`Scrape.delta`), and the call records (which the series are
counted from) are waited for, not slept for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from keys.services import client_token_create
from keys.state_store import get_key_state_store
from tests.e2e.conftest import KEY_SECRETS, ROUTE, LiveGateway, wait_for

pytestmark = pytest.mark.timeout(90)

CHAT: dict[str, Any] = {"model": ROUTE, "messages": [{"role": "user", "content": "Say hi"}]}
Labels = frozenset[tuple[str, str]]


@dataclass
class Scrape:
    samples: dict[tuple[str, Labels], float]
    text: str

    def value(self, name: str, **labels: str) -> float:
        """The sum over the series of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def label_names(self, name: str) -> set[frozenset[str]]:
        return {frozenset(k for k, _ in ls) for (n, ls) in self.samples if n == name}

    def delta(self, before: Scrape, name: str, **labels: str) -> float:
        return self.value(name, **labels) - before.value(name, **labels)


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, text)


@pytest.fixture
def monitor_token(live_gateway: LiveGateway) -> str:
    _, token = client_token_create(name="prometheus", routes=["*"], scopes=["monitor"])
    return token


def scrape(gateway: LiveGateway, token: str) -> Scrape:
    from usage.recorder import get_recorder

    # The traffic series are counted as the recorder prepares each record.
    assert get_recorder().flush(timeout=10)
    response = httpx.get(
        f"{gateway.base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def records_of(request_ids: list[str], *, count: int) -> list[Any]:
    from usage.models import CallRecord
    from usage.recorder import get_recorder

    def ready() -> list[Any] | None:
        assert get_recorder().flush(timeout=10)
        rows = list(CallRecord.objects.filter(request_id__in=request_ids))
        return rows if len(rows) == count else None

    return wait_for(ready, timeout=15, message=f"{count} records")


def test_counters_and_histograms_match_the_records_of_plain_and_streamed_calls(
    live_gateway: LiveGateway, monitor_token: str
) -> None:
    before = scrape(live_gateway, monitor_token)
    client = live_gateway.openai()
    ids = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(**CHAT)
        ids.append(raw.headers["x-llmrotate-request-id"])
    for _ in range(2):
        with client.chat.completions.with_streaming_response.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        ) as raw_stream:
            ids.append(raw_stream.headers["x-llmrotate-request-id"])
            for _line in raw_stream.iter_lines():
                pass
    rows = records_of(ids, count=5)
    after = scrape(live_gateway, monitor_token)

    requests = "llmrotate_requests_total"
    assert after.delta(before, requests, route=ROUTE, stream="false", outcome="success") == 3
    assert after.delta(before, requests, route=ROUTE, stream="true", status_class="2xx") == 2
    assert after.label_names(requests) == {
        frozenset({"route", "client", "outcome", "status_class", "stream"})
    }
    attempts = "llmrotate_attempts_total"
    assert after.delta(before, attempts, route=ROUTE, provider="fake", outcome="success") == 5
    assert after.label_names(attempts) == {
        frozenset(
            {"route", "provider", "upstream_model", "key_id", "outcome", "status_class", "stream"}
        )
    }
    # Round robin over two keys: every attempt is counted on the key that made it.
    per_key = {k: after.delta(before, attempts, key_id=k) for k in KEY_SECRETS}
    assert sum(per_key.values()) == 5 and all(per_key.values()), per_key

    tokens = "llmrotate_tokens_total"
    prompt = sum(r.prompt_tokens for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    assert prompt > 0 and completion > 0
    assert after.delta(before, tokens, route=ROUTE, type="prompt") == prompt
    assert after.delta(before, tokens, route=ROUTE, type="completion") == completion
    cost = sum(float(r.cost_usd or 0) for r in rows)
    assert math.isclose(
        after.delta(before, "llmrotate_cost_usd_total", route=ROUTE), cost, rel_tol=1e-9
    )

    def count(name: str, **labels: str) -> float:
        return after.delta(before, f"{name}_count", route=ROUTE, **labels)

    assert count("llmrotate_request_duration_seconds") == 5
    assert count("llmrotate_attempt_duration_seconds", stream="true") == 2
    assert count("llmrotate_time_to_first_token_seconds") == 2  # streams only
    assert count("llmrotate_time_to_last_token_seconds") == 5
    assert count("llmrotate_gateway_overhead_seconds") == 5
    # The +Inf bucket holds every observation; the buckets reach from 1 ms to minutes.
    inf = after.delta(before, "llmrotate_request_duration_seconds_bucket", route=ROUTE, le="+Inf")
    assert inf == 5
    les = {
        dict(ls)["le"]
        for (n, ls) in after.samples
        if n == "llmrotate_request_duration_seconds_bucket"
    }
    assert {"0.001", "60.0", "600.0", "+Inf"} <= les


def test_a_rate_limited_key_counts_a_rotation_a_transition_and_shows_cooling(
    live_gateway: LiveGateway, monitor_token: str
) -> None:
    live_gateway.prefer("key-a")
    before = scrape(live_gateway, monitor_token)
    live_gateway.script(key_a=[{"fault": "429", "retry_after": 20}])
    raw = live_gateway.openai().chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-llmrotate-attempts"] == "2"
    records_of([raw.headers["x-llmrotate-request-id"]], count=2)

    def cooled() -> Scrape | None:
        after = scrape(live_gateway, monitor_token)
        moved = after.delta(
            before,
            "llmrotate_key_state_transitions_total",
            key_id="key-a",
            **{"from": "active", "to": "cooldown"},
            reason="rate_limited",
        )
        return after if moved == 1 else None

    after = wait_for(cooled, message="key-a's cooldown was not counted")
    rotations = after.delta(
        before, "llmrotate_key_rotations_total", route=ROUTE, provider="fake", reason="rate_limited"
    )
    assert rotations == 1
    assert after.delta(before, "llmrotate_failovers_total") == 0  # one deployment only
    assert after.delta(before, "llmrotate_requests_total", route=ROUTE, outcome="success") == 1
    assert (
        after.delta(before, "llmrotate_attempts_total", key_id="key-a", outcome="rate_limited") == 1
    )
    # Shared-state gauges: read at the scrape, not counted.
    assert after.value("llmrotate_keys", provider="fake", state="cooldown") == 1
    assert after.value("llmrotate_keys", provider="fake", state="active") == 1
    assert after.value("llmrotate_keys_available", provider="fake") == 1
    returns = after.value("llmrotate_key_returns_in_seconds", key_id="key-a")
    # The cooldown the store holds (Retry-After 20 s, jittered), as seen from the scrape.
    state, _ = get_key_state_store().get_many(["key-a"], now=time.time())["key-a"]
    assert returns > 15 and abs(returns - (state.cooldown_until - time.time())) < 2
    assert after.value("llmrotate_key_returns_in_seconds", key_id="key-b") == 0
    # The fake upstream reported no headroom left on key-a with its 429.
    assert after.value("llmrotate_key_remaining_requests", key_id="key-a") == 0
    assert after.value("llmrotate_key_in_flight", key_id="key-a") == 0


def test_metrics_never_show_a_secret_or_a_message(
    live_gateway: LiveGateway, monitor_token: str
) -> None:
    client = live_gateway.openai()
    secret_words = "the-unique-prompt-words-zebra"
    client.chat.completions.create(
        model=ROUTE, messages=[{"role": "user", "content": secret_words}]
    )
    text = scrape(live_gateway, monitor_token).text
    for secret in (*KEY_SECRETS.values(), live_gateway.token, monitor_token, secret_words):
        assert secret not in text
    assert live_gateway.token[:12] not in text


def test_scraping_needs_a_monitor_token_or_the_scrape_token(
    live_gateway: LiveGateway, monitor_token: str
) -> None:
    url = f"{live_gateway.base_url}/metrics"

    def status(token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(url, headers=headers, timeout=10).status_code

    assert status(None) == 401
    assert status(live_gateway.token) in (401, 403)  # a proxy-only token
    assert status(monitor_token) == 200
    scrape_token = "scrape-token-for-the-test-0123456789"
    assert status(scrape_token) == 401
    with override_settings(LLMROTATE_METRICS_TOKEN=scrape_token):
        assert status(scrape_token) == 200
        assert status(scrape_token + "x") == 401


def test_metrics_switched_off_answer_404_and_count_nothing(
    live_gateway: LiveGateway, monitor_token: str
) -> None:
    from common import metrics

    before = scrape(live_gateway, monitor_token)
    metrics.ON = False
    try:
        live_gateway.openai().chat.completions.create(**CHAT)
        response = httpx.get(
            f"{live_gateway.base_url}/metrics",
            headers={"Authorization": f"Bearer {monitor_token}"},
            timeout=10,
        )
        assert response.status_code == 404
        from usage.recorder import get_recorder

        assert get_recorder().flush(timeout=10)
    finally:
        metrics.ON = True
    after = scrape(live_gateway, monitor_token)
    assert after.delta(before, "llmrotate_requests_total") == 0
