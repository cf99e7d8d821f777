"""compose.yaml: `docker compose up` with no .env. The gateway services run the image the
Dockerfile builds, share one data volume (where the first of them generates the secrets all of
them read), pass an operator's .env values through, and keep their order: web migrates first,
worker and beat wait for it, and there is exactly one beat."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GATEWAY = ("web", "worker", "beat")
SECRETS = ("SECRET_KEY", "LLMROTATE_ENCRYPTION_KEYS", "LLMROTATE_WEBHOOK_SECRET")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a literal $.
INTERPOLATION = re.compile(r"(?<!\$)\$\{(?P<name>\w+)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # PyYAML's safe loader resolves the `<<: *gateway` merge keys as Compose does.
    loaded = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    value = compose["services"][name]
    assert isinstance(value, dict)
    return value


def test_every_gateway_service_builds_and_runs_the_image(compose: dict[str, Any]) -> None:
    images = set()
    for name in GATEWAY:
        svc = service(compose, name)
        build = svc["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert context == ".", f"{name} builds the Dockerfile at the repository root"
        # Built here, never pulled: a registry image of the same name is not ours.
        assert svc.get("pull_policy") == "build", name
        images.add(svc["image"])
        assert not svc["image"].startswith("python:"), f"{name} still runs a bare Python image"
    assert len(images) == 1, f"one image for the three: {images}"


def test_one_shared_data_volume_in_all_gateway_services(compose: dict[str, Any]) -> None:
    mounts = {}
    for name in GATEWAY:
        svc = service(compose, name)
        data_dir = svc["environment"]["LLMROTATE_DATA_DIR"]
        volumes = [v for v in svc.get("volumes", []) if isinstance(v, str)]
        at_data_dir = [v.split(":")[0] for v in volumes if v.split(":")[1] == data_dir]
        assert len(at_data_dir) == 1, f"{name}: one volume at {data_dir}"
        mounts[name] = at_data_dir[0]
        # The code comes from the image: no bind mount of the checkout over it.
        assert not any(v.split(":")[0].startswith((".", "/")) for v in volumes), volumes
    assert len(set(mounts.values())) == 1, f"the same volume everywhere: {mounts}"
    assert next(iter(mounts.values())) in compose["volumes"], "a named volume"


def test_no_variable_is_required(compose: dict[str, Any]) -> None:
    text = (REPO / "compose.yaml").read_text()
    found = list(INTERPOLATION.finditer(text))
    assert found, "the secrets are passed through from .env"
    for match in found:
        assert match["op"] in (":-", "-"), f"{match[0]} needs a .env; give it a default"
    assert not re.search(r"(?<!\$)\$(?!\{|\$)\w", text), "bare $NAME: use ${NAME:-…}"


def test_the_secrets_come_from_env_or_are_generated_on_the_shared_volume(
    compose: dict[str, Any],
) -> None:
    for name in GATEWAY:
        environment = service(compose, name)["environment"]
        for secret in SECRETS:
            # An .env value wins; empty means "generate into <data dir>/secrets.env".
            assert environment[secret] == f"${{{secret}:-}}", (name, secret)


def test_an_empty_secret_variable_counts_as_unset(tmp_path: Path) -> None:
    """What compose passes without a .env: the three set to "". Settings then generate all
    three into secrets.env, and a second process reading the same directory agrees."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        {name: "" for name in SECRETS},
        DJANGO_SETTINGS_MODULE="llmrotate_site.settings",
        LLMROTATE_DATA_DIR=str(tmp_path / "data"),
    )
    show = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.SECRET_KEY, ','.join(s.LLMROTATE_ENCRYPTION_KEYS), s.LLMROTATE_WEBHOOK_SECRET)"
    )

    def load() -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", show],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    first, second = load(), load()

    assert len(first) == 3 and all(first)
    assert first == second
    written = (tmp_path / "data" / "secrets.env").read_text()
    assert [line.partition("=")[0] for line in written.splitlines()[1:]] == list(SECRETS)


def test_web_migrates_first_and_the_others_wait_for_it(compose: dict[str, Any]) -> None:
    web = service(compose, "web")
    command = web["command"]
    assert command[0] == "serve", "serve applies migrations before it listens"
    assert {"--no-worker", "--no-beat"} <= set(command), "worker and beat are services"
    assert set(web["depends_on"]) == {"postgres", "redis"}
    assert all(dep["condition"] == "service_healthy" for dep in web["depends_on"].values())
    assert "/healthz" in (REPO / web["healthcheck"]["test"][-1].removeprefix("/app/")).read_text()
    for name in ("worker", "beat"):
        svc = service(compose, name)
        assert svc["depends_on"] == {"web": {"condition": "service_healthy"}}, name
        assert svc["entrypoint"] == ["celery", "-A", "llmrotate_site"], name
        assert svc["command"][0] == ("worker" if name == "worker" else "beat")
        # The image's healthcheck asks the web server, which does not run in these.
        assert svc["healthcheck"] == {"disable": True}, name


def test_exactly_one_beat(compose: dict[str, Any]) -> None:
    assert service(compose, "beat")["deploy"]["replicas"] == 1
    beats = [
        name
        for name, svc in compose["services"].items()
        if (svc.get("command") or [""])[0] == "beat"
    ]
    assert beats == ["beat"]
    assert "--no-beat" in service(compose, "web")["command"]


def test_the_stop_grace_period_covers_a_graceful_serve_stop(compose: dict[str, Any]) -> None:
    from llmrotate_site.management.commands.serve import STOP_TIMEOUT_SECONDS

    for name in GATEWAY:
        period = service(compose, name)["stop_grace_period"]
        assert period.endswith("s") and float(period[:-1]) > STOP_TIMEOUT_SECONDS, name


def test_the_ollama_profile_puts_the_gateway_in_front_of_a_local_model(
    compose: dict[str, Any],
) -> None:
    ollama, pull, setup = (service(compose, n) for n in ("ollama", "ollama-pull", "ollama-setup"))
    for svc in (ollama, pull, setup):
        assert svc["profiles"] == ["ollama"], "off unless asked for"
    # The gateway image imports the ready-made config once web has migrated.
    assert setup["image"] == service(compose, "web")["image"]
    assert setup["command"] == ["import_config", "/config/ollama.yaml"]
    assert "./docker/ollama.yaml:/config/ollama.yaml:ro" in setup["volumes"]
    assert setup["depends_on"]["web"] == {"condition": "service_healthy"}
    assert pull["environment"]["OLLAMA_HOST"] == "http://ollama:11434"
    config = yaml.safe_load((REPO / "docker" / "ollama.yaml").read_text())
    assert config["providers"]["ollama"]["base_url"] == "http://ollama:11434/v1"
    assert config["providers"]["ollama"]["requires_key"] is False
