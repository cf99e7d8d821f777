"""LLMROTATE_LOG_FORMAT=json: one JSON object per line (timestamp, level, logger, message, the
request id and trace ids when there are some, the exception), secrets masked in it as in text;
the `llmrotate.usage` line unchanged, plus the trace ids when tracing is on; and `manage.py
serve` printing nothing but JSON objects, its children's lines among them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import pytest

from common import logcontext
from common.logcontext import request_id_bind, request_id_bound, request_id_reset
from common.redaction import mask_secret
from llmrotate_site.logging import JsonFormatter, RedactSecretsFilter
from tests.conftest import free_port
from tests.e2e.conftest import (  # noqa: F401 - fixtures of the proxied request's test
    REPO,
    RawCapture,
    ServeProcess,
    _fake_upstream_server,
    env_without,
    fake_upstream,
    live_gateway,
)
from tests.llmrotate_site.test_serve_output import wait_until
from tests.usage.conftest import make_call
from usage.calls import PERSISTED_FIELDS, CallData, call_prepare
from usage.spool import row_to_json

KEY = "sk-proj-jsonlogs0123456789abcdefWXYZ"  # shaped like a provider key
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TRACE = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")


class JsonLines:
    """A logger of its own whose one handler writes JSON, through the redacting filter, as the
    console handler does with LLMROTATE_LOG_FORMAT=json."""

    def __init__(self, name: str) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())
        self.handler.addFilter(RedactSecretsFilter())
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False

    def text(self) -> str:
        return self.stream.getvalue()

    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines()]

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate = True
        self.logger.setLevel(logging.NOTSET)


@pytest.fixture
def json_lines(request: pytest.FixtureRequest) -> Iterator[JsonLines]:
    lines = JsonLines(f"llmrotate.test.{request.node.name}")
    yield lines
    lines.close()


@pytest.fixture
def no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logcontext, "trace_ids", lambda: None)


# --- the formatter ------------------------------------------------------------------------


def test_a_line_is_one_object_with_timestamp_level_logger_and_message(json_lines, no_tracing):
    json_lines.logger.warning("two\nlines about %s", "this")

    text = json_lines.text()
    assert text.count("\n") == 1 and text.endswith("\n")  # the newline in the message escaped
    (line,) = json_lines.objects()
    assert set(line) == {"timestamp", "level", "logger", "message"}
    assert TIMESTAMP.match(line["timestamp"]), line
    assert line["level"] == "WARNING"
    assert line["logger"] == json_lines.logger.name
    assert line["message"] == "two\nlines about this"


def test_a_key_is_masked_in_the_message_whatever_carries_it(json_lines, no_tracing):
    json_lines.logger.info("in the format string %s", KEY)
    json_lines.logger.info("as an argument: %s", KEY)
    json_lines.logger.info("in a mapping: %(key)s", {"key": KEY})
    json_lines.logger.info(f"in the format string itself {KEY}")

    assert KEY not in json_lines.text()
    for line in json_lines.objects():
        assert mask_secret(KEY) in line["message"], line


def test_an_exception_has_a_field_of_its_own_masked_too(json_lines, no_tracing):
    try:
        raise ValueError(f"upstream refused {KEY}")
    except ValueError:
        json_lines.logger.exception("call failed")

    assert KEY not in json_lines.text()
    (line,) = json_lines.objects()
    assert line["message"] == "call failed"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert f"ValueError: upstream refused {mask_secret(KEY)}" in line["exception"]


def test_text_lines_keep_the_exception_after_the_message_masked(no_tracing):
    """The filter now leaves the masked exception in exc_text: the text line must read as it
    did when it was folded into the message."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecretsFilter())
    logger = logging.getLogger("llmrotate.test.text_exception")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError(f"upstream refused {KEY}")
        except ValueError:
            logger.exception("call failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = stream.getvalue()
    assert text.startswith("ERROR llmrotate.test.text_exception: call failed\nTraceback (most")
    assert f"ValueError: upstream refused {mask_secret(KEY)}\n" in text
    assert KEY not in text


def test_the_request_id_is_on_lines_logged_while_it_is_bound(json_lines, no_tracing):
    json_lines.logger.info("before")
    with request_id_bound("req-42"):
        json_lines.logger.info("during")
    json_lines.logger.info("after")

    before, during, after = json_lines.objects()
    assert "request_id" not in before and "request_id" not in after
    assert during["request_id"] == "req-42"


def test_the_request_id_follows_asyncio_tasks_but_not_other_threads(json_lines, no_tracing):
    async def request() -> None:
        request_id_bind("req-task")  # as the proxy's views do, without a reset

        async def engine() -> None:
            json_lines.logger.info("from a task the request started")

        await asyncio.create_task(engine())
        thread = threading.Thread(target=json_lines.logger.info, args=("from a thread",))
        thread.start()
        thread.join()

    asyncio.run(request())
    json_lines.logger.info("after the request")

    in_task, in_thread, after = json_lines.objects()
    assert in_task["request_id"] == "req-task"
    assert "request_id" not in in_thread  # the recorder's threads log without it
    assert "request_id" not in after  # asyncio.run's context ended with the request


def test_request_id_reset_unbinds_it(json_lines, no_tracing):
    token = request_id_bind("req-reset")
    request_id_reset(token)
    json_lines.logger.info("unbound")
    assert "request_id" not in json_lines.objects()[0]


def test_trace_ids_are_on_the_line_while_a_span_is_active(json_lines, monkeypatch):
    active: list[tuple[str, str]] = []
    monkeypatch.setattr(logcontext, "trace_ids", lambda: active[0] if active else None)

    json_lines.logger.info("no span")
    active.append(TRACE)
    json_lines.logger.info("in a span")

    no_span, in_span = json_lines.objects()
    assert "trace_id" not in no_span and "span_id" not in no_span
    assert (in_span["trace_id"], in_span["span_id"]) == TRACE


def test_without_an_active_span_the_real_hook_adds_no_trace_ids(json_lines):
    """common.telemetry reports no span when tracing is not configured."""
    json_lines.logger.info("untraced")
    assert "trace_id" not in json_lines.objects()[0]
    assert logcontext.trace_ids() is None


def test_uvicorn_access_lines_carry_their_fields(json_lines, no_tracing):
    access = logging.getLogger("uvicorn.access")
    level = access.level  # an embedded uvicorn may have left it at WARNING
    access.setLevel(logging.INFO)
    access.addHandler(json_lines.handler)
    try:
        access.info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/x?api_key={KEY}", "1.1", 404
        )
    finally:
        access.removeHandler(json_lines.handler)
        access.setLevel(level)

    (line,) = json_lines.objects()
    assert line["logger"] == "uvicorn.access"
    assert line["method"] == "GET" and line["status_code"] == 404
    assert line["path"] == f"/x?api_key={mask_secret(KEY)}"
    assert KEY not in json_lines.text()


