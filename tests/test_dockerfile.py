"""The image's own rules, which a generic Dockerfile linter (hadolint, run by `make lint`) does not
know: two stages from one exactly pinned slim base, a non-root user, static files collected at
build time without a secret being generated or kept, `manage.py serve` on 0.0.0.0, a health
check on /healthz, a graceful stop; and a build context that leaves .env, var/ and .venv out."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECRETS = ("SECRET_KEY", "LLMROTATE_ENCRYPTION_KEYS", "LLMROTATE_WEBHOOK_SECRET")
BASE_IMAGE = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                values[name] = value
        return values


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    stages: list[Stage] = []
    for line in logical.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            if " as " in args:
                base, _, name = args.partition(" as ")
            stages.append(Stage(base=base.strip(), name=name.strip() or None))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    import json

    value = json.loads(args)
    assert isinstance(value, list), f"{args} is not in exec (JSON array) form"
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages()


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_two_stages_the_runtime_takes_only_built_artefacts_from_the_builder(
    stages: list[Stage], runtime: Stage
) -> None:
    builders = [stage.name for stage in stages[:-1] if stage.name]
    assert builders, "a named builder stage before the runtime stage"
    copied = [args for args in runtime.all("COPY") if args.startswith("--from=")]
    sources = {shlex.split(args)[-2] for args in copied}
    # The virtualenv, the code and the collected static files. Never the whole data directory
    # of the builder: settings create secrets.env and a database there when they load.
    assert sources == {"/opt/venv", "/app", "/data/static"}, sources
    assert not any("pip install" in run for run in runtime.all("RUN")), "installs in the builder"


def test_every_stage_starts_from_the_same_exactly_pinned_slim_bookworm_python(
    stages: list[Stage],
) -> None:
    bases = {stage.base for stage in stages}
    assert len(bases) == 1, f"builder and runtime on different bases: {bases}"
    (base,) = bases
    assert BASE_IMAGE.match(base), f"{base}: pin python:3.11.<patch>-slim-bookworm exactly"
    # pyproject.toml's floor and the image agree.
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def test_the_runtime_runs_as_an_unprivileged_numeric_user(runtime: Stage) -> None:
    user = runtime.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, f"USER {user}: a numeric, non-root uid"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    created = " ".join(runtime.all("RUN"))
    assert f"--uid {uid}" in created, "the USER is created in the image (useradd --uid)"
    # Nothing runs as root after the switch.
    keywords = [kw for kw, _ in runtime.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]


def test_python_runs_unbuffered_without_writing_bytecode(stages: list[Stage]) -> None:
    for stage in stages:
        env = stage.env()
        assert env.get("PYTHONDONTWRITEBYTECODE") == "1", stage.base
        assert env.get("PYTHONUNBUFFERED") == "1", stage.base


def test_no_secret_is_set_in_the_image(stages: list[Stage]) -> None:
    for stage in stages:
        for keyword in ("ENV", "ARG", "LABEL"):
            for args in stage.all(keyword):
                for name in (*SECRETS, "DATABASE_URL", "LLMROTATE_ADMIN_PASSWORD"):
                    assert name not in args, f"{keyword} {args}: secrets come at run time"
    # The build-only placeholders live in the builder stage only, on the collectstatic line.
    runtime_text = " ".join(args for _, args in stages[-1].instructions)
    assert not any(name in runtime_text for name in SECRETS)


def collectstatic_run(stages: list[Stage]) -> tuple[Stage, str]:
    for stage in stages:
        for args in stage.all("RUN"):
            if "manage.py collectstatic" in args:
                return stage, args
    pytest.fail("no RUN … manage.py collectstatic in the Dockerfile")


def test_static_files_are_collected_in_the_builder_into_the_runtime_static_root(
    stages: list[Stage], runtime: Stage
) -> None:
    stage, run = collectstatic_run(stages)
    assert stage is not runtime
    assert "--noinput" in run
    data_dir = runtime.env()["LLMROTATE_DATA_DIR"]
    assert f"LLMROTATE_DATA_DIR={data_dir}" in run, "collected where STATIC_ROOT is at run time"


def test_the_build_time_collectstatic_generates_no_secret(
    stages: list[Stage], tmp_path: Path
) -> None:
    """The Dockerfile's own collectstatic line, run here against a scratch data directory:
    it works with its placeholders alone, and leaves no secrets.env behind."""
    _, run = collectstatic_run(stages)
    tokens = shlex.split(run)
    assignments = dict(token.split("=", 1) for token in tokens[: tokens.index("python")])
    assert set(SECRETS) <= set(assignments), "every secret given, so none is generated"
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(assignments, LLMROTATE_DATA_DIR=str(data_dir))
    env.pop("DJANGO_SETTINGS_MODULE", None)

    done = subprocess.run(
        [sys.executable, *tokens[tokens.index("python") + 1 :]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert not (data_dir / "secrets.env").exists()
    assert (data_dir / "static" / "admin" / "css" / "base.css").is_file()
    assert (data_dir / "static" / "vendor").is_dir(), "the project's static/ is collected too"


def test_the_entry_point_is_serve_on_every_interface(runtime: Stage) -> None:
    assert exec_form(runtime.last("ENTRYPOINT")) == ["python", "manage.py"]
    assert exec_form(runtime.last("CMD"))[0] == "serve"
    env = runtime.env()
    # `serve --host` defaults to LLMROTATE_HOST: also true when compose passes other options.
    assert env["LLMROTATE_HOST"] == "0.0.0.0"  # noqa: S104 - in a container, on purpose
    assert runtime.last("EXPOSE") == env["LLMROTATE_PORT"]
    assert runtime.last("WORKDIR") == "/app"


def test_a_graceful_stop(runtime: Stage) -> None:
    assert runtime.last("STOPSIGNAL") == "SIGTERM"  # what `serve` handles: stops its children


def test_the_healthcheck_asks_healthz_with_python(runtime: Stage) -> None:
    check = runtime.last("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    argv = exec_form(command)
    assert argv[0] == "python", "slim images have no curl"
    script = REPO / argv[1].removeprefix("/app/")
    assert script.is_file()
    assert "/healthz" in script.read_text()
    assert "--start-period=" in options, "serve applies migrations before it listens"


class _Healthz(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def healthz_server() -> Iterator[tuple[int, type[_Healthz]]]:
    handler = type("Handler", (_Healthz,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def run_healthcheck(port: int, **env: str) -> int:
    environment = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    environment.update(LLMROTATE_PORT=str(port), **env)
    done = subprocess.run(
        [sys.executable, str(REPO / "docker" / "healthcheck.py")],
        env=environment,
        capture_output=True,
        timeout=30,
    )
    return done.returncode


def test_the_healthcheck_script_is_healthy_only_on_a_200(
    healthz_server: tuple[int, type[_Healthz]],
) -> None:
    port, handler = healthz_server

    assert run_healthcheck(port) == 0
    assert handler.paths == ["/healthz"]
    # A proxy set for upstream calls is not used for the container's own port.
    proxy = "http://127.0.0.1:9"
    assert run_healthcheck(port, HTTP_PROXY=proxy, http_proxy=proxy) == 0

    handler.status = 503  # the database, the broker or Redis failing
    assert run_healthcheck(port) == 1


def test_the_healthcheck_script_is_unhealthy_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the check runs
    assert run_healthcheck(port) == 1


# --- .dockerignore --------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_build_context(path: str) -> bool:
    """Whether `path` (relative to the repository) is sent to the builder: the last pattern
    matching it or one of its parent folders decides, `!` letting it back in."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern(line.lstrip("!").strip("/"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, pattern in rules:
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included


