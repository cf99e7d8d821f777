"""`python manage.py serve`: prepare everything a fresh clone needs, then run the gateway.

Idempotent: generates secrets (settings do that on import), applies migrations, creates the
first admin user, then runs three child processes: the web server (uvicorn on the ASGI app), a
Celery worker and Celery beat (`--no-worker`, `--no-beat` leave them out, e.g. when they run as
separate services). Ctrl-C or SIGTERM stops all three, each gracefully; if one of them dies the
others are stopped too, so a half-running gateway never goes unnoticed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import IntegrityError

PASSWORD_FILE = "initial-admin-password"  # noqa: S105 - a file name
# uvicorn waits up to 30 s for requests in flight (long streams); a little more for it to exit.
STOP_TIMEOUT_SECONDS = 35.0


def admin_ensure(*, data_dir: Path) -> tuple[str, str | None]:
    """Create the first superuser if there is none. Returns (username, new password or None)."""
    user_model = get_user_model()
    existing = user_model.objects.filter(is_superuser=True).order_by("pk").first()
    if existing is not None:
        return existing.get_username(), None
    username = os.environ.get("LLMROTATE_ADMIN_USERNAME", "admin")
    password = os.environ.get("LLMROTATE_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    try:
        user_model.objects.create_superuser(username=username, email="", password=password)
    except IntegrityError:
        # Another process (a second worker started at the same moment) created it first.
        return username, None
    path = data_dir / PASSWORD_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return username, password


class Command(BaseCommand):
    help = "Set up (secrets, database, admin user) and run the gateway."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("LLMROTATE_HOST", "127.0.0.1"))
        parser.add_argument(
            "--port", type=int, default=int(os.environ.get("LLMROTATE_PORT", "8000"))
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=int(os.environ.get("LLMROTATE_WEB_WORKERS", "1")),
            help="Web worker processes. More than one needs REDIS_URL so they share key state.",
        )
        parser.add_argument("--no-access-log", action="store_true")
        parser.add_argument(
            "--no-worker", action="store_true", help="Do not start a Celery worker (probes, "
            "webhooks); run `celery -A llmrotate_site worker` elsewhere."
        )  # fmt: skip
        parser.add_argument(
            "--no-beat", action="store_true", help="Do not start Celery beat; run exactly one "
            "`celery -A llmrotate_site beat` elsewhere."
        )  # fmt: skip
        parser.add_argument(
            "--setup-only", action="store_true", help="Prepare, print login details, and exit."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        data_dir: Path = settings.DATA_DIR
        db = settings.DATABASES["default"]
        self.stdout.write(f"llmrotate: data directory {data_dir}")
        self.stdout.write(
            f"llmrotate: database {db['ENGINE'].rsplit('.', 1)[-1]}"
            + (f" at {db['NAME']}" if db["ENGINE"].endswith("sqlite3") else "")
        )
        self.stdout.write(
            "llmrotate: key state in "
            + ("Redis (shared)" if settings.REDIS_URL else "this process (embedded mode)")
        )
        self.stdout.write(
            "llmrotate: task broker "
            + ("Redis" if settings.REDIS_URL else f"files in {settings.LLMROTATE_BROKER_DIR}")
        )
        if options["workers"] > 1 and not settings.REDIS_URL:
            self.stderr.write(
                "warning: several workers without REDIS_URL do not share cooldowns; "
                "set REDIS_URL or use one worker."
            )
        self.stdout.write("llmrotate: applying database migrations…")
        call_command("migrate", interactive=False, verbosity=0)
        username, password = admin_ensure(data_dir=data_dir)
        url = f"http://{options['host']}:{options['port']}"
        self.stdout.write(self.style.SUCCESS(f"llmrotate: admin at {url}/admin/"))
        if password:
            self.stdout.write(
                self.style.WARNING(
                    f"  created user '{username}' with password: {password}\n"
                    f"  (also saved to {data_dir / PASSWORD_FILE}; change it with "
                    f"`python manage.py changepassword {username}` and delete that file)"
                )
            )
        else:
            hint = data_dir / PASSWORD_FILE
            self.stdout.write(
                f"  log in as '{username}'"
                + (f"; initial password in {hint}" if hint.exists() else "")
            )
        self.stdout.write(f"llmrotate: OpenAI base URL {url}/v1  (API docs: {url}/api/docs)")
        if options["setup_only"]:
            return
        raise SystemExit(supervise(self._children(options), out=self.stdout.write))

    def _children(self, options: dict[str, Any]) -> dict[str, list[str]]:
        python = sys.executable
        web = [
            python, "-m", "uvicorn", "llmrotate_site.asgi:application",
            "--host", options["host"], "--port", str(options["port"]),
            "--workers", str(options["workers"]), "--lifespan", "on", "--no-proxy-headers",
            "--timeout-graceful-shutdown", "30",
        ]  # fmt: skip
        if options["no_access_log"]:
            web.append("--no-access-log")
        children = {"web": web}
        celery = [python, "-m", "celery", "-A", "llmrotate_site"]
        if not options["no_worker"]:
            children["worker"] = [
                *celery, "worker", "--pool", "threads",
                "--concurrency", str(settings.LLMROTATE_WORKER_CONCURRENCY),
                "--loglevel", "INFO", "--without-gossip", "--without-mingle",
                "--without-heartbeat",
            ]  # fmt: skip
        if not options["no_beat"]:
            children["beat"] = [*celery, "beat", "--loglevel", "INFO"]
        return children


def _die_with_parent() -> None:
    # Linux: if the supervisor is killed outright (SIGKILL), the kernel sends its children
    # SIGTERM rather than leaving a worker and a web server running without it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(commands: dict[str, list[str]], *, out: Any) -> int:
    """Run the commands as children until a signal or until one exits; then stop them all."""
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop_signal.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children: dict[str, subprocess.Popen[bytes]] = {}
    for name, command in commands.items():
        # A session of their own: Ctrl-C reaches only this supervisor, which then stops each
        # child once, in order, instead of every process getting the terminal's signal at once.
        children[name] = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            command,
            cwd=settings.BASE_DIR,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    out("llmrotate: started " + ", ".join(f"{n} (pid {p.pid})" for n, p in children.items()))
    exit_code = 0
    while not stop_signal:
        dead = [(n, p.returncode) for n, p in children.items() if p.poll() is not None]
        if dead:
            name, code = dead[0]
            out(f"llmrotate: {name} exited with status {code}; stopping the others")
            exit_code = code or 1
            break
        time.sleep(0.2)
    else:
        out(f"llmrotate: {signal.Signals(stop_signal[0]).name} received, stopping…")
    for child in children.values():
        if child.poll() is None:
            child.terminate()  # SIGTERM: graceful for uvicorn, warm shutdown for Celery
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            out(f"llmrotate: {name} did not stop in time; killing it")
            child.kill()
            child.wait()
    out("llmrotate: stopped")
    return exit_code
