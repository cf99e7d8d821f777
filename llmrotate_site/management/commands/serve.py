"""`python manage.py serve`: prepare everything a fresh clone needs, then run the gateway.

Idempotent: generates secrets (settings do that on import), applies migrations, creates the
first admin user, imports the config file given with `--config` or LLMROTATE_CONFIG (as
`import_config` does; an invalid one stops it before anything runs), then runs three child
processes: the web server (uvicorn on the ASGI app), a Celery worker and Celery beat
(`--no-worker`, `--no-beat` leave them out, e.g. when they run as separate services). Ctrl-C
or SIGTERM stops all three, each gracefully; if one of them dies the others are stopped too,
so a half-running gateway never goes unnoticed.

One terminal, four voices: every line is prefixed with who wrote it (`serve  |` for this
supervisor, `web    |`, `worker |`, `beat   |` for the children, stdout and stderr alike), read
from the children's pipes by one thread per pipe as soon as it is written. Celery's start-up
banners and its "running as root" warning are left out unless `--verbose`. Once the web server
accepts connections, one block says where everything is and how to log in.

With LLMROTATE_LOG_FORMAT=json the terminal is a log shipper's input instead: one JSON object
per line, no prefixes. The children's lines are JSON already and pass as they are; anything
else (the supervisor's own messages, a child's text before its logging is set up, such as a
traceback or uvicorn's parent process with several workers) becomes an object whose `logger`
says who wrote it (`llmrotate.serve`, `llmrotate.serve.web`, …).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TextIO

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError

PASSWORD_FILE = "initial-admin-password"  # noqa: S105 - a file name
# uvicorn waits up to 30 s for requests in flight (long streams); a little more for it to exit.
STOP_TIMEOUT_SECONDS = 35.0
SELF = "serve"  # the supervisor's own prefix
# Once the web server accepts connections, the block waits for the children's start-up lines to
# settle (the worker's first one seen, then this long without any; at most SETTLE_MAX_SECONDS)
# so that it comes last.
SETTLE_SECONDS = 0.5
SETTLE_MAX_SECONDS = 4.0
# Celery warns (a Python warning) when the worker runs as root; `-W`-style filter, message prefix.
ROOT_WARNING = "You're running the worker with superuser privileges"
# uvicorn's text lines ("INFO:     Started parent process [7]") say their level first.
TEXT_LEVEL = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+")


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


def config_apply(path: Path, *, console: Console) -> None:
    """Import the config file before any child starts, so the web server's first request
    already sees its routes. Raises CommandError (the file's errors, exit status 1) when the
    file is unreadable or invalid, in which case nothing of it is saved."""
    console.say(f"importing {path}…")
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("import_config", str(path), stdout=out, stderr=err)
    finally:
        # Its report, and the tokens it generated for new clients: shown only this once.
        for text, to_err in ((out.getvalue(), False), (err.getvalue(), True)):
            if text.strip():
                console.say(text.rstrip("\n"), err=to_err)


class Console:
    """Whole lines to the terminal from several threads, each prefixed with who wrote it."""

    def __init__(
        self, names: Iterable[str], *, stdout: TextIO, stderr: TextIO, json_lines: bool = False
    ) -> None:
        self.width = max(len(name) for name in (SELF, *names))
        self.stdout, self.stderr = stdout, stderr
        self.json_lines = json_lines  # see the module's docstring
        self.last_child_line = time.monotonic()
        self.heard: set[str] = set()  # the children that have written a line
        self._lock = threading.Lock()

    def line(self, name: str, text: str, *, err: bool = False) -> None:
        stream = self.stderr if err else self.stdout
        with self._lock:
            if name != SELF:
                self.last_child_line = time.monotonic()
                self.heard.add(name)
            line = self._render(name, text, err=err)
            # A closed terminal must not stop the supervisor, nor the threads draining pipes.
            with contextlib.suppress(OSError, ValueError):
                try:
                    stream.write(line)
                except UnicodeEncodeError:  # a terminal that is not UTF-8: "?" for the rest
                    encoding = getattr(stream, "encoding", None) or "ascii"
                    stream.write(line.encode(encoding, "replace").decode(encoding))
                stream.flush()

    def say(self, text: str, *, err: bool = False) -> None:
        if self.json_lines:  # one object, a block's lines together in its message
            self.line(SELF, text, err=err)
            return
        for line in text.splitlines() or [""]:
            self.line(SELF, line, err=err)

    def _render(self, name: str, text: str, *, err: bool) -> str:
        if not self.json_lines:
            return f"{name:<{self.width}} | {text}\n"
        if name != SELF and _is_json_object(text):
            return text + "\n"
        level = "WARNING" if err else "INFO"
        if name != SELF:
            level = "ERROR" if err else "INFO"  # a child's stray text on stderr: a traceback
            if found := TEXT_LEVEL.match(text):
                level, text = found[1], text[found.end() :]
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        logger = "llmrotate.serve" if name == SELF else f"llmrotate.serve.{name}"
        line = {"timestamp": now, "level": level, "logger": logger, "message": text}
        return json.dumps(line, ensure_ascii=False) + "\n"


def _is_json_object(text: str) -> bool:
    if not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


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
            help="Web worker processes. More than one needs REDIS_URL (shared key state); "
            "without it, serve refuses.",
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
            "--config",
            type=Path,
            default=os.environ.get("LLMROTATE_CONFIG") or None,
            metavar="FILE",
            help="Import this YAML or JSON config file (providers, keys, routes, clients; see "
            "import_config) before serving. Default: $LLMROTATE_CONFIG.",
        )
        parser.add_argument(
            "--setup-only", action="store_true", help="Prepare, print login details, and exit."
        )
        parser.add_argument(
            "--verbose", action="store_true", help="Show the children's output unfiltered "
            "(Celery's banners and warnings included); so does --verbosity 2."
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        if options["workers"] > 1 and not settings.REDIS_URL:
            # Refused rather than warned: without a shared store each worker keeps its own
            # cooldowns, quarantines, breakers and limit counters, so a key one worker cooled
            # down on a 429 would go on being hammered by the others, and each would admit a
            # client's whole limit. Sharing it through SQLite would put a database write on
            # every request (docs/benchmarks.md, "Several workers").
            raise CommandError(
                f"--workers {options['workers']} needs REDIS_URL: the workers must share key"
                " state (cooldowns, quarantines, circuit breakers, limits), which embedded mode"
                " keeps in one process. Set REDIS_URL (docs/configuration.md) or run one worker;"
                " one worker carries a core's worth of traffic (docs/benchmarks.md)."
            )
        verbose = options["verbose"] or options["verbosity"] >= 2
        children = {} if options["setup_only"] else self._children(options, verbose=verbose)
        console = Console(
            children,
            stdout=sys.stdout,
            stderr=sys.stderr,
            json_lines=settings.LLMROTATE_LOG_FORMAT == "json",
        )
        data_dir: Path = settings.DATA_DIR
        db = settings.DATABASES["default"]
        console.say(f"data directory {data_dir}")
        console.say(
            f"database {db['ENGINE'].rsplit('.', 1)[-1]}"
            + (f" at {db['NAME']}" if db["ENGINE"].endswith("sqlite3") else "")
        )
        console.say(
            "key state in "
            + ("Redis (shared)" if settings.REDIS_URL else "this process (embedded mode)")
        )
        console.say(
            "task broker "
            + ("Redis" if settings.REDIS_URL else f"files in {settings.LLMROTATE_BROKER_DIR}")
        )
        console.say("applying database migrations…")
        call_command("migrate", interactive=False, verbosity=0)
        if options["config"]:
            config_apply(options["config"], console=console)
        username, password = admin_ensure(data_dir=data_dir)
        block = self._block(
            url=_url(options["host"], options["port"]),
            username=username,
            password=password,
            password_file=data_dir / PASSWORD_FILE,
            children=list(children),
        )
        if options["setup_only"]:
            console.say("\n".join(block))
            return
        metrics_dir_reset(settings.LLMROTATE_METRICS_DIR)
        code = supervise(
            children,
            console=console,
            env=_child_env(verbose=verbose),
            verbose=verbose,
            ready=lambda: _accepts_connections(options["host"], options["port"]),
            on_ready=lambda: console.say("\n".join(block)),
            settle_on={"worker"} & children.keys(),  # it starts last ("celery@… ready.")
        )
        raise SystemExit(code)

    def _block(
        self,
        *,
        url: str,
        username: str,
        password: str | None,
        password_file: Path,
        children: list[str],
    ) -> list[str]:
        """What `make run` ends its start-up with: where everything is, how to log in and stop
        (`--setup-only`: the same, without children, as what `serve` would serve)."""
        rule = "─" * 64
        shown = _shown_path(password_file)
        manage = f"{_shown_path(Path(sys.executable))} manage.py"  # .venv/bin/python manage.py
        if password:
            login = [
                self.style.WARNING(f"{username} / {password}")
                + f"  (just created; also saved in {shown})"
            ]
        elif password_file.exists():
            login = [f"{username}, initial password in {shown}"]
        else:
            login = [username]
        if password_file.exists():
            login.append(f"change it: {manage} changepassword {username}, then delete that file")
        if children:
            heading = f"llmrotate is ready on {url}"
            names = " and ".join(filter(None, [", ".join(children[:-1]), children[-1]]))
            stop = [f"Ctrl-C stops {names}."]
        else:
            heading = f"llmrotate is set up; `{manage} serve` serves it on {url}"
            stop = []
        return [
            rule,
            self.style.SUCCESS(heading),
            f"  admin      {url}/admin/",
            f"  login      {login[0]}",
            *(f"             {line}" for line in login[1:]),
            f"  OpenAI     base URL {url}/v1",
            f"  Anthropic  base URL {url}",
            f"  dashboard  {url}/dashboard/",
            f"  API docs   {url}/api/docs",
            *stop,
            rule,
        ]

    def _children(self, options: dict[str, Any], *, verbose: bool) -> dict[str, list[str]]:
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
        # -q: no start-up banners (the worker's ASCII art and configuration, beat's settings).
        celery = [python, "-m", "celery", "-A", "llmrotate_site", *([] if verbose else ["-q"])]
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


def metrics_dir_reset(directory: Path) -> None:
    """Start the Prometheus counters of this gateway at zero. Only here, where every process
    that writes them starts: a worker uvicorn restarts must find its predecessors' files, or
    the sums would go backwards (common.metrics)."""
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)


def _reachable(host: str) -> str:
    """Where to reach a server listening on `host`: a wildcard address on the loopback one."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104


def _url(host: str, port: int) -> str:
    host = _reachable(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _accepts_connections(host: str, port: int) -> bool:
    """A plain TCP connect: uvicorn listens once the app's lifespan start-up is done, and a
    connection without a request leaves no line in its access log."""
    try:
        with socket.create_connection((_reachable(host), port), timeout=0.2):
            return True
    except OSError:
        return False


def _shown_path(path: Path) -> str:
    """Relative to the working directory when inside it (`var/initial-admin-password`)."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _child_env(*, verbose: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line reaches the pipe when written
    if not verbose:
        # Celery warns on every start as root (containers, CI) and offers no switch for it; a
        # warnings filter on that one message (a prefix match) leaves every other warning.
        env["PYTHONWARNINGS"] = ",".join(
            filter(None, [os.environ.get("PYTHONWARNINGS"), f"ignore:{ROOT_WARNING}"])
        )
    return env


def _die_with_parent() -> None:
    # Linux: if the supervisor is killed outright (SIGKILL), the kernel sends its children
    # SIGTERM rather than leaving a worker and a web server running without it. (The signal
    # follows the thread that started the child: supervise() starts them from the main one.)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pump(pipe: IO[bytes], name: str, console: Console, *, err: bool, verbose: bool) -> None:
    """Copy a child's pipe to the console line by line, until the child (and any process that
    inherited the pipe) has closed it. Always drained, so a child never blocks on a full pipe."""
    with pipe:
        for raw in iter(pipe.readline, b""):
            text = raw.decode(errors="replace").rstrip("\r\n")
            if verbose or text.strip():
                console.line(name, text, err=err)


def supervise(
    commands: dict[str, list[str]],
    *,
    console: Console,
    env: dict[str, str] | None = None,
    verbose: bool = False,
    ready: Callable[[], bool] | None = None,
    on_ready: Callable[[], None] | None = None,
    settle_on: Iterable[str] = (),
) -> int:
    """Run the commands as children until a signal or until one exits; then stop them all.

    Their output goes through `console`, prefixed with their names. Once `ready()` is true and
    their output has settled (the children in `settle_on` heard from, then a pause), or
    SETTLE_MAX_SECONDS after ready, `on_ready()` runs, once."""
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop_signal.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children: dict[str, subprocess.Popen[bytes]] = {}
    readers: dict[str, list[threading.Thread]] = {}
    for name, command in commands.items():
        # A session of their own: Ctrl-C reaches only this supervisor, which then stops each
        # child once, in order, instead of every process getting the terminal's signal at once.
        children[name] = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            command,
            cwd=settings.BASE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    console.say("started " + ", ".join(f"{n} (pid {p.pid})" for n, p in children.items()))
    # Then their output, which the pipes hold until now (a child's interpreter is still starting).
    for name, child in children.items():
        readers[name] = []
        for pipe, err in ((child.stdout, False), (child.stderr, True)):
            assert pipe is not None
            reader = threading.Thread(
                target=_pump,
                args=(pipe, name, console),
                kwargs={"err": err, "verbose": verbose},
                name=f"serve-{name}-{'stderr' if err else 'stdout'}",
                daemon=True,
            )
            reader.start()
            readers[name].append(reader)
    exit_code = 0
    ready_at: float | None = None
    announced = on_ready is None
    while not stop_signal:
        dead = [(n, p.returncode) for n, p in children.items() if p.poll() is not None]
        if dead:
            name, code = dead[0]
            _join(readers[name], timeout=1)  # its last words (a traceback) before this line
            console.say(f"{name} exited with status {code}; stopping the others")
            exit_code = code or 1
            break
        if not announced:
            now = time.monotonic()
            if ready_at is None:
                if ready is None or ready():
                    ready_at = now
            elif (
                console.heard.issuperset(settle_on)
                and now - console.last_child_line >= SETTLE_SECONDS
            ) or now - ready_at >= SETTLE_MAX_SECONDS:
                assert on_ready is not None
                on_ready()
                announced = True
        time.sleep(0.1)
    else:
        console.say(f"{signal.Signals(stop_signal[0]).name} received, stopping…")
    for child in children.values():
        if child.poll() is None:
            child.terminate()  # SIGTERM: graceful for uvicorn, warm shutdown for Celery
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.say(f"{name} did not stop in time; killing it")
            child.kill()
            child.wait()
    # Their last lines (shutdown messages) before ours. A grandchild that outlived its parent
    # could hold a pipe open: the readers are daemons, not waited for long.
    _join([reader for group in readers.values() for reader in group], timeout=5)
    console.say("stopped")
    return exit_code


def _join(threads: list[threading.Thread], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