def test_the_build_context_leaves_secrets_state_and_tooling_out() -> None:
    for path in (
        ".env",
        "var/secrets.env",
        "var/llmrotate.sqlite3",
        ".venv/bin/python",
        ".git/config",
        "tests/test_dockerfile.py",
        "tests/artifacts/screenshots/overview.png",
        "bench/results/run.json",
        "llmrotate.egg-info/PKG-INFO",
        ".mypy_cache/3.11/x.json",
        "keys/__pycache__/models.cpython-311.pyc",
        "llmrotate_site/.env",
        "compose.yaml",
    ):
        assert not in_build_context(path), f"{path} must stay out of the image"


def test_the_build_context_has_what_the_gateway_runs_with() -> None:
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [pattern.rstrip("*") for pattern in find["packages"]["find"]["include"]]
    for package in packages:
        assert in_build_context(f"{package}/__init__.py"), f"package {package} left out"
    for path in (
        "manage.py",
        "pyproject.toml",
        "README.md",  # pyproject's readme: the install reads it
        "templates/dashboard/base.html",
        "static/vendor/README.md",
        "docker/healthcheck.py",
        "llmrotate_site/settings.py",
        "keys/migrations/0001_initial.py",
    ):
        assert in_build_context(path), f"{path} is needed in the image"
    for path in ("templates", "static"):
        assert (REPO / path).is_dir()
