"""Pass-through routes (patterns) and keyless providers: in the config file, the admin's model
validation, and the routing snapshot the proxy reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.exceptions import ValidationError

from common.upstream import upstream_headers
from keys.config_io import ConfigError, config_export, config_import
from keys.models import ApiKey, Provider, Route
from keys.routing import route_lookup, routing_load

pytestmark = pytest.mark.django_db
REPO = Path(__file__).resolve().parents[2]


def document(**routes: Any) -> dict[str, Any]:
    return {
        "providers": {
            "local": {
                "kind": "openai_compatible",
                "base_url": "http://127.0.0.1:11434/v1",
                "requires_key": False,
            },
            "openai": {"kind": "openai", "base_url": "https://api.openai.com/v1"},
        },
        "keys": [{"id": "oa-1", "provider": "openai", "secret": "literal://sk-abcdefgh12345678"}],
        "routes": routes
        or {
            "ollama/*": {"deployments": [{"provider": "local", "model": "*"}]},
            "gpt*": {"deployments": [{"provider": "openai", "model": "gpt*"}]},
            "gpt-4o": {"deployments": [{"provider": "openai", "model": "gpt-4o-2024-08-06"}]},
        },
    }


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_import(data=data)
    return caught.value.errors


def test_patterns_and_keyless_providers_import_export_and_round_trip() -> None:
    config_import(data=document())
    assert Provider.objects.get(name="local").requires_key is False
    exported = config_export()
    assert exported["providers"]["local"]["requires_key"] is False
    assert set(exported["routes"]) == {"ollama/*", "gpt*", "gpt-4o"}
    assert exported["routes"]["ollama/*"]["deployments"] == [{"provider": "local", "model": "*"}]
    assert config_import(data=exported).unchanged >= 3


def test_the_snapshot_resolves_patterns_exact_routes_first_then_the_longest() -> None:
    config_import(data=document())
    snapshot = routing_load()
    assert [p.name for p in snapshot.patterns] == ["ollama/*", "gpt*"]
    exact = route_lookup(snapshot, "gpt-4o")
    assert exact is not None and exact.pattern == "" and exact.deployments[0].model.endswith("06")
    route = route_lookup(snapshot, "gpt-4.1-nano")
    assert route is not None
    assert (route.name, route.config_name) == ("gpt-4.1-nano", "gpt*")
    assert route.deployments[0].model == "gpt-4.1-nano"
    local = route_lookup(snapshot, "ollama/llama3.2:1b")
    assert local is not None and local.deployments[0].model == "llama3.2:1b"
    assert route_lookup(snapshot, "claude") is None


def test_a_keyless_provider_has_one_endpoint_key_and_sends_no_credential() -> None:
    config_import(data=document())
    snapshot = routing_load()
    route = route_lookup(snapshot, "ollama/x")
    assert route is not None
    [key] = route.deployments[0].keys
    assert (key.key_id, key.secret, key.masked) == ("local:keyless", "", "(no key)")
    headers = upstream_headers("openai_compatible", key.secret, stream=False)
    assert "Authorization" not in headers


def test_keys_allowed_only_some_models_serve_only_those_through_a_pattern() -> None:
    config_import(data=document())
    ApiKey.objects.filter(key_id="oa-1").update(allowed_models=["gpt-4.1"])
    snapshot = routing_load()
    allowed = route_lookup(snapshot, "gpt-4.1")
    other = route_lookup(snapshot, "gpt-5")
    assert allowed is not None and other is not None
    assert [k.key_id for k in allowed.deployments[0].keys] == ["oa-1"]
    assert other.deployments[0].keys == ()


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        (
            {"a*b*": {"deployments": [{"provider": "openai", "model": "x"}]}},
            "at most one '*'",
        ),
        (
            {"plain": {"deployments": [{"provider": "openai", "model": "*"}]}},
            "Only a pattern route",
        ),
        (
            {"p*": {"deployments": [{"provider": "openai", "model": "**"}]}},
            "at most one '*'",
        ),
    ],
)
def test_bad_patterns_are_refused_with_their_path(routes: dict[str, Any], expected: str) -> None:
    errors = errors_of(document(**routes))
    assert any(expected in e for e in errors), errors
    assert Route.objects.count() == 0


def test_a_key_id_cannot_take_the_keyless_name() -> None:
    provider = Provider.objects.create(name="p", base_url="https://x.test/v1")
    key = ApiKey(key_id="p:keyless", provider=provider, secret_ref="env://X")
    with pytest.raises(ValidationError, match="reserved for keyless"):
        key.full_clean()


def test_the_ready_made_ollama_config_imports_and_passes_anything_through() -> None:
    data = yaml.safe_load((REPO / "docker" / "ollama.yaml").read_text())
    report = config_import(data=data)
    assert set(report.generated_tokens) == {"local-app"}
    snapshot = routing_load()
    route = route_lookup(snapshot, "llama3.2:1b")
    assert route is not None and route.config_name == "*"
    [deployment] = route.deployments
    assert (deployment.provider.kind, deployment.model) == ("openai_compatible", "llama3.2:1b")
    assert [k.key_id for k in deployment.keys] == ["ollama:keyless"]
