"""Start the fake upstream and the gateway as pinned subprocesses, and always stop them.

Every child is started in its own session (so a Ctrl-C in the terminal reaches only the
benchmark, which then stops the children in order) and with PR_SET_PDEATHSIG (so that even a
SIGKILL of the benchmark cannot leave a server behind). Children are stopped by PID: SIGTERM,
which lets the gateway flush its call-record buffer, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen import Pool, Samples, Target, percentile, run_count

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MANAGE = str(ROOT / "manage.py")
PR_SET_PDEATHSIG = 1
# `serve` itself gives its children 35 s to stop; a little more before we force it.
STOP_GRACE_SECONDS = 40.0
STARTUP_TIMEOUT_SECONDS = 60.0
ROUTE_MODEL = "gpt-4o-mini"
UPSTREAM_KEYS = ("sk-bench-key-000000000001", "sk-bench-key-000000000002")

CONFIG_TEMPLATE = """\
providers:
  fake: {{kind: openai, base_url: "{upstream}"}}
keys:
  - {{id: fake-1, provider: fake, secret: "literal://{key1}"}}
  - {{id: fake-2, provider: fake, secret: "literal://{key2}"}}
routes:
  {model}: {{strategy: health_aware, deployments: [{{provider: fake, model: {model}}}]}}
clients:
  - {{name: bench, routes: ["*"], scopes: [proxy]}}
