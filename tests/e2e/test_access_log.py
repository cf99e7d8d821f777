"""uvicorn's access log, as `manage.py serve` starts the web server: a token in the query string
is masked in it like everywhere else, its lines keep uvicorn's format, and `--no-access-log`
still turns it off. A real uvicorn process on 127.0.0.1, its output in a file."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from common.redaction import mask_secret
from keys.crypto import generate_client_token
from llmrotate_site.management.commands.serve import Command as ServeCommand
from tests.conftest import free_port
from tests.e2e.conftest import REPO, env_without

pytestmark = pytest.mark.timeout(60)


class WebServer:
    """The web child `manage.py serve` runs (same command line), on its own."""

    def __init__(self, tmp_path: Path, *, access_log: bool) -> None:
        self.port = free_port()
        options = {
            "host": "127.0.0.1",
            "port": self.port,
            "workers": 1,
            "no_access_log": not access_log,
            "no_worker": True,
            "no_beat": True,
        }
        command = ServeCommand()._children(options, verbose=False)["web"]
        self.log = tmp_path / f"web-{self.port}.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *command[1:]],
            cwd=REPO,
            # Embedded settings in a data directory of its own: the requests below need no
            # database, so both legs run the same server.
            env=env_without(
                "DATABASE_URL",
                "REDIS_URL",
                LLMROTATE_DATA_DIR=str(tmp_path / "var"),
                PYTHONUNBUFFERED="1",
            ),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.base_url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.output()
            if text in output:
                return output
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{output}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the output within {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


@pytest.fixture
def start_web(tmp_path: Path) -> Iterator[Callable[..., WebServer]]:
    servers: list[WebServer] = []

    def start(*, access_log: bool) -> WebServer:
        server = WebServer(tmp_path, access_log=access_log)
        servers.append(server)
        server.wait_for("Application startup complete")
        return server

    yield start
    for server in servers:
        server.stop()


def test_a_token_in_the_query_string_is_masked_in_the_access_log_which_can_be_off(
    start_web: Callable[..., WebServer],
) -> None:
    token = generate_client_token()[0]
    server = start_web(access_log=True)

    answer = httpx.get(f"{server.base_url}/no-such-page/?api_key={token}", timeout=10)
    assert answer.status_code == 404

    # uvicorn writes the access line before the response leaves, so it is there already; the
    # wait only covers the file system.
    line = f'"GET /no-such-page/?api_key={mask_secret(token)} HTTP/1.1" 404'
    output = server.wait_for(line)
    assert token not in output
    # Still uvicorn's format, which reads the record's arguments: the client address first.
    assert re.search(rf"^INFO: +127\.0\.0\.1:\d+ - {re.escape(line)}", output, re.MULTILINE), output

    # --no-access-log still turns it off. Django's own warning for the second 404 is written
    # after the first request's access line would have been.
    quiet = start_web(access_log=False)
    httpx.get(f"{quiet.base_url}/quiet-page/?api_key={token}", timeout=10)
    httpx.get(f"{quiet.base_url}/proof-page/", timeout=10)
    output = quiet.wait_for("Not Found: /proof-page/")
    assert '"GET /quiet-page/' not in output
    assert token not in output


def test_a_key_in_the_query_string_is_masked_in_the_access_log(
    start_web: Callable[..., WebServer],
) -> None:
    key = "sk-proj-querystring0123456789abcdefWXYZ"
    server = start_web(access_log=True)

    httpx.get(f"{server.base_url}/no-such-page/?window=24h&key={key}", timeout=10)

    output = server.wait_for(f"/no-such-page/?window=24h&key={mask_secret(key)} HTTP/1.1")
    assert key not in output
