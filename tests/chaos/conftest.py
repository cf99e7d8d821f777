"""Fixtures the upstream and client fault scenarios share: one hostile upstream per module,
well-behaved again at the start of each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.hostile_upstream import HostileUpstream


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    with HostileUpstream() as upstream:
        yield upstream


@pytest.fixture
def upstream(hostile: HostileUpstream) -> HostileUpstream:
    hostile.reset()
    return hostile
