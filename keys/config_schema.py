"""Parsing a config document into specs; keys.config_io describes the format and applies them.

Every error is collected with its path (see keys.config_readers), so that a document is
reported on in full; nothing is written here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator

from keys.config_readers import _MISSING, _Reader, _type_name
from keys.crypto import SecretError, hash_token, resolve_reference
from keys.models import ClientToken, Provider, slug_validator, validate_base_url
from keys.services import SecretSpec, api_key_parse_secret
from keys.strategies import STRATEGIES

CONFIG_VERSION = 1
SECTIONS = ("providers", "keys", "routes", "clients")
PROVIDER_FIELDS = {
    "kind",
    "base_url",
    "cooldown_seconds",
    "quarantine_seconds",
    "exhausted_seconds",
    "enabled",
}
KEY_FIELDS = {"id", "provider", "secret", "priority", "weight", "models", "enabled"}
ROUTE_FIELDS = {"strategy", "enabled", "deployments"}
DEPLOYMENT_FIELDS = {"provider", "model"}
CLIENT_FIELDS = {"name", "token", "routes", "scopes"}
PLAINTEXT_WARNING = (
    "{path}: the secret is written in the file; prefer env://NAME or file://path "
    "(it is stored encrypted either way)"
)


def _check_base_url(value: str) -> None:
    # The admin's checks, in its order.
    URLValidator()(value)
    validate_base_url(value)


class ConfigError(Exception):
    """The document is invalid. `errors` lists every problem, each starting with its path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


# ---------------------------------------------------------------------------------------------
# Parsing: the document → specs, collecting every error with its path


@dataclass
class _ProviderSpec:
    path: str
    name: str
    values: dict[str, Any]


@dataclass
class _KeySpec:
    path: str
    key_id: str
    provider: str
    secret: SecretSpec | None
    values: dict[str, Any]


@dataclass
class _RouteSpec:
    path: str
    name: str
    values: dict[str, Any]
    deployments: list[tuple[str, str]]


@dataclass
class _ClientSpec:
    path: str
    name: str
    token: str | None  # resolved plaintext, never stored
    routes: list[str] | None
    scopes: list[str] | None


