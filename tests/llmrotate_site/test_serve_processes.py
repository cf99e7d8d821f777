"""`manage.py serve` runs web, worker and beat as children and stops all three together."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.conftest import ServeProcess, env_without

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(90)]
STARTED = re.compile(r"^serve +\| started (?P<children>.+)$", re.MULTILINE)
CHILD = re.compile(r"(?P<name>\w+) \(pid (?P<pid>\d+)\)")


def start(tmp_path: Path, *args: str) -> tuple[ServeProcess, str]:
    port = free_port()
    env = env_without(
        "DATABASE_URL", "REDIS_URL", "SECRET_KEY", "LLMROTATE_ENCRYPTION_KEYS",
        "LLMROTATE_WEBHOOK_URLS", LLMROTATE_DATA_DIR=str(tmp_path / "data"),
    )  # fmt: skip
    server = ServeProcess(
        ["--port", str(port), "--no-access-log", *args], env=env, log=tmp_path / "serve.log"
    )
    return server, f"http://127.0.0.1:{port}"


def children(server: ServeProcess) -> dict[str, int]:
    found = STARTED.search(server.output())
    assert found, server.output()
    return {m["name"]: int(m["pid"]) for m in CHILD.finditer(found["children"])}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(text: str, server: ServeProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.output():
        assert server.proc.poll() is None, server.output()
        assert time.monotonic() < deadline, f"{text!r} not seen:\n{server.output()}"
        time.sleep(0.1)


def test_ctrl_c_stops_web_worker_and_beat_within_seconds(tmp_path: Path, serve_processes):
    server, url = start(tmp_path)
    serve_processes.append(server)
    server.wait_ready(f"{url}/healthz")
    wait_for(" ready.", server)  # the worker
    wait_for("beat schedule synced", server)  # beat, on a fresh database
    pids = children(server)
    assert set(pids) == {"web", "worker", "beat"}
    assert all(alive(pid) for pid in pids.values())

    t0 = time.monotonic()
    code = server.stop(signal.SIGINT, timeout=15)
    elapsed = time.monotonic() - t0
    assert code == 0, server.output()
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert not [name for name, pid in pids.items() if alive(pid)]
    output = server.output()
    assert "serve  | SIGINT received" in output and "serve  | stopped" in output
    assert "Traceback" not in output


def test_without_worker_and_beat_only_the_web_server_runs(tmp_path: Path, serve_processes):
    server, url = start(tmp_path, "--no-worker", "--no-beat")
    serve_processes.append(server)
    server.wait_ready(f"{url}/healthz")
    assert set(children(server)) == {"web"}
    assert server.stop(signal.SIGTERM) == 0


def test_when_one_child_dies_the_others_are_stopped_and_serve_fails(
    tmp_path: Path, serve_processes
):
    server, url = start(tmp_path)
    serve_processes.append(server)
    server.wait_ready(f"{url}/healthz")
    pids = children(server)
    os.kill(pids["beat"], signal.SIGKILL)
    code = server.proc.wait(15)
    assert code != 0
    assert "beat exited with status -9; stopping the others" in server.output()
    assert not [name for name, pid in pids.items() if alive(pid)]


def test_when_serve_is_killed_outright_its_children_go_too(tmp_path: Path, serve_processes):
    """PR_SET_PDEATHSIG: SIGKILL leaves the supervisor no chance to stop them (nor to read
    their pipes); the kernel sends each child SIGTERM."""
    server, url = start(tmp_path)
    serve_processes.append(server)
    server.wait_ready(f"{url}/healthz")
    pids = children(server)
    server.proc.kill()
    server.proc.wait(5)
    deadline = time.monotonic() + 20
    while running := [name for name, pid in pids.items() if alive(pid)]:
        assert time.monotonic() < deadline, f"still running: {running}"
        time.sleep(0.1)