# --- the usage line -----------------------------------------------------------------------


@pytest.fixture
def usage_lines() -> Iterator[RawCapture]:
    with RawCapture().installed_on(logging.getLogger("llmrotate.usage")) as capture:
        yield capture


@pytest.mark.django_db
def test_the_usage_line_without_tracing_is_exactly_the_record(usage_lines):
    row = call_prepare(make_call())
    (line,) = usage_lines.lines
    assert line == row_to_json(row)  # byte for byte, as before trace ids existed
    assert "trace_id" not in json.loads(line)


@pytest.mark.django_db
def test_the_usage_line_gains_trace_ids_after_the_record_fields(usage_lines):
    data = make_call(trace_id=TRACE[0], span_id=TRACE[1])
    row = call_prepare(data)

    (line,) = usage_lines.lines
    logged = json.loads(line)
    assert list(logged) == [*json.loads(row_to_json(row)), "trace_id", "span_id"]
    assert (logged["trace_id"], logged["span_id"]) == TRACE
    # The row written to the database (and the spool) has no such fields.
    assert "trace_id" not in row and "span_id" not in row


def test_trace_ids_are_never_persisted():
    names = {f.name for f in fields(CallData)}
    assert {"trace_id", "span_id"} <= names
    assert "trace_id" not in PERSISTED_FIELDS and "span_id" not in PERSISTED_FIELDS


