"""What `make run` shows a newcomer: each child's lines under its name, no Celery banners and no
root warning, and one closing block (admin, login, base URLs, dashboard, Ctrl-C) printed once the
web server accepts connections. `--verbose` shows the children's output unfiltered."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, ServeProcess
from tests.llmrotate_site.test_serve_processes import start

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(90)]

# The name, padded to the longest one ("worker"), then " | ".
LABELLED = re.compile(r"^(?P<name>serve |web   |worker|beat  ) \| (?P<text>.*)$")
READY = "llmrotate is ready on "
BLOCK_END = "Ctrl-C stops web, worker and beat."
# Pieces of the worker's banner (ASCII art, [config]/[queues]/[tasks]) and of beat's.
BANNER = (
    "-------------- celery@",
    "--- ***** -----",
    "[config]",
    "[queues]",
    "[tasks]",
    ".> transport:",
    "celery beat v",
    "LocalTime ->",
    "Configuration ->",
)
ROOT_WARNING = ("superuser privileges", "SecurityWarning", "--uid option")


def wait_until(
    condition: str, found: Callable[[str], object], server: ServeProcess, timeout: float
) -> None:
    """Poll the log until `found(output)` is true; fail with the log if serve dies or time runs
    out."""
    deadline = time.monotonic() + timeout
    while not found(server.output()):
        assert server.proc.poll() is None, f"serve exited:\n{server.output()}"
        assert time.monotonic() < deadline, f"{condition} not seen:\n{server.output()}"
        time.sleep(0.05)


def labelled(output: str) -> list[tuple[str, str]]:
    """(name, text) for every line; fails on the first line that is not labelled."""
    lines = []
    for line in output.splitlines():
        match = LABELLED.match(line)
        assert match, f"unlabelled line {line!r} in:\n{output}"
        lines.append((match["name"].strip(), match["text"]))
    return lines


def test_each_line_is_labelled_and_the_start_up_ends_with_where_to_go(
    tmp_path: Path, serve_processes: list[ServeProcess]
):
    server, url = start(tmp_path)
    serve_processes.append(server)
    port = int(url.rsplit(":", 1)[1])

    wait_until("the closing block", lambda out: BLOCK_END in out, server, timeout=45)
    # Printed only once the server takes connections: one right now succeeds, no retry.
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    # The worker and beat have started too (their lines may come before or after the block).
    wait_until(
        "the worker", lambda out: re.search(r"^worker \| .* ready\.$", out, re.M), server, 30
    )
    synced = re.compile(r"^beat   \| .*beat schedule synced", re.M)
    wait_until("beat", synced.search, server, 30)
    assert server.stop(signal.SIGINT, timeout=15) == 0, server.output()

    output = server.output()
    lines = labelled(output)
    names = {name for name, _ in lines}
    assert names == {"serve", "web", "worker", "beat"}, output
    # No Celery banner, no root warning, no blank filler lines.
    assert not [text for _, text in lines if any(piece in text for piece in BANNER)], output
    assert not [text for _, text in lines if any(piece in text for piece in ROOT_WARNING)], output
    assert not [text for _, text in lines if not text.strip()], output
    assert "Traceback" not in output

    texts = [f"{name}: {text}" for name, text in lines]
    listening = next(i for i, t in enumerate(texts) if t.startswith("web: ") and
                     f"Uvicorn running on {url}" in t)  # fmt: skip
    ready = texts.index(f"serve: {READY}{url}")
    assert listening < ready, output
    assert texts.count(f"serve: {READY}{url}") == 1, output  # once
    end = texts.index(f"serve: {BLOCK_END}")
    block = [text for name, text in lines[ready : end + 1]]
    assert all(name == "serve" for name, _ in lines[ready : end + 1]), output
    password_file = tmp_path / "data" / "initial-admin-password"  # outside the working dir
    password = password_file.read_text().strip()
    # As serve shows its interpreter: relative to its working directory (REPO) when inside it.
    inside = Path(sys.executable).is_relative_to(REPO)
    python = Path(sys.executable).relative_to(REPO) if inside else sys.executable
    expected = [
        f"  admin      {url}/admin/",
        f"  login      admin / {password}  (just created; also saved in {password_file})",
        f"             change it: {python} manage.py changepassword admin, then delete that file",
        f"  OpenAI     base URL {url}/v1",
        f"  Anthropic  base URL {url}",
        f"  dashboard  {url}/dashboard/",
        f"  API docs   {url}/api/docs",
    ]
    assert block[1:-1] == expected, "\n".join(block)
    # Everything the supervisor says before the children start comes first.
    started = next(i for i, t in enumerate(texts) if t.startswith("serve: started web (pid "))
    assert all(t.startswith("serve: ") for t in texts[:started]), output
    assert texts[-1] == "serve: stopped"


def test_verbose_shows_what_the_default_leaves_out_still_labelled(
    tmp_path: Path, serve_processes: list[ServeProcess]
):
    """The other side of the test above: what it finds missing is there to be left out."""
    server, _ = start(tmp_path, "--verbose")
    serve_processes.append(server)
    wanted = ["worker |  -------------- celery@", "beat   | LocalTime ->", BLOCK_END]
    if os.geteuid() == 0:  # Celery warns about root only when run as root
        wanted.append("worker | Please specify a different user using the --uid option.")
    wait_until(
        f"all of {wanted}", lambda out: all(piece in out for piece in wanted), server, timeout=45
    )
    assert server.stop(signal.SIGTERM, timeout=15) == 0, server.output()
    labelled(server.output())  # every line, banners and warnings included