"""


class ServerError(RuntimeError):
    """A server would not start, or failed under load: the run cannot produce numbers."""


def _child_setup(cpu: int | None) -> Callable[[], None]:
    """What runs in the child between fork and exec: pin it, and tie its life to ours."""

    def setup() -> None:
        if cpu is not None:
            # Set before exec: every thread the child ever starts inherits the mask.
            os.sched_setaffinity(0, {cpu})
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass  # not Linux: cleanup then relies on the finally blocks alone

    return setup


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ServerError(
                f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        # Noted before the signal: once the parent is gone its children are re-parented.
        below = descendants(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            for pid in below:  # what the stuck supervisor did not stop goes with it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@dataclass
class Stack:
    """The servers this run started (none when measuring already-running ones)."""

    data_dir: Path
    env: dict[str, str]
    keep_data: bool = False
    children: list[Child] = field(default_factory=list)
    upstream_url: str = ""
    gateway_url: str = ""
    token: str = ""
    upstream_pid: int | None = None
    gateway_pid: int | None = None  # the uvicorn web process that serves /v1
    # The uvicorn process and, with --workers > 1, the worker processes it spawned.
    web_pids: tuple[int, ...] = ()
    supervisor_pid: int | None = None  # `manage.py serve`, parent of web, worker and beat
    database_url: str = ""  # Postgres the gateway writes to (scale_out); empty: SQLite
    redis_url: str = ""
    redis_prefix: str = ""
    gateway_starts: int = 0

    @classmethod
    def create(cls, *, keep_data: bool) -> Stack:
        data_dir = Path(tempfile.mkdtemp(prefix="llmrotate-bench-"))
        env = dict(os.environ)
        # Measure the embedded default (SQLite, in-process key state) that a fresh clone runs;
        # an already-running scaled-out gateway can be measured with --gateway-url instead.
        for name in ("DATABASE_URL", "REDIS_URL"):
            env.pop(name, None)
        env["LLMROTATE_DATA_DIR"] = str(data_dir)
        env["PYTHONUNBUFFERED"] = "1"
        return cls(data_dir=data_dir, env=env, keep_data=keep_data)

    def scale_out(self, database_url: str, redis_url: str) -> None:
        """Run the gateway scaled out: a fresh Postgres database and a Redis prefix of its own.

        The database is dropped and created again, so the call-record count at the end is this
        run's alone; `configure_gateway` migrates it. Keys and the Celery queue go under a
        prefix of the run's own, deleted at the end (`close`), as is the database unless
        ``keep_data``.
        """
        import psycopg

        base, _, name = database_url.rstrip("/").rpartition("/")
        if not base.startswith(("postgres://", "postgresql://")) or not name:
            raise ServerError(f"--database-url must be postgres://…/DBNAME, not {database_url}")
        try:
            with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            raise ServerError(f"cannot create database {name}: {exc}") from None
        self.database_url = database_url
        self.redis_url = redis_url
        self.redis_prefix = f"bench-proxy-{os.getpid()}:"
        self.env.update(
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            LLMROTATE_REDIS_PREFIX=self.redis_prefix,
            LLMROTATE_CELERY_QUEUE=f"{self.redis_prefix}celery",
        )

    def spawn(self, name: str, argv: list[str], *, cpu: int | None) -> Child:
        log_path = self.data_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # preexec_fn is unsafe with threads; the benchmark has none when it spawns.
                preexec_fn=_child_setup(cpu),
            )
        child = Child(name=name, proc=proc, log_path=log_path)
        self.children.append(child)
        return child

    def start_upstream(self, *, cpu: int | None) -> None:
        # Port 0: the fake binds a free port itself and prints it, so there is no race.
        child = self.spawn(
            "fake-upstream",
            [PYTHON, "-m", "fake_upstream", "--host", "127.0.0.1", "--port", "0"],
            cpu=cpu,
        )
        pattern = re.compile(r"listening on (http://\S+)")
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            child.check_alive()
            match = pattern.search(child.log_path.read_text(errors="replace"))
            if match:
                self.upstream_url, self.upstream_pid = match.group(1), child.pid
                return
            time.sleep(0.05)
        raise ServerError(f"fake upstream did not start:\n{child.log_tail()}")

    def _manage(self, *args: str) -> str:
        try:
            done = subprocess.run(
                [PYTHON, MANAGE, *args],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=STARTUP_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:  # run() has killed it already
            # Always bytes, whatever text= says (subprocess docs).
            output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
            raise ServerError(
                f"manage.py {args[0]} took over {STARTUP_TIMEOUT_SECONDS:g} s:\n{output}"
            ) from None
        if done.returncode != 0:
            raise ServerError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def configure_gateway(
        self,
        upstream_url: str,
        *,
        template: str = CONFIG_TEMPLATE,
        extra: str = "",
        clients: tuple[str, ...] = ("bench",),
    ) -> dict[str, str]:
        """Migrate, then import providers/keys/route/client before serve starts; each client's
        token (the `bench` one is also `self.token`).

        Importing first means the gateway's 5 s config cache starts out right; importing into
        a running gateway would need a wait for the cache to expire. ``template`` is formatted
        with upstream, key1, key2 and model, and must define the client `bench`; ``extra`` is
        appended as it is (more clients, limits, capture rules), and ``clients`` names every
        client whose token is wanted.
        """
        config = self.data_dir / "bench-config.yaml"
        config.write_text(
            template.format(
                upstream=upstream_url,
                key1=UPSTREAM_KEYS[0],
                key2=UPSTREAM_KEYS[1],
                model=ROUTE_MODEL,
            )
            + extra
        )
        # One interpreter for both steps: each Django start costs a second or more, and the
        # smoke run (--quick) has a time budget. `serve` later creates the admin user itself.
        out = self._manage(
            "shell",
            "-c",
            "from django.core.management import call_command; "
            "call_command('migrate', interactive=False, verbosity=0); "
            f"call_command('import_config', {str(config)!r})",
        )
        tokens = {}
        for client in clients:
            match = re.search(rf"^\s*{re.escape(client)}: (\S+)$", out, re.MULTILINE)
            if not match:
                raise ServerError(f"no token for client {client} in import_config output:\n{out}")
            tokens[client] = match.group(1)
        self.token = tokens["bench"]
        return tokens

    def start_gateway(self, *, cpu: int | None, extra_args: list[str], workers: int = 1) -> None:
        """`manage.py serve` as a user runs it: a supervisor with web, Celery worker and beat.

        Once it serves, the whole tree is pinned to the gateway core. The worker and beat idle
        at well under 1% of a core, and their CPU use is reported apart from the web process.
        Pinning only then lets the four interpreters start up on both cores, which halves the
        start-up time the smoke run (--quick) pays. ``workers`` > 1 is passed to `serve`;
        the start then also waits for uvicorn's worker processes. A gateway started again
        after `stop_gateway` (another worker count) logs to a file of its own.
        """
        port = free_port()
        self.gateway_starts += 1
        child = self.spawn(
            "gateway" if self.gateway_starts == 1 else f"gateway-{self.gateway_starts}",
            [
                PYTHON,
                MANAGE,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                *(["--workers", str(workers)] if workers != 1 else []),
                *extra_args,
            ],
            cpu=None,
        )
        # uvicorn listens only after the ASGI lifespan startup, so a connect means ready.
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            child.check_alive()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            self.gateway_url = f"http://127.0.0.1:{port}/v1"
            self.supervisor_pid = child.pid
            self.gateway_pid = self._web_pid(child.pid)
            self.web_pids = self._web_pids(child, workers, deadline)
            if cpu is not None:
                pin_tree(child.pid, cpu)
            return
        raise ServerError(f"gateway did not start:\n{child.log_tail()}")

    @staticmethod
    def _web_pid(supervisor: int) -> int:
        """The process serving HTTP: uvicorn under the `serve` supervisor, or serve itself."""
        for pid in descendants(supervisor):
            with contextlib.suppress(OSError):
                if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return supervisor

    def _web_pids(self, child: Child, workers: int, deadline: float) -> tuple[int, ...]:
        """uvicorn and its worker processes: with several, uvicorn's own process listens
        before the workers it spawns are up, so wait for them."""
        assert self.gateway_pid is not None
        while True:
            below = descendants(self.gateway_pid)
            # multiprocessing also starts a resource tracker; the workers run spawn_main.
            started = sum(1 for pid in below if b"spawn_main" in _cmdline(pid))
            if workers <= 1 or started >= workers:
                return (self.gateway_pid, *below)
            if time.monotonic() > deadline:
                raise ServerError(f"gateway started {started} of {workers} web workers")
            child.check_alive()
            time.sleep(0.05)

    def helper_pids(self) -> tuple[int, ...]:
        """The gateway's processes other than the web ones (supervisor, Celery worker, beat)."""
        if self.supervisor_pid is None:
            return ()
        tree = (self.supervisor_pid, *descendants(self.supervisor_pid))
        return tuple(pid for pid in tree if pid not in self.web_pids)

    def stop_gateway(self) -> None:
        """Stop the gateway first (flushing its records) so they can be counted."""
        for child in self.children:
            if child.pid == self.supervisor_pid:
                child.stop()

    @property
    def database_label(self) -> str:
        return "Postgres" if self.database_url else "SQLite"

    def records_written(self) -> int | None:
        """Call records the gateway wrote (SQLite or Postgres): proof the recording path was
        exercised."""
        if self.database_url:
            import psycopg

            with psycopg.connect(self.database_url) as conn:
                row = conn.execute("SELECT COUNT(*) FROM usage_callrecord").fetchone()
            return int(row[0]) if row else None
        import sqlite3

        path = self.data_dir / "llmrotate.sqlite3"
        if not path.exists():
            return None
        with sqlite3.connect(path) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM usage_callrecord").fetchone()
        return int(count)

    def close(self) -> None:
        # Reverse order: the gateway goes before the upstream it is still talking to.
        for child in reversed(self.children):
            child.stop()
        if self.redis_prefix:
            redis_cleanup(self.redis_url, self.redis_prefix)
        if self.database_url and not self.keep_data:
            drop_database(self.database_url)
        if not self.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def redis_cleanup(url: str, prefix: str) -> None:
    """Delete what a run left in Redis: only keys under its own prefix (and its queue's
    binding, which kombu names after the queue)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        keys += list(client.scan_iter(match=f"_kombu.binding.{prefix}*", count=500))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    except redis.RedisError as exc:
        print(f"warning: could not clean up Redis keys {prefix}*: {exc}", file=sys.stderr)
    finally:
        client.close()


def drop_database(url: str) -> None:
    import psycopg

    base, _, name = url.rstrip("/").rpartition("/")
    try:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error as exc:
        print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (VmRSS in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # always kB
    except OSError:
        pass
    return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_tree(root: int, cpu: int) -> None:
    """Pin every thread of ``root`` and of all its descendants to ``cpu``.

    sched_setaffinity acts on one thread; threads and processes created afterwards inherit
    the mask of the thread that creates them, so pinning every existing one covers the
    rest. Twice, for a thread started by a not-yet-pinned one during the first pass.
    """
    for _ in range(2):
        for pid in (root, *descendants(root)):
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(tid), {cpu})


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a whole process (all threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after its ')' are positional.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU time all cores spent on anything but idle/iowait since boot, from /proc/stat.

    Minus the CPU time of our own processes, this is what *other* programs used: a busy
    neighbour (a test suite, a build) on a 2-core machine skews every number, so the report
    says how busy the machine was instead of leaving the reader to guess.
    """
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# Named groups of our processes whose CPU use is reported ("gateway", "upstream", ...).
Pids = dict[str, tuple[int, ...]]
Snapshot = dict[str, float | None]


