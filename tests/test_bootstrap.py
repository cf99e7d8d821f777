"""What settings do to the data directory on start: its mode, the SQLite file's mode, and which
secrets go into secrets.env. Each test loads the settings in a fresh process (with the usual
0022 umask) against a data directory of its own, in embedded mode on both legs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, env_without

SECRETS = ("SECRET_KEY", "LLMROTATE_ENCRYPTION_KEYS", "LLMROTATE_WEBHOOK_SECRET")
# Loads the settings, opens the database as the gateway does (WAL, so -wal and -shm appear),
# writes to it, and prints the mode of each file while the connection is still open.
OPEN_DATABASE = """
import json, os, django
django.setup()
from django.conf import settings
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("CREATE TABLE IF NOT EXISTS t (x)")
    cursor.execute("INSERT INTO t VALUES (1)")
name = settings.DATABASES["default"]["NAME"]
print(json.dumps({s: oct(os.stat(str(name) + s).st_mode & 0o777) for s in ("", "-wal", "-shm")}))
"""


def load_settings(
    data_dir: Path, code: str = "import django; django.setup()", **env: str
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env_without(
            "DATABASE_URL",
            "REDIS_URL",
            *SECRETS,
            DJANGO_SETTINGS_MODULE="llmrotate_site.settings",
            LLMROTATE_DATA_DIR=str(data_dir),
            **env,
        ),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_existing_data_dir_open_to_others_is_made_0700(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)

    done = load_settings(data_dir)

    assert mode(data_dir) == 0o700
    assert "warning" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_data_dir_of_another_user_is_left_alone_with_a_warning(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    os.chown(data_dir, 65534, 65534)  # nobody

    done = load_settings(data_dir)  # succeeds: root may still write there

    assert mode(data_dir) == 0o755
    assert f"llmrotate: warning: {data_dir} has mode 0755" in done.stderr


def test_the_sqlite_database_and_its_wal_files_are_created_0600(tmp_path: Path) -> None:
    modes = json.loads(load_settings(tmp_path / "var", OPEN_DATABASE).stdout)
    assert modes == {"": "0o600", "-wal": "0o600", "-shm": "0o600"}


def test_an_existing_sqlite_database_open_to_others_is_made_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    database = data_dir / "llmrotate.sqlite3"
    database.touch(mode=0o644)
    database.chmod(0o644)

    load_settings(data_dir)

    assert mode(database) == 0o600


def test_only_the_secrets_the_environment_lacks_are_generated_into_the_file(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    provided = {"SECRET_KEY": "s" * 50, "LLMROTATE_ENCRYPTION_KEYS": "x" * 43 + "="}

    load_settings(data_dir, **provided)

    written = (data_dir / "secrets.env").read_text()
    names = [line.partition("=")[0] for line in written.splitlines() if "=" in line]
    assert names == ["LLMROTATE_WEBHOOK_SECRET"]
    assert mode(data_dir / "secrets.env") == 0o600


def test_secrets_already_in_the_file_are_read_back_not_generated_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    (data_dir / "secrets.env").write_text("SECRET_KEY=" + "k" * 50 + "\n")
    show = "import django; django.setup(); from django.conf import settings as s; "
    show += "print(s.SECRET_KEY, s.LLMROTATE_WEBHOOK_SECRET)"

    first = load_settings(data_dir, show, LLMROTATE_ENCRYPTION_KEYS="x" * 43 + "=").stdout
    again = load_settings(data_dir, show, LLMROTATE_ENCRYPTION_KEYS="x" * 43 + "=").stdout

    assert first.split()[0] == "k" * 50
    assert first == again
    names = [line.partition("=")[0] for line in (data_dir / "secrets.env").read_text().split()]
    assert names == ["SECRET_KEY", "LLMROTATE_WEBHOOK_SECRET"]
