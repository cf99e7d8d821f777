"""`manage.py serve` on a fresh clone: nothing configured, nothing installed but the venv.

It must generate its secrets, create the SQLite database and the first admin, print how to log
in, change nothing on a second run, then serve the admin (with its static files) until Ctrl-C.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import REPO, ServeProcess, env_without

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(60)]

CONFIGURED = (
    "DATABASE_URL",
    "REDIS_URL",
    "SECRET_KEY",
    "LLMROTATE_ENCRYPTION_KEYS",
    "LLMROTATE_REDIS_PREFIX",
    "LLMROTATE_ADMIN_USERNAME",
    "LLMROTATE_ADMIN_PASSWORD",
    "LLMROTATE_TEST_LEG",
)
# The login line of the block `serve` prints: "login      admin / <password>  (just created; …".
CREATED = re.compile(
    r"^serve +\|   login +(?P<user>\S+) / (?P<password>\S+)  \(just created; ", re.MULTILINE
)


def fresh_env(data_dir: Path) -> dict[str, str]:
    return env_without(*CONFIGURED, LLMROTATE_DATA_DIR=str(data_dir))


def setup_only(data_dir: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), "serve", "--setup-only"],
        cwd=REPO,
        env=fresh_env(data_dir),
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def superusers(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT username FROM auth_user WHERE is_superuser")]


def log_in(base_url: str, username: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=10) as browser:
        page = browser.get("/admin/login/")
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert csrf, page.text
        return browser.post(
            "/admin/login/?next=/admin/",
            data={
                "csrfmiddlewaretoken": csrf.group(1),
                "username": username,
                "password": password,
                "next": "/admin/",
            },
            headers={"Referer": f"{base_url}/admin/login/"},
        )


def test_a_fresh_clone_sets_itself_up_once_and_serves_the_admin(
    tmp_path: Path, serve_processes: list[ServeProcess]
):
    data_dir = tmp_path / "data"  # does not exist yet

    first = setup_only(data_dir)
    secrets_file = data_dir / "secrets.env"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    secrets = secrets_file.read_text()
    assert re.search(r"^SECRET_KEY=\S{40,}$", secrets, re.MULTILINE)
    assert re.search(r"^LLMROTATE_ENCRYPTION_KEYS=\S{40,}$", secrets, re.MULTILINE)
    database = data_dir / "llmrotate.sqlite3"
    assert database.is_file()
    created = CREATED.search(first)
    assert created, first
    username, password = created["user"], created["password"]
    assert username == "admin" and len(password) >= 12
    assert superusers(database) == [username]
    # The generated secrets are the process's own, never echoed to the terminal.
    for line in secrets.splitlines():
        if "=" in line and not line.startswith("#"):
            assert line.partition("=")[2] not in first

    second = setup_only(data_dir)
    assert not CREATED.search(second), second
    password_file = data_dir / "initial-admin-password"
    assert f"login      {username}, initial password in {password_file}" in second
    assert password not in second
    assert secrets_file.read_text() == secrets
    assert superusers(database) == [username]

    port = free_port()
    server = ServeProcess(
        ["--port", str(port), "--no-access-log"],
        env=fresh_env(data_dir),
        log=tmp_path / "serve.log",
    )
    serve_processes.append(server)
    base_url = f"http://127.0.0.1:{port}"
    server.wait_ready(f"{base_url}/admin/login/")
    assert httpx.get(f"{base_url}/admin/login/", timeout=5).status_code == 200
    css = httpx.get(f"{base_url}/static/admin/css/base.css", timeout=5)
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    # The printed password is the real one.
    logged_in = log_in(base_url, username, password)
    assert logged_in.status_code == 302 and logged_in.headers["location"] == "/admin/", (
        logged_in.text[:500]
    )

    t0 = time.monotonic()
    code = server.stop(signal.SIGINT, timeout=10)
    assert code == 0, f"serve did not exit cleanly on SIGINT (code {code}):\n{server.output()}"
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in server.output(), server.output()