SETTLED_PROCESS = """
import logging, django
django.setup()
logging.getLogger("llmrotate.usage").info('{"request_id":"r1","attempt":1}')
logging.getLogger("celery.task").warning("from a task")
key = "sk-proj-jsonlogs" + "0123456789abcdefWXYZ"
logging.getLogger("keys.services").info("from the gateway %s", key)
"""


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_settings_switch_every_line_but_the_usage_line(tmp_path: Path, log_format: str):
    """A process configured by the settings alone: with json, the console lines (Celery's task
    logger included) are objects and the usage line is the bare record; with text, both are as
    they always were."""
    env = env_without(
        "DATABASE_URL", "REDIS_URL", LLMROTATE_DATA_DIR=str(tmp_path / "var"),
        LLMROTATE_LOG_FORMAT=log_format, DJANGO_SETTINGS_MODULE="llmrotate_site.settings",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", SETTLED_PROCESS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout == '{"request_id":"r1","attempt":1}\n'  # the usage line, unwrapped
    console = done.stderr.splitlines()
    assert len(console) == 2, done.stderr
    assert KEY not in done.stderr
    if log_format == "text":
        assert re.match(r"^\S+ \S+ WARNING celery.task: from a task$", console[0]), console
        assert console[1].endswith(f"INFO keys.services: from the gateway {mask_secret(KEY)}")
        return
    task, gateway = (json.loads(line) for line in console)
    assert (task["logger"], task["level"], task["message"]) == (
        "celery.task",
        "WARNING",
        "from a task",
    )
    assert gateway["message"] == f"from the gateway {mask_secret(KEY)}"


def test_an_unknown_log_format_stops_the_process(tmp_path: Path):
    env = env_without(
        "DATABASE_URL", "REDIS_URL", LLMROTATE_DATA_DIR=str(tmp_path / "var"),
        LLMROTATE_LOG_FORMAT="yaml", DJANGO_SETTINGS_MODULE="llmrotate_site.settings",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "LLMROTATE_LOG_FORMAT must be text or json, not 'yaml'" in done.stderr


# --- a request through the proxy ----------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_engine_lines_during_a_proxied_request_carry_its_request_id(
    request: pytest.FixtureRequest, no_tracing: None
):
    """A failed first attempt is logged by the engine, in the request's task: its line says
    which request it belongs to."""
    gateway = request.getfixturevalue("live_gateway")  # the fixtures imported above
    lines = JsonLines("llmrotate.proxy")
    try:
        gateway.prefer("key-a")
        gateway.script(key_a=[{"fault": "500"}])
        gateway.openai().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        ended = [line for line in lines.objects() if "ended:" in line["message"]]
    finally:
        lines.close()
    assert ended, lines.text()
    (line,) = ended
    assert line["request_id"] and f"request {line['request_id']} attempt 1" in line["message"]


# --- manage.py serve ----------------------------------------------------------------------


def _objects(output: str) -> list[dict[str, Any]]:
    objects = []
    for line in output.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{output}") from None
        assert isinstance(parsed, dict), line
        objects.append(parsed)
    return objects


@pytest.mark.embedded
@pytest.mark.timeout(120)
def test_serve_prints_only_json_objects_in_json_mode(tmp_path: Path, serve_processes):
    port = free_port()
    env = env_without(
        "DATABASE_URL", "REDIS_URL", "SECRET_KEY", "LLMROTATE_ENCRYPTION_KEYS",
        "LLMROTATE_WEBHOOK_URLS", LLMROTATE_DATA_DIR=str(tmp_path / "data"),
        LLMROTATE_LOG_FORMAT="json",
    )  # fmt: skip
    server = ServeProcess(["--port", str(port)], env=env, log=tmp_path / "serve.log")
    serve_processes.append(server)
    url = f"http://127.0.0.1:{port}"
    server.wait_ready(f"{url}/healthz")
    httpx.get(f"{url}/no-such-page/?api_key={KEY}", timeout=10)

    def loggers(output: str) -> set[str]:
        return {line.get("logger", "") for line in _objects(output)}

    # web (uvicorn's error and access loggers, Django's), the worker (Celery) and beat (ours).
    wait_until(
        "lines of web, worker and beat",
        lambda out: (
            {"uvicorn.error", "uvicorn.access", "django.request", "celery.apps.worker"}
            <= loggers(out)
            and "beat schedule synced" in out
            and "llmrotate is ready on" in out
        ),
        server,
        timeout=40,
    )
    assert server.stop(signal.SIGTERM, timeout=40) == 0
    output = server.output()

    objects = _objects(output)  # every line, the supervisor's own included
    for line in objects:
        assert {"timestamp", "level", "logger", "message"} <= set(line), line
        assert TIMESTAMP.match(line["timestamp"]), line
    assert KEY not in output
    access = [line for line in objects if line["logger"] == "uvicorn.access"]
    assert any(line.get("path") == f"/no-such-page/?api_key={mask_secret(KEY)}" for line in access)
    # The children wrote JSON themselves: nothing of theirs had to be wrapped by the supervisor
    # but what Celery prints without logging (its "Warm shutdown" notice).
    wrapped = [line for line in objects if line["logger"].startswith("llmrotate.serve.")]
    assert all(line["logger"] == "llmrotate.serve.worker" for line in wrapped), wrapped
    assert all("shutdown" in line["message"] for line in wrapped), wrapped
    ready = [line for line in objects if "llmrotate is ready on" in line["message"]]
    assert len(ready) == 1 and ready[0]["logger"] == "llmrotate.serve"
