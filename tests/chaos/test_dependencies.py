"""The fault campaign on the gateway's own dependencies: Postgres, Redis, SQLite, the web
process itself (SIGKILL, SIGTERM) and the Celery worker and beat (docs/reliability.md).

Each scenario runs real processes on 127.0.0.1: `manage.py serve`, a Postgres cluster and a
redis-server of its own (stopping the shared ones would stop every other test), and the fake
upstream, with steady traffic from the official SDKs throughout. The outage lengths are the
issue's; LLMROTATE_CHAOS_OUTAGE_SECONDS shortens the Postgres one for a quick local run.

They bring their own databases, so they run in either leg's environment: `make test` runs
tests/chaos as a job of its own beside the two legs (`make test-chaos`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.chaos.harness import (
    ANTHROPIC_SECRETS,
    OPENAI_SECRETS,
    Gateway,
    OwnPostgres,
    OwnRedis,
    Traffic,
    assert_clean_outcomes,
    assert_keys_idle_and_healthy,
    attempts,
    embedded_env,
    fake_upstream,
    manage,
    records_in_postgres,
    records_in_sqlite,
    scaled_env,
    spool_files,
)
from tests.e2e.conftest import wait_for

TEMPLATE = "chaos_template"
POSTGRES_OUTAGE_SECONDS = float(os.environ.get("LLMROTATE_CHAOS_OUTAGE_SECONDS", "30"))
# How long a call may take while Redis is away or silent: one Redis timeout per process, then
# the per-process fallback for a while (common/redis_clients.py), so a couple of seconds.
REDIS_STALL_BOUND_SECONDS = 3.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[OwnPostgres]:
    if not Path("/usr/lib/postgresql/15/bin/initdb").exists():
        pytest.skip("needs Debian's postgresql-15 server binaries (CI has them)")
    # Not under pytest's temporary folder: that is private to this user, and the server runs
    # as `postgres` when the tests run as root.
    root = Path(tempfile.mkdtemp(prefix="llmrotate-chaos-pg-"))
    root.chmod(0o755)
    server = OwnPostgres(root / "cluster")
    try:
        # Migrated once; each scenario's database is a copy (CREATE DATABASE … TEMPLATE).
        server.execute("postgres", f'CREATE DATABASE "{TEMPLATE}"')
        manage(scaled_env(root, database_url=server.url(TEMPLATE), redis_url=""), "migrate")
        yield server
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[OwnRedis]:
    server = OwnRedis()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def _gateway(root: Path, env: dict[str, str]) -> Iterator[Gateway]:
    """A gateway on a migrated copy of a database, configured, closed afterwards."""
    with fake_upstream() as upstream:
        gateway = Gateway(env=env, root=root, upstream=upstream)
        gateway.set_up(migrate=False)
        try:
            yield gateway
        finally:
            gateway.close()


@pytest.fixture
def scaled_gateway(
    postgres: OwnPostgres, redis_server: OwnRedis, tmp_path: Path
) -> Iterator[Gateway]:
    database = f"gw_{tmp_path.name.lower().replace('-', '_')}"[:60]
    postgres.execute("postgres", f'CREATE DATABASE "{database}" TEMPLATE "{TEMPLATE}"')
    env = scaled_env(
        tmp_path,
        database_url=postgres.url(database),
        redis_url=redis_server.url,
        LLMROTATE_CHAOS_DATABASE=database,
        LLMROTATE_RECORD_SPOOL_AFTER_SECONDS="2",
    )
    with _gateway(tmp_path, env) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database that each embedded scenario starts from a copy of."""
    root = tmp_path_factory.mktemp("sqlite-template")
    manage(embedded_env(root), "migrate")
    return root / "data" / "llmrotate.sqlite3"


@pytest.fixture
def embedded_gateway(tmp_path: Path, sqlite_template: Path) -> Iterator[Gateway]:
    (tmp_path / "data").mkdir()
    shutil.copy(sqlite_template, tmp_path / "data" / sqlite_template.name)
    env = embedded_env(tmp_path, LLMROTATE_RECORD_SPOOL_AFTER_SECONDS="2")
    with _gateway(tmp_path, env) as gateway:
        yield gateway


def _pg_records(gateway: Gateway, postgres: OwnPostgres) -> int:
    return records_in_postgres(postgres, gateway.env["LLMROTATE_CHAOS_DATABASE"])


