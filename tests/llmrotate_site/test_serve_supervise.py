"""`supervise()` with small Python children: their stdout and stderr reach the terminal line by
line under their names, while they run, however much they write; the root-warning filter removes
Celery's warning and nothing else."""

from __future__ import annotations

import io
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.platforms import ROOT_DISCOURAGED

from llmrotate_site.management.commands.serve import Console, _child_env, supervise

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """supervise() installs its own SIGINT/SIGTERM handlers; pytest's come back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def console(*names: str) -> tuple[Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Console(names, stdout=out, stderr=err), out, err


def test_both_streams_are_labelled_and_drained_however_much_a_child_writes():
    # ~1 MB on each stream, far more than a pipe holds: a pipe left unread would block the child.
    lines = 50_000
    writer = (
        "import sys\n"
        f"for i in range({lines}):\n"
        "    print(f'out {i:06d}')\n"
        "    print(f'err {i:06d}', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    term, out, err = console("web", "worker")
    code = supervise(
        {"web": python(writer), "worker": python("import time; time.sleep(60)")},
        console=term,
        env=_child_env(verbose=False),
    )
    assert code == 3
    stdout, stderr = out.getvalue().splitlines(), err.getvalue().splitlines()
    assert [line for line in stdout if line.startswith("web    | ")] == [
        f"web    | out {i:06d}" for i in range(lines)
    ]
    assert stderr == [f"web    | err {i:06d}" for i in range(lines)]
    assert stdout[0].startswith("serve  | started web (pid ")
    assert stdout[-2:] == [
        "serve  | web exited with status 3; stopping the others",
        "serve  | stopped",
    ]


def test_a_line_reaches_the_terminal_while_its_child_still_runs(tmp_path: Path):
    """The child prints one line, then waits for the test to have seen it before it goes on."""
    seen = tmp_path / "seen"
    child = (
        "import os, sys, time\n"
        "print('first')\n"
        "deadline = time.monotonic() + 20\n"
        f"while not os.path.exists({str(seen)!r}):\n"
        "    if time.monotonic() > deadline:\n"
        "        sys.exit(9)\n"
        "    time.sleep(0.02)\n"
        "print('second', file=sys.stderr)\n"
        "sys.exit(5)\n"
    )
    term, out, err = console("web", "worker", "beat")  # as serve's: names padded to "worker"

    def watch() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "beat   | first\n" in out.getvalue():
                seen.touch()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = supervise({"beat": python(child)}, console=term, env=_child_env(verbose=False))
    watcher.join(5)
    assert code == 5, out.getvalue()
    assert err.getvalue() == "beat   | second\n"


def test_only_celerys_root_warning_is_filtered_and_verbose_keeps_it():
    # Celery's own text (celery.platforms), warned as celery does: SecurityWarning, stacklevel 2.
    message = ROOT_DISCOURAGED.format(uid=0, euid=0, gid=0, egid=0)
    warn = (
        "import warnings\n"
        "from celery.exceptions import SecurityWarning\n"
        f"warnings.warn(SecurityWarning({message!r}))\n"
        "warnings.warn('another warning, which must stay', UserWarning)\n"
        "raise SystemExit(4)\n"
    )
    for verbose in (False, True):
        term, _, err = console("worker")
        code = supervise({"worker": python(warn)}, console=term, env=_child_env(verbose=verbose))
        assert code == 4
        stderr = err.getvalue()
        assert "UserWarning: another warning, which must stay" in stderr
        assert ("superuser privileges" in stderr) is verbose, stderr
        assert all(line.startswith("worker | ") for line in stderr.splitlines()), stderr