class CpuMeter:
    """CPU seconds used by named groups of our processes, and by the whole machine.

    ``owns_all`` says the groups include every server under test, so that "machine minus
    ours" really is other programs (not a gateway someone else started).
    """

    def __init__(self, groups: Pids, *, owns_all: bool) -> None:
        self.groups = groups
        self.owns_all = owns_all

    def group_seconds(self, name: str) -> float | None:
        pids = self.groups.get(name, ())
        times = [cpu_seconds(pid) for pid in pids]
        return None if not pids or None in times else sum(t for t in times if t is not None)

    def snapshot(self) -> Snapshot:
        snap: Snapshot = {name: self.group_seconds(name) for name in self.groups}
        snap["machine"] = machine_busy_seconds()
        return snap

    def percent(self, start: Snapshot, end: Snapshot, seconds: float) -> dict[str, float | None]:
        """Each group's CPU use between two snapshots, in % of one core."""
        return {name: _rate(start.get(name), end.get(name), seconds) for name in self.groups}

    def other_percent(self, start: Snapshot, end: Snapshot, seconds: float) -> float | None:
        """What everything else on the machine used (incl. hypervisor steal), % of one core."""
        if not self.owns_all:
            return None
        machine = _rate(start.get("machine"), end.get("machine"), seconds)
        ours = [_rate(start.get(name), end.get(name), seconds) for name in self.groups]
        if machine is None or None in ours:
            return None
        return max(0.0, machine - sum(p for p in ours if p is not None))