def _all_recorded(count: Callable[[], int], gateway: Gateway, *, timeout: float = 60) -> int:
    """Wait until the gateway's records match the attempts the upstream saw; the count."""
    seen = attempts(gateway.upstream)

    def matched() -> bool:
        try:
            return count() == seen
        except Exception:  # the database may still be coming back
            return False

    try:
        wait_for(matched, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"{count()} records for {seen} upstream attempts") from None
    return seen


# --- Postgres -----------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_postgres_stopped_under_traffic_loses_and_duplicates_no_record(
    scaled_gateway: Gateway, postgres: OwnPostgres
) -> None:
    gateway = scaled_gateway
    gateway.start("--no-worker", "--no-beat")
    with Traffic(gateway) as traffic:
        traffic.wait_calls(20)
        postgres.stop()
        down_at, before_outage = time.monotonic(), traffic.outcomes.total
        # Proxying needs no database: calls go on while it is away, and what they record goes
        # to the spool once the outage has lasted (LLMROTATE_RECORD_SPOOL_AFTER_SECONDS).
        traffic.wait_calls(20)
        wait_for(lambda: spool_files(gateway.root), timeout=20, message="nothing spooled")
        wait_for(
            lambda: time.monotonic() - down_at >= POSTGRES_OUTAGE_SECONDS,
            timeout=POSTGRES_OUTAGE_SECONDS + 5,
        )
        during = traffic.outcomes.total
        postgres.start()
        traffic.wait_calls(20)
        outcomes = traffic.stop()
    assert_clean_outcomes(outcomes)
    assert outcomes.total > during  # traffic went on after the database came back
    seen = _all_recorded(lambda: _pg_records(gateway, postgres), gateway)
    assert not spool_files(gateway.root)  # replayed, each file once
    duplicates = postgres.execute(
        gateway.env["LLMROTATE_CHAOS_DATABASE"],
        "SELECT count(*) FROM (SELECT request_id, attempt FROM usage_callrecord"
        " GROUP BY request_id, attempt HAVING count(*) > 1) d",
    )
    assert duplicates[0] == 0
    assert seen == outcomes.total  # one attempt per call: no upstream fault here
    _report(
        "postgres",
        outage_s=POSTGRES_OUTAGE_SECONDS,
        calls=outcomes.total,
        during_outage=during - before_outage,
        records=seen,
        lost=attempts(gateway.upstream) - seen,
        slowest_s=round(outcomes.slowest, 2),
    )
    assert_keys_idle_and_healthy(gateway)


# --- Redis --------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_redis_away_or_silent_costs_a_bounded_delay_and_key_state_reconverges(
    scaled_gateway: Gateway, redis_server: OwnRedis, postgres: OwnPostgres
) -> None:
    """Redis stopped, then back; then Redis that accepts connections and answers nothing for
    8 s (`DEBUG SLEEP`). Calls go on throughout, none slower than one Redis timeout plus a
    margin; key state falls back to the process's own and is shared again afterwards."""
    gateway = scaled_gateway
    gateway.start("--no-worker", "--no-beat")
    with Traffic(gateway) as traffic:
        traffic.wait_calls(20)
        redis_server.stop()
        traffic.wait_calls(40)
        # While Redis is away, key state is this process's own: a 429 still cools the key.
        _cool_down(gateway, "oa-1")
        redis_server.start()
        traffic.wait_calls(40)
        # Reconverged: the process reads the shared state again, where oa-1 was never cooled
        # (what a process learned alone during the outage stays its own).
        wait_for(
            lambda: _health(gateway, "oa-1") == "active",
            timeout=30,
            message="the gateway never read key state from Redis again",
        )
        # And a cooldown is shared state again: written to Redis, read back by the API.
        _cool_down(gateway, "an-1")
        sleeper = redis_server.sleep_in_background(8)
        traffic.wait_calls(20, timeout=60)
        stalled_calls = sleeper.is_alive()  # the calls above ended while Redis was silent
        sleeper.join(20)
        assert sleeper.slept is not None and sleeper.slept >= 7.5, sleeper.error
        assert stalled_calls, "Redis answered again before 20 calls had ended"
        traffic.wait_calls(20)
        outcomes = traffic.stop()
    assert_clean_outcomes(outcomes)
    _report("redis", slowest_s=round(outcomes.slowest, 2), calls=outcomes.total)
    assert outcomes.slowest < REDIS_STALL_BOUND_SECONDS, outcomes.slowest
    _all_recorded(lambda: _pg_records(gateway, postgres), gateway)
    prefix = gateway.env["LLMROTATE_REDIS_PREFIX"]
    stored = redis.Redis(port=redis_server.port, decode_responses=True).hgetall(f"{prefix}key:an-1")
    assert stored.get("status") == "cooldown", stored


