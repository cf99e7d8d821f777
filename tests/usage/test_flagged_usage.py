"""Reported usage that cannot be true is flagged, kept, left out of the totals until accepted."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db.models import Sum
from django.test import Client
from django.urls import reverse

from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls
from usage.calls import call_prepare
from usage.models import CallRecord, DayRollup, HourRollup, MinuteRollup, UsageSource

api = monitoring.api
monitor_token = monitoring.monitor_token
now = monitoring.now

pytestmark = pytest.mark.django_db

INT_MAX = 2**31 - 1


def hostile(now: datetime) -> Any:
    """An o1-pro reply (200k context window) that claims 2**31 - 1 output tokens."""
    return call(
        request_id="hostile", started_at=now - timedelta(minutes=5), requested_model="o1-pro",
        upstream_model="o1-pro", prompt_tokens=20, completion_tokens=INT_MAX,
        usage_source=UsageSource.REPORTED,
    )  # fmt: skip


def plausible(now: datetime) -> Any:
    return call(
        request_id="plausible", started_at=now - timedelta(minutes=5), prompt_tokens=1000,
        completion_tokens=500, max_output_tokens=500, usage_source=UsageSource.REPORTED,
    )  # fmt: skip


def rollup_sums() -> list[dict[str, Any]]:
    return [
        model.objects.aggregate(
            calls=Sum("calls"), tokens=Sum("total_tokens"), cost=Sum("cost_e10"),
            completion=Sum("completion_tokens"), reported=Sum("reported_tokens"),
        )
        for model in (MinuteRollup, HourRollup, DayRollup)
    ]  # fmt: skip


def test_a_reply_claiming_2_31_minus_1_tokens_is_flagged_kept_and_left_out_of_the_totals(
    api: Client, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="usage.calls"):
        write_calls([hostile(now), plausible(now)])

    flagged = CallRecord.objects.get(request_id="hostile")
    assert flagged.usage_flagged
    assert flagged.completion_tokens == INT_MAX
    assert flagged.cost_usd is not None and flagged.cost_usd > 1_000_000  # kept as computed
    assert not CallRecord.objects.get(request_id="plausible").usage_flagged

    # gpt-4o-mini: 1000 input at $0.15 and 500 output at $0.60 per 1M tokens.
    total = api.get("/api/usage?window=24h").json()["total"]
    assert (total["calls"], total["total_tokens"]) == (2, 1500)
    assert total["estimated_cost_usd"] == pytest.approx(0.00045)
    stats = api.get("/api/usage/stats?window=24h").json()
    assert (stats["tokens"]["total"], stats["tokens"]["reported"]) == (1500, 1500)
    assert stats["cost_usd"] == pytest.approx(0.00045)
    for sums in rollup_sums():
        assert sums == {
            "calls": 2, "tokens": 1500, "cost": 4_500_000, "completion": 500, "reported": 1500
        }  # fmt: skip

    recent = api.get("/api/usage/recent?window=24h").json()["records"]
    assert {r["request_id"]: r["usage_flagged"] for r in recent} == {
        "hostile": True,
        "plausible": False,
    }
    attempt = api.get("/api/requests/hostile").json()["attempts"][0]
    assert attempt["usage_flagged"] is True

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "hostile" in warnings[0] and str(INT_MAX) in warnings[0] and "o1-pro" in warnings[0]


def test_accepting_flagged_usage_adds_its_tokens_and_cost_to_every_resolution_once(
    admin_client: Client, api: Client, now: datetime
) -> None:
    write_calls([hostile(now), plausible(now)])
    record = CallRecord.objects.get(request_id="hostile")
    assert record.cost_usd is not None
    before = rollup_sums()
    changelist = reverse("admin:usage_callrecord_changelist")
    action = {"action": "accept_flagged_usage", "_selected_action": [str(record.pk)]}

    for _ in range(2):  # accepting twice adds once
        assert admin_client.post(changelist, action).status_code == 302

    record.refresh_from_db()
    assert not record.usage_flagged
    cost_e10 = int(record.cost_usd * 10**10)
    for old, new in zip(before, rollup_sums(), strict=True):
        assert new == {
            "calls": old["calls"],  # counted when written
            "tokens": old["tokens"] + record.total_tokens,
            "cost": old["cost"] + cost_e10,
            "completion": old["completion"] + INT_MAX,
            "reported": old["reported"] + record.total_tokens,
        }
    total = api.get("/api/usage?window=24h").json()["total"]
    assert total["total_tokens"] == 1500 + record.total_tokens


def test_a_plausible_reply_is_untouched(now: datetime) -> None:
    row = call_prepare(plausible(now), log=False)
    assert row["usage_flagged"] is False
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1000, 500)


@pytest.mark.parametrize(("completion_tokens", "flagged"), [(1000, True), (110, False)])
def test_output_beyond_the_requests_own_limit_is_flagged_with_a_little_slack(
    now: datetime, completion_tokens: int, flagged: bool
) -> None:
    data = call(
        prompt_tokens=10, completion_tokens=completion_tokens, max_output_tokens=100,
        usage_source=UsageSource.REPORTED,
    )  # fmt: skip
    assert call_prepare(data, log=False)["usage_flagged"] is flagged


@pytest.mark.parametrize(("prompt_tokens", "flagged"), [(20_000, True), (5_000, False)])
def test_a_model_without_a_known_context_window_is_held_to_the_global_ceiling(
    settings: Any, prompt_tokens: int, flagged: bool
) -> None:
    settings.LLMROTATE_MAX_PLAUSIBLE_TOKENS = 10_000
    data = call(
        provider_kind="openai_compatible", requested_model="my-llama", upstream_model="my-llama",
        prompt_tokens=prompt_tokens, usage_source=UsageSource.REPORTED,
    )  # fmt: skip
    assert call_prepare(data, log=False)["usage_flagged"] is flagged


def test_only_usage_the_upstream_reported_is_judged() -> None:
    # The gateway's own estimate counts text it actually received.
    data = call(
        requested_model="o1-pro", upstream_model="o1-pro", completion_tokens=5_000_000,
        usage_source=UsageSource.EXTRAPOLATED,
    )  # fmt: skip
    assert call_prepare(data, log=False)["usage_flagged"] is False