class _Parser(_Reader):
    """The document's sections → specs, on top of the typed readers."""

    # -- sections ----------------------------------------------------------------------------

    def providers(self, section: Any) -> list[_ProviderSpec]:
        specs: list[_ProviderSpec] = []
        entries = self.mapping(section, "providers")
        for name, entry in (entries or {}).items():
            path = f"providers.{name}"
            if self.string(name, path, max_length=64, check=slug_validator) is _MISSING:
                continue
            entry = self.mapping(entry, path)
            if entry is None or not self.fields(entry, path, PROVIDER_FIELDS, {"base_url"}):
                continue
            values: dict[str, Any] = {}
            readers: dict[str, Callable[[Any, str], Any]] = {
                "kind": lambda v, p: self.choice(v, p, Provider.Kind.values),
                "base_url": lambda v, p: self.string(v, p, max_length=500, check=_check_base_url),
                "cooldown_seconds": lambda v, p: self.integer(v, p, minimum=0),
                "quarantine_seconds": lambda v, p: self.integer(v, p, minimum=0),
                "exhausted_seconds": lambda v, p: self.integer(v, p, minimum=0),
                "enabled": self.boolean,
            }
            for field_name, raw in entry.items():
                parsed = readers[field_name](raw, f"{path}.{field_name}")
                if parsed is not _MISSING:
                    values[field_name] = parsed
            specs.append(_ProviderSpec(path, name, values))
        return specs

    def keys(self, section: Any, known_providers: set[str]) -> list[_KeySpec]:
        specs: list[_KeySpec] = []
        if not isinstance(section, list):
            self.error("keys", f"expected a list, got {_type_name(section)}")
            return specs
        seen: dict[str, str] = {}
        for i, entry in enumerate(section):
            path = f"keys[{i}]"
            entry = self.mapping(entry, path)
            if entry is None or not self.fields(entry, path, KEY_FIELDS, {"id", "provider"}):
                continue
            key_id = self.string(entry["id"], f"{path}.id", max_length=64, check=slug_validator)
            if key_id is not _MISSING:
                if key_id in seen:
                    self.error(f"{path}.id", f"duplicate id '{key_id}' (also {seen[key_id]})")
                seen.setdefault(key_id, path)
            provider = self.string(entry["provider"], f"{path}.provider", max_length=64)
            if provider is not _MISSING and provider not in known_providers:
                self.error(f"{path}.provider", f"unknown provider '{provider}'")
            secret = self.key_secret(entry, path)
            values: dict[str, Any] = {}
            for name, reader in (
                ("priority", lambda v, p: self.integer(v, p, minimum=-(2**31))),
                ("weight", lambda v, p: self.integer(v, p, minimum=1)),
                ("models", lambda v, p: self.string_list(v, p, max_length=200)),
                ("enabled", self.boolean),
            ):
                if name in entry:
                    parsed = reader(entry[name], f"{path}.{name}")
                    if parsed is not _MISSING:
                        values["allowed_models" if name == "models" else name] = parsed
            if key_id is not _MISSING and provider is not _MISSING and secret is not _MISSING:
                specs.append(_KeySpec(path, key_id, provider, secret, values))
        return specs

    def key_secret(self, entry: dict[str, Any], path: str) -> Any:
        if "secret" not in entry:
            return None
        path = f"{path}.secret"
        raw = entry["secret"]
        if not isinstance(raw, str):
            self.error(path, f"expected a string, got {_type_name(raw)}")
            return _MISSING
        try:
            spec = api_key_parse_secret(secret=raw)
        except ValidationError as exc:
            self.error(path, "; ".join(exc.messages))
            return _MISSING
        if spec.kind == "reference":
            try:
                resolve_reference(spec.value)
            except SecretError as exc:
                # Not an error: the variable may exist only where the proxy runs.
                self.warnings.append(f"{path}: {spec.value} cannot be resolved here: {exc}")
        else:
            self.warnings.append(PLAINTEXT_WARNING.format(path=path))
        return spec

    def routes(self, section: Any, known_providers: set[str]) -> list[_RouteSpec]:
        specs: list[_RouteSpec] = []
        entries = self.mapping(section, "routes")
        strategies = [value for value, _ in STRATEGIES]
        for name, entry in (entries or {}).items():
            path = f"routes.{name}"
            if self.string(name, path, max_length=200) is _MISSING:
                continue
            entry = self.mapping(entry, path)
            if entry is None or not self.fields(entry, path, ROUTE_FIELDS, {"deployments"}):
                continue
            values: dict[str, Any] = {}
            if "strategy" in entry:
                parsed = self.choice(entry["strategy"], f"{path}.strategy", strategies)
                if parsed is not _MISSING:
                    values["strategy"] = parsed
            if "enabled" in entry:
                parsed = self.boolean(entry["enabled"], f"{path}.enabled")
                if parsed is not _MISSING:
                    values["enabled"] = parsed
            deployments = self.deployments(
                entry["deployments"], f"{path}.deployments", known_providers
            )
            if deployments is not None:
                specs.append(_RouteSpec(path, name, values, deployments))
        return specs

    def deployments(
        self, value: Any, path: str, known_providers: set[str]
    ) -> list[tuple[str, str]] | None:
        if not isinstance(value, list) or not value:
            self.error(path, "expected a non-empty list of {provider, model}")
            return None
        out: list[tuple[str, str]] = []
        for i, entry in enumerate(value):
            item_path = f"{path}[{i}]"
            entry = self.mapping(entry, item_path)
            if entry is None or not self.fields(
                entry, item_path, DEPLOYMENT_FIELDS, DEPLOYMENT_FIELDS
            ):
                return None
            provider = self.string(entry["provider"], f"{item_path}.provider", max_length=64)
            model = self.string(entry["model"], f"{item_path}.model", max_length=200)
            if provider is not _MISSING and provider not in known_providers:
                self.error(f"{item_path}.provider", f"unknown provider '{provider}'")
                return None
            if provider is _MISSING or model is _MISSING:
                return None
            out.append((provider, model))
        return out

    def clients(self, section: Any) -> list[_ClientSpec]:
        specs: list[_ClientSpec] = []
        if not isinstance(section, list):
            self.error("clients", f"expected a list, got {_type_name(section)}")
            return specs
        seen: dict[str, str] = {}
        tokens: dict[str, str] = {}
        for i, entry in enumerate(section):
            path = f"clients[{i}]"
            entry = self.mapping(entry, path)
            if entry is None or not self.fields(entry, path, CLIENT_FIELDS, {"name"}):
                continue
            name = self.string(entry["name"], f"{path}.name", max_length=100)
            if name is not _MISSING:
                if name in seen:
                    self.error(f"{path}.name", f"duplicate name '{name}' (also {seen[name]})")
                seen.setdefault(name, path)
            token = self.client_token(entry, path)
            if isinstance(token, str):
                digest = hash_token(token)
                if digest in tokens:
                    self.error(f"{path}.token", f"same token as {tokens[digest]}")
                tokens.setdefault(digest, path)
            routes = scopes = None
            if "routes" in entry:
                routes = self.string_list(entry["routes"], f"{path}.routes", max_length=200)
            if "scopes" in entry:
                scopes = self.string_list(entry["scopes"], f"{path}.scopes", max_length=32)
                if scopes is not _MISSING:
                    for j, scope in enumerate(scopes):
                        if (
                            self.choice(scope, f"{path}.scopes[{j}]", ClientToken.Scope.values)
                            is _MISSING
                        ):
                            scopes = _MISSING
                            break
            if _MISSING not in (name, token, routes, scopes):
                specs.append(_ClientSpec(path, name, token, routes, scopes))
        return specs

    def client_token(self, entry: dict[str, Any], path: str) -> Any:
        if "token" not in entry:
            return None
        path = f"{path}.token"
        raw = entry["token"]
        if not isinstance(raw, str):
            self.error(path, f"expected a string, got {_type_name(raw)}")
            return _MISSING
        try:
            spec = api_key_parse_secret(secret=raw)
        except ValidationError as exc:
            self.error(path, "; ".join(exc.messages))
            return _MISSING
        if spec.kind == "reference":
            # Unlike an upstream key, a client token must be resolvable now: only its hash is
            # kept, so there is nothing to resolve later.
            try:
                token = resolve_reference(spec.value)
            except SecretError as exc:
                self.error(path, str(exc))
                return _MISSING
        else:
            self.warnings.append(PLAINTEXT_WARNING.format(path=path))
            token = spec.value
        if len(token) < 20:
            self.error(path, "a client token must be at least 20 characters long")
            return _MISSING
        return token


@dataclass
class _Document:
    providers: list[_ProviderSpec]
    keys: list[_KeySpec]
    routes: list[_RouteSpec]
    clients: list[_ClientSpec]
    warnings: list[str]


def _parse(data: Any) -> _Document:
    parser = _Parser()
    if not isinstance(data, dict):
        raise ConfigError([f"(document): expected a mapping, got {_type_name(data)}"])
    for name in data:
        if name not in (*SECTIONS, "version"):
            parser.error(
                str(name), f"unknown section; expected one of version, {', '.join(SECTIONS)}"
            )
    version = data.get("version", CONFIG_VERSION)
    if type(version) is not int or version != CONFIG_VERSION:
        parser.error("version", f"unsupported version {version!r}; expected {CONFIG_VERSION}")

    providers = parser.providers(data.get("providers") or {})
    known_providers = {p.name for p in providers} | set(
        Provider.objects.values_list("name", flat=True)
    )
    keys = parser.keys(data.get("keys") or [], known_providers)
    routes = parser.routes(data.get("routes") or {}, known_providers)
    clients = parser.clients(data.get("clients") or [])
    if parser.errors:
        raise ConfigError(parser.errors)
    return _Document(providers, keys, routes, clients, parser.warnings)