def _health(gateway: Gateway, key_id: str) -> str:
    return str(next(k["health"] for k in gateway.key_states() if k["key_id"] == key_id))


def _cool_down(gateway: Gateway, key_id: str) -> None:
    """A 429 with Retry-After from the upstream on `key_id`: the gateway cools the key."""
    secret = {**OPENAI_SECRETS, **ANTHROPIC_SECRETS}[key_id]
    gateway.upstream.script({"keys": {secret: {"queue": [{"fault": "429", "retry_after": 30}]}}})
    wait_for(
        lambda: _health(gateway, key_id) == "cooldown",
        timeout=30,
        message=f"{key_id} was not cooled down",
    )


# --- the web process ----------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_killed_web_process_loses_at_most_its_last_flush_interval(
    scaled_gateway: Gateway, postgres: OwnPostgres
) -> None:
    """SIGKILL takes what the recorder held in memory: the records of calls that ended since
    its last pass (LLMROTATE_RECORD_FLUSH_SECONDS, 0.5 s here) and the calls in flight. The
    bound is measured here and stated in docs/reliability.md."""
    gateway = scaled_gateway
    gateway.start("--no-worker", "--no-beat")
    flush_seconds = float(gateway.env["LLMROTATE_RECORD_FLUSH_SECONDS"])
    with Traffic(gateway) as traffic:
        traffic.wait_calls(50)
        started = time.monotonic()
        before = traffic.outcomes.total
        traffic.wait_calls(100)
        rate = (traffic.outcomes.total - before) / (time.monotonic() - started)
        os.kill(gateway.web_pid(), signal.SIGKILL)
        # serve stops what is left and exits; a supervisor (compose, systemd) starts it again.
        assert gateway.process is not None
        wait_for(lambda: gateway.process.proc.poll() is not None, timeout=60)  # type: ignore[union-attr]
        gateway.start("--no-worker", "--no-beat")
        traffic.wait_calls(50)
        outcomes = traffic.stop()
    assert_clean_outcomes(outcomes, allowed={"unreachable", "cut"})
    seen = attempts(gateway.upstream)
    # The new process has written all it holds once its queue is empty and a pass went by.
    wait_for(lambda: _recorder_idle(gateway), timeout=30, message="the recorder never idled")
    lost = seen - _pg_records(gateway, postgres)
    bound = 4 + rate * (flush_seconds + 0.5)  # in flight (4 threads) + one pass and its write
    _report("sigkill", lost=lost, bound=round(bound, 1), rate=round(rate, 1))
    assert 0 <= lost <= bound, (lost, bound)
    assert_keys_idle_and_healthy(gateway)


def _recorder_idle(gateway: Gateway) -> bool:
    from tests.e2e.conftest import metric_sum

    token = gateway.tokens["chaos-monitor"]
    return metric_sum(gateway.url, token, "llmrotate_recorder_queue_depth") == 0


@pytest.mark.timeout(180)
def test_a_graceful_stop_finishes_the_streams_in_flight_and_flushes_every_record(
    embedded_gateway: Gateway,
) -> None:
    gateway = embedded_gateway
    # Streams that take a while (16 tokens, 60 ms apart): several are in flight at the stop.
    gateway.upstream.script({"default": {"token_delay_ms": 60}})
    gateway.start("--no-worker", "--no-beat")
    with Traffic(gateway, threads=6) as traffic:
        traffic.wait_calls(12)
        # The stop comes in the middle of streams, not between calls.
        wait_for(lambda: traffic.in_flight(longer_than=0.2) >= 2, timeout=30, message="no streams")
        stopped_at = time.monotonic()
        code = gateway.stop(signal.SIGTERM)
        outcomes = traffic.stop()
    assert code == 0, gateway.output()[-3000:]
    # Refused after the stop began ("unreachable"), never cut in the middle.
    assert_clean_outcomes(outcomes, allowed={"unreachable"})
    # The calls in flight when the signal came all ended well.
    in_flight = outcomes.across(stopped_at)
    assert in_flight and set(in_flight) == {"ok"}, in_flight
    # The stop flushed: the records are in the database with no process left running.
    assert records_in_sqlite(gateway.root) == attempts(gateway.upstream)
    assert not spool_files(gateway.root)


