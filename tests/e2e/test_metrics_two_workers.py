"""One `serve --workers 2` (uvicorn's process manager, Postgres and Redis): whichever worker
answers a scrape, /metrics shows the traffic of both; a worker killed with SIGKILL and replaced
by uvicorn takes nothing away from the totals (Prometheus' rate() would read a drop as a reset).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from fake_upstream import FakeUpstream
from keys.config_io import config_import
from keys.services import client_token_create
from tests.conftest import free_port
from tests.e2e.conftest import (
    ROUTE,
    ServeProcess,
    gateway_config,
    metric_sum,
    scaled_worker_env,
    wait_for,
    web_worker,
)

pytestmark = [pytest.mark.scaled, pytest.mark.timeout(120)]

CHAT = {"model": ROUTE, "messages": [{"role": "user", "content": "Say hi"}]}


def requests_total(base_url: str, token: str) -> float:
    return metric_sum(base_url, token, "llmrotate_requests_total", route=ROUTE)


def requests_by_process(directory: Path) -> dict[int, float]:
    """Each process's own count, read from its counter file."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(path)):
            _metric, name, labels, _help = json.loads(key)[:4]
            if name == "llmrotate_requests_total" and labels.get("route") == ROUTE:
                counts[pid] = counts.get(pid, 0) + value
    return counts


def test_two_workers_add_up_and_a_killed_worker_takes_nothing_away(
    transactional_db: None,
    fake_upstream: FakeUpstream,
    tmp_path: Path,
    serve_processes: list[ServeProcess],
) -> None:
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_superuser(username="admin", email="", password="x" * 20)
    report = config_import(data=gateway_config(fake_upstream.base_url))
    proxy_token = report.generated_tokens["e2e"]
    _, monitor = client_token_create(name="prometheus", routes=["*"], scopes=["monitor"])
    data = tmp_path / "data"
    env = scaled_worker_env(
        f"llmrotate-metrics-{os.getpid()}:",
        data,
        # Each record reaches the series within this; the test polls for them anyway.
        LLMROTATE_RECORD_FLUSH_SECONDS="0.2",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = web_worker(port, env=env, log=tmp_path / "serve.log", workers=2)
    serve_processes.append(process)
    process.wait_ready(f"{url}/v1/models", headers={"Authorization": f"Bearer {proxy_token}"})

    def call(_: int) -> int:
        # A connection per call, so that both workers' accept loops get some.
        with httpx.Client(base_url=url, timeout=20) as client:
            response = client.post(
                "/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {proxy_token}"},
            )
            return response.status_code

    def send(count: int) -> None:
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(call, range(count))) == {200}

    metrics_dir = data / "metrics"
    # The kernel hands a shared socket's connections to whichever worker wakes first, and a
    # fast idle worker can win them all: batches go out until both workers have counted some.
    sent = 0
    deadline = time.monotonic() + 60
    while True:
        send(40)
        sent += 40
        by_process = wait_for(
            functools.partial(_counted, metrics_dir, sent),
            timeout=20,
            message=f"the workers did not count {sent} requests",
        )
        if len([n for n in by_process.values() if n]) == 2 or time.monotonic() > deadline:
            break
    assert len([n for n in by_process.values() if n]) == 2, by_process
    # Every scrape, whichever worker takes it, reads both workers' files.
    for _ in range(6):
        assert requests_total(url, monitor) == sent

    victim = max(by_process, key=lambda pid: by_process[pid])
    os.kill(victim, signal.SIGKILL)
    # uvicorn replaces the worker; until it does, the survivor answers.
    wait_for(
        lambda: _replaced(metrics_dir, by_process),
        timeout=30,
        message="uvicorn did not replace the killed worker",
    )
    for _ in range(4):
        assert requests_total(url, monitor) == sent  # the dead worker's count is still there
    send(10)
    wait_for(
        lambda: requests_total(url, monitor) == sent + 10,
        timeout=20,
        message=f"not {sent + 10}",
    )


def _counted(directory: Path, total: int) -> dict[int, float] | None:
    """Each process's count, once the counts add up to `total`."""
    counts = requests_by_process(directory)
    return counts if sum(counts.values()) == total else None


def _replaced(directory: Path, before: dict[int, float]) -> bool:
    """A new worker has started (it writes its files as soon as it counts anything)."""
    return any(int(p.stem.rsplit("_", 1)[1]) not in before for p in directory.glob("*.db"))
