"""Reconciliation counts: the prompt as the client sent it and as the gateway forwarded it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from usage import calls
from usage.calls import CallData, call_count_tokens

NOW = datetime(2026, 12, 7, tzinfo=UTC)
SENT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hello there"}],
    "stream": True,
}


def data(sent: dict[str, Any], forwarded: dict[str, Any] | None) -> CallData:
    return CallData(
        request_id="r",
        started_at=NOW,
        finished_at=NOW,
        requested_model="gpt-4o-mini",
        outcome="success",
        prompt_body=sent,
        forwarded_body=forwarded,
    )


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The bodies count_prompt_tokens was asked to count."""
    seen: list[dict[str, Any]] = []
    real = calls.count_prompt_tokens

    def spy(body: dict[str, Any], **kwargs: Any) -> int:
        seen.append(body)
        return real(body, **kwargs)

    monkeypatch.setattr(calls, "count_prompt_tokens", spy)
    return seen


def test_a_forwarded_body_sharing_the_prompt_is_not_tokenized_twice(counted):
    # What the dialects forward: a shallow copy with the model and stream_options changed.
    forwarded = {**SENT, "model": "gpt-4o", "stream_options": {"include_usage": True}}
    record = data(SENT, forwarded)
    call_count_tokens(record)
    assert counted == [SENT]
    assert record.forwarded_prompt_tokens == record.counted_prompt_tokens == 3 + 1 + 2 + 3
    assert record.prompt_body is None and record.forwarded_body is None  # texts dropped


def test_a_forwarded_prompt_the_gateway_changed_is_counted_on_its_own(counted):
    forwarded = {**SENT, "messages": [*SENT["messages"], {"role": "user", "content": "more"}]}
    record = data(SENT, forwarded)
    call_count_tokens(record)
    assert counted == [SENT, forwarded]
    assert record.counted_prompt_tokens is not None
    assert record.forwarded_prompt_tokens == record.counted_prompt_tokens + 3 + 1 + 1