# --- SQLite -------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_locked_sqlite_database_loses_no_record(embedded_gateway: Gateway) -> None:
    """Another process holds the write lock past the busy timeout (10 s): calls go on, the
    records wait in memory, then in the spool, and reach the table once the lock is gone."""
    gateway = embedded_gateway
    gateway.start("--no-worker", "--no-beat")
    release = threading.Event()
    locked = threading.Event()

    def hold_lock() -> None:
        conn = sqlite3.connect(gateway.root / "data" / "llmrotate.sqlite3", timeout=30)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(60)
            conn.rollback()
        finally:
            conn.close()

    holder = threading.Thread(target=hold_lock, daemon=True)
    with Traffic(gateway) as traffic:
        traffic.wait_calls(20)
        holder.start()
        assert locked.wait(30)
        traffic.wait_calls(20)
        wait_for(lambda: spool_files(gateway.root), timeout=40, message="nothing spooled")
        release.set()
        holder.join(30)
        traffic.wait_calls(20)
        outcomes = traffic.stop()
    assert_clean_outcomes(outcomes)
    _all_recorded(lambda: records_in_sqlite(gateway.root), gateway)
    assert not spool_files(gateway.root)
    assert_keys_idle_and_healthy(gateway)


# --- the Celery worker and beat -----------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_killed_worker_shows_in_healthz_and_its_restart_brings_no_storm(
    embedded_gateway: Gateway,
) -> None:
    """Probes stop when the worker is gone; /healthz says `degraded` (200: routing goes on from
    the last known health). Beat goes on queueing a probe dispatch every tick meanwhile; the
    worker started again drops those that waited past their interval instead of running them
    all at once."""
    gateway = embedded_gateway
    gateway.env.update(
        LLMROTATE_PROBE_TICK_SECONDS="1",
        LLMROTATE_PING_INTERVAL_SECONDS="1",
        LLMROTATE_HTTP_PROBES="false",
        LOG_LEVEL="INFO",  # beat's and the worker's lines about each task are what is counted
        LLMROTATE_TASK_LOG_LEVEL="INFO",
    )
    gateway.start()  # web, worker and beat
    wait_for(
        lambda: gateway.healthz().json()["checks"].get("probes") == "ok",
        timeout=60,
        message="the probes never ran",
    )
    assert gateway.process is not None
    os.kill(_celery_pid(gateway.process.proc.pid, "worker"), signal.SIGKILL)
    # serve stops its other children and exits when one dies; a supervisor starts it again,
    # here without the worker, as if it would not come back.
    wait_for(lambda: gateway.process.proc.poll() is not None, timeout=60)  # type: ignore[union-attr]
    gateway.start("--no-worker")
    with Traffic(gateway, threads=2) as traffic:
        body = wait_for(
            lambda: (b := gateway.healthz().json())["status"] == "degraded" and b,
            timeout=30,
            message="/healthz never said the probes stopped",
        )
        traffic.wait_calls(10)
        beat_log = gateway.root / f"serve-{gateway.starts}.log"
        wait_for(lambda: _dispatches(beat_log, "Sending due task") >= 15, timeout=60)
        outcomes = traffic.stop()
    assert body["degraded"] == ["probes"] and body["checks"]["probes"].startswith("stale")
    assert gateway.healthz().status_code == 200
    assert_clean_outcomes(outcomes)  # routing works from the last known state
    gateway.stop()
    queued = _dispatches(beat_log, "Sending due task")
    gateway.start()  # the worker is back, with `queued` dispatches waiting in the broker
    started = time.monotonic()
    wait_for(lambda: gateway.healthz().json()["status"] == "ok", timeout=60)
    log = gateway.root / f"serve-{gateway.starts}.log"
    wait_for(lambda: _dispatches(log, "Discarding revoked task") >= queued - 2, timeout=30)
    ran = _dispatches(log, "succeeded")
    # A run per tick since the start, and none of the backlog: it expired in the broker.
    assert ran <= time.monotonic() - started + 3 < queued, (ran, queued)
    _report("worker restart", queued=queued, discarded=_dispatches(log, "Discarding"), ran=ran)


def _celery_pid(serve_pid: int, role: str) -> int:
    from tests.chaos.harness import _child_pids

    return _child_pids(serve_pid, f"celery -A llmrotate_site -q {role}")[0]


def _dispatches(log: Path, what: str) -> int:
    """Lines of the probe dispatch task with `what` in the log of a `serve` run."""
    return sum(
        1 for line in log.read_text(errors="replace").splitlines()
        if "probes_dispatch" in line and what in line
    )  # fmt: skip


def _report(scenario: str, **figures: object) -> None:
    """The figures docs/reliability.md quotes, in the test output (-rA or -s shows them)."""
    print(f"chaos {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
