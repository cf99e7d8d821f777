"""Helpers for the monitoring API tests: calls written through the production write path
(records and rollups in one transaction), and authenticated API clients."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from tests.factories import ClientTokenFactory
from tests.usage.conftest import make_call
from usage.calls import CallData, call_prepare, calls_write
from usage.models import CallRecord

_ids = itertools.count()


def call(**overrides: Any) -> CallData:
    overrides.setdefault("request_id", f"req-{next(_ids):06d}")
    return make_call(**overrides)


def write_calls(calls: Iterable[CallData]) -> list[CallRecord]:
    records = [CallRecord(**call_prepare(data, log=False)) for data in calls]
    calls_write(records)
    return records


@pytest.fixture
def now() -> datetime:
    return timezone.now()


@pytest.fixture
def monitor_token(db: None) -> str:
    return str(ClientTokenFactory(name="monitoring", scopes=["monitor"]).raw_token)


@pytest.fixture
def api(monitor_token: str) -> Client:
    """A test client that sends a token with the `monitor` scope."""
    return Client(headers={"Authorization": f"Bearer {monitor_token}"})