def _rate(start: float | None, end: float | None, seconds: float) -> float | None:
    if start is None or end is None or seconds <= 0:
        return None
    return (end - start) / seconds * 100


async def rotate_targets(
    pools: dict[str, Pool], total: int, pids: dict[str, int], *, stream: bool = False
) -> dict[str, dict[str, Any]]:
    """`total` requests per target in rotating blocks (one target loaded at a time, the order
    turned around every other block), with the CPU seconds of each target's gateway web
    process (`pids`) over its own blocks. Per target: n, p50, p99 (ms), rps,
    cpu_ms_per_request (targets in `pids`), and added_p50 / added_p99 over the `direct` one.
    `stream`: every call streams, and its latency is that of the whole stream."""
    names = list(pools)
    samples = {name: Samples() for name in names}
    cpu = dict.fromkeys(names, 0.0)
    size = max(pools[names[0]].size * 8, 50)
    blocks = max(2, total // size)
    for i in range(blocks):
        for name in names if i % 2 == 0 else names[::-1]:
            # Discarded: the server closes a connection idle past its keep-alive timeout
            # (uvicorn: 5 s) while the other targets take their turn; a request that finds it
            # closed fails and reconnects, so the measured block starts on live connections.
            await run_count(pools[name], 2 * pools[name].size, stream=stream)
            before = cpu_seconds(pids[name]) if name in pids else None
            samples[name].extend(await run_count(pools[name], total // blocks, stream=stream))
            after = cpu_seconds(pids[name]) if name in pids else None
            if before is not None and after is not None:
                cpu[name] += after - before
    out: dict[str, dict[str, Any]] = {}
    for name, s in samples.items():
        if s.error_count:
            raise ServerError(f"{name}: {s.error_count} failed request(s), e.g. {s.errors}")
        ms = sorted(v * 1000 for v in s.latencies)
        out[name] = {
            "n": len(ms),
            "p50": percentile(ms, 0.50),
            "p99": percentile(ms, 0.99),
            "rps": s.count / s.elapsed if s.elapsed else 0.0,
        }
        if name in pids and s.count:
            out[name]["cpu_ms_per_request"] = cpu[name] * 1000 / s.count
    for name in names:
        if name != "direct":
            for q in ("p50", "p99"):
                out[name][f"added_{q}"] = out[name][q] - out["direct"][q]
    return out


# Kind of call -> whether it streams: the campaigns that compare gateways measure both.
KINDS = {"json": False, "stream": True}


async def measure_kinds(
    targets: dict[str, Target],
    pids: dict[str, int],
    requests: int,
    levels: tuple[int, ...],
    *,
    overhead: Callable[[dict[str, dict[str, Any]]], dict[str, float]],
    describe: Callable[[str, dict[str, Any]], str],
    warmup: int = 50,
) -> list[dict[str, Any]]:
    """Per concurrency level and kind of call (KINDS): `rotate_targets` over every target,
    with `overhead(out)`'s figures beside them; one progress line per level, `describe`
    saying what a kind's figures are."""
    results = []
    for concurrency in levels:
        pools = {name: Pool(t, concurrency, "raw") for name, t in targets.items()}
        for pool in pools.values():
            await pool.open()
        level: dict[str, Any] = {"concurrency": concurrency}
        try:
            for kind, stream in KINDS.items():
                for pool in pools.values():  # warm: caches, upstream pools, lazy imports
                    await run_count(pool, max(warmup, 4 * concurrency), stream=stream)
                out = await rotate_targets(
                    pools, max(requests, concurrency * 16), pids, stream=stream
                )
                level[kind] = {**out, **overhead(out)}
        finally:
            for pool in pools.values():
                await pool.aclose()
        results.append(level)
        print(
            f"  concurrency {concurrency:>2}: "
            + "; ".join(describe(kind, level[kind]) for kind in KINDS),
            flush=True,
        )
    return results
