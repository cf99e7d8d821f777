"""`manage.py serve --config FILE` and `LLMROTATE_CONFIG=FILE`: the config file is imported
before anything is served, and a file with errors stops `serve` before it starts anything."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fake_upstream import FakeUpstream
from tests.conftest import free_port
from tests.e2e.conftest import REPO, ServeProcess
from tests.e2e.test_serve_command import fresh_env

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(90)]

TOKEN = "llmr-e2e-serve-config-token-5Jd8Qw2Lx7"
SECRET = "sk-e2e-serve-config-9Vb3Nc6Mz1Kp4Hq"


def config(upstream_url: str) -> dict[str, Any]:
    return {
        "version": 1,
        "providers": {"fake": {"kind": "openai", "base_url": upstream_url}},
        "keys": [{"id": "fake-1", "provider": "fake", "secret": f"literal://{SECRET}"}],
        "routes": {
            "configured-route": {"deployments": [{"provider": "fake", "model": "gpt-4o-mini"}]}
        },
        "clients": [{"name": "from-file", "token": f"literal://{TOKEN}", "routes": ["*"]}],
    }


def bad_config() -> dict[str, Any]:
    return {
        "providers": {"fake": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "routes": {"r": {"deployments": [{"provider": "nowhere", "model": "m"}]}},
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def provider_names(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "llmrotate.sqlite3") as conn:
        return [row[0] for row in conn.execute("SELECT name FROM keys_provider ORDER BY name")]


def serve_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "manage.py"), "serve", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_config_file_is_in_place_when_the_first_request_is_served(
    tmp_path: Path, serve_processes: list[ServeProcess], fake_upstream: FakeUpstream
):
    file = write(tmp_path / "gateway.yaml", config(fake_upstream.base_url))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = ServeProcess(
        ["--port", str(port), "--no-access-log", "--no-worker", "--no-beat", "--config", str(file)],
        env=fresh_env(tmp_path / "data"),
        log=tmp_path / "serve.log",
    )
    serve_processes.append(server)
    # Until the web server answers anything at all (its liveness page needs no config).
    server.wait_ready(f"{base_url}/healthz", timeout=45, status=None)

    # The very first proxy request: the client, the route and its key are already there.
    answer = httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"model": "configured-route", "messages": [{"role": "user", "content": "hi"}]},
        timeout=20,
    )
    assert answer.status_code == 200, answer.text
    assert fake_upstream.stats()["requests"] == {SECRET: 1}
    output = server.output()
    assert f"importing {file}" in output
    # The import's report is shown, but never the secrets of the file.
    assert "providers: 1 created" in output
    assert SECRET not in output and TOKEN not in output


def test_a_config_file_with_errors_stops_serve_before_anything_starts(tmp_path: Path):
    file = write(tmp_path / "broken.yaml", bad_config())
    data_dir = tmp_path / "data"
    done = serve_run(["--no-worker", "--no-beat", "--config", str(file)], fresh_env(data_dir))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"{file} is invalid" in output
    assert "unknown provider 'nowhere'" in output
    assert "started" not in output and "ready" not in output
    assert "Traceback" not in output
    # Nothing of the file was saved.
    assert provider_names(data_dir) == []


def test_an_unreadable_config_file_stops_serve(tmp_path: Path):
    missing = tmp_path / "missing.yaml"
    done = serve_run(["--setup-only", "--config", str(missing)], fresh_env(tmp_path / "data"))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"cannot read {missing}" in output
    assert "llmrotate is set up" not in output


def test_llmrotate_config_imports_the_file_as_the_option_does(
    tmp_path: Path, fake_upstream: FakeUpstream
):
    file = write(tmp_path / "gateway.yaml", config(fake_upstream.base_url))
    data_dir = tmp_path / "data"
    done = serve_run(["--setup-only"], {**fresh_env(data_dir), "LLMROTATE_CONFIG": str(file)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert provider_names(data_dir) == ["fake"]


def test_llmrotate_config_with_errors_stops_serve(tmp_path: Path):
    file = write(tmp_path / "broken.yaml", bad_config())
    data_dir = tmp_path / "data"
    done = serve_run(
        ["--no-worker", "--no-beat"], {**fresh_env(data_dir), "LLMROTATE_CONFIG": str(file)}
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "unknown provider 'nowhere'" in output
    assert "started" not in output
    assert provider_names(data_dir) == []


def test_several_workers_without_redis_are_refused_before_anything_is_set_up(tmp_path: Path):
    data_dir = tmp_path / "data"
    done = serve_run(["--workers", "2", "--no-worker", "--no-beat"], fresh_env(data_dir))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "--workers 2 needs REDIS_URL" in output
    assert "Traceback" not in output
    # Refused before the database was set up or a server started.
    assert "applying database migrations" not in output and "ready" not in output
