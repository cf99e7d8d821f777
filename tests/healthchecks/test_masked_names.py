"""An endpoint's base URL may carry credentials (`https://user:token@host/v1?api-key=…`): the
names the health checks give endpoints in errors, logs and the admin never show them."""

from __future__ import annotations

from unittest import mock

import pytest
from redis.exceptions import WatchError

from healthchecks.breaker_store import RedisBreakerStore
from healthchecks.models import BreakerRecord, Endpoint, HealthEvent, ProbeStatus

URL = "https://u:tok3n-value@h.example.test/v1?api-key=s3cret-value"


def assert_masked(text: str) -> None:
    assert "h.example.test/v1" in text
    assert "tok3n-value" not in text and "s3cret-value" not in text


def test_a_breaker_that_keeps_changing_is_reported_without_the_urls_secrets():
    store = RedisBreakerStore("redis://127.0.0.1:1/0", prefix="test:")  # never connects
    pipe = mock.MagicMock()
    pipe.__enter__.return_value = pipe
    pipe.get.return_value = None
    pipe.execute.side_effect = WatchError  # another process wins every time
    with (
        mock.patch.object(store._client, "pipeline", return_value=pipe),
        pytest.raises(RuntimeError, match="kept changing") as raised,
    ):
        store.update(URL, lambda state: (state, None))
    assert_masked(str(raised.value))


def test_endpoints_and_their_rows_name_themselves_masked():
    endpoint = Endpoint(base_url=URL)
    assert_masked(str(endpoint))
    assert_masked(
        str(HealthEvent(endpoint=endpoint, kind="http", ok=False, status=ProbeStatus.FAILED))
    )
    assert_masked(str(BreakerRecord(endpoint=URL)))
