"""Import and export of providers, keys, routes and clients as one YAML/JSON document.

The format is a public contract; this docstring is its reference:

    version: 1                      # optional; the only version so far
    providers:
      openai: {kind: openai, base_url: "https://api.openai.com/v1", cooldown_seconds: 30,
               quarantine_seconds: 300, exhausted_seconds: 3600, enabled: true}
    keys:
      - {id: openai-1, provider: openai, secret: "env://OPENAI_API_KEY_1", priority: 0,
         weight: 1, models: ["gpt-4o-mini"], enabled: true}
    routes:
      gpt-4o-mini:
        strategy: health_aware
        enabled: true
        deployments: [{provider: openai, model: gpt-4o-mini}]
    clients:
      - {name: ci, token: "env://LLMROTATE_CI_TOKEN", routes: ["*"], scopes: [proxy, monitor]}

Rules, chosen so that the same file can be applied again and again (GitOps, container start):

- Everything is matched by name (provider name, key `id`, route name, client `name`) and
  created or updated. Re-importing an unchanged file changes nothing.
- Fields left out of an entry keep their current value (model defaults on create), so a
  hand-written file can be short and a change made in the admin survives. Required everywhere:
  a provider's `base_url`, a key's `provider`, a route's `deployments`. A key's `secret` is
  required only when the key is created.
- A route's deployments are replaced, in the order given.
- Rows in the database that the file does not mention are left alone; nothing is deleted.
- Secrets: `env://NAME` and `file://path` are stored as references and never enter the
  database; `literal://value` and a bare value are stored encrypted, with a warning.
- A client's `token` is optional. Left out for a new client, one is generated and returned in
  the report, to be shown once; left out for an existing client, its token is kept. Given (best
  as `env://…`), it is resolved now and only its hash is stored.
- Unknown sections and fields are errors; all errors are reported together, each with its path
  (`keys[2].provider: unknown provider 'foo'`), and nothing is written unless all is valid.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

# Parsing is in keys.config_schema; the `X as X` imports keep its public names importable here.
from keys.config_schema import CLIENT_FIELDS as CLIENT_FIELDS
from keys.config_schema import (
    CONFIG_VERSION,
    SECTIONS,
    ConfigError,
    _ClientSpec,
    _KeySpec,
    _parse,
    _ProviderSpec,
    _RouteSpec,
)
from keys.config_schema import DEPLOYMENT_FIELDS as DEPLOYMENT_FIELDS
from keys.config_schema import KEY_FIELDS as KEY_FIELDS
from keys.config_schema import PLAINTEXT_WARNING as PLAINTEXT_WARNING
from keys.config_schema import PROVIDER_FIELDS as PROVIDER_FIELDS
from keys.config_schema import ROUTE_FIELDS as ROUTE_FIELDS
from keys.crypto import SecretDecryptionError, hash_token
from keys.models import ApiKey, ClientToken, Deployment, Provider, Route
from keys.services import (
    SecretSpec,
    api_key_save,
    api_key_secret_matches,
    client_token_create,
    client_token_update,
    invalidate_routing_on_commit,
)
from keys.strategies import DEFAULT_STRATEGY

DEFAULT_CLIENT_ROUTES = ["*"]
DEFAULT_CLIENT_SCOPES = [ClientToken.Scope.PROXY.value]


@dataclass
class SectionCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class ImportReport:
    dry_run: bool = False
    counts: dict[str, SectionCounts] = field(
        default_factory=lambda: {section: SectionCounts() for section in SECTIONS}
    )
    warnings: list[str] = field(default_factory=list)
    # Client name → generated token. Print once; only its hash is stored.
    generated_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def created(self) -> int:
        return sum(c.created for c in self.counts.values())

    @property
    def updated(self) -> int:
        return sum(c.updated for c in self.counts.values())

    @property
    def unchanged(self) -> int:
        return sum(c.unchanged for c in self.counts.values())

    def summary(self) -> list[str]:
        lines = [
            f"{section}: {c.created} created, {c.updated} updated, {c.unchanged} unchanged"
            for section, c in self.counts.items()
        ]
        if self.dry_run:
            lines.append("Dry run: nothing was saved.")
        return lines


# ---------------------------------------------------------------------------------------------
# Applying


class _Rollback(Exception):
    """Leaves the atomic block of a dry run, undoing everything."""


@contextmanager
def _collect(errors: list[str], path: str, field_names: dict[str, str]) -> Iterator[None]:
    """Turn a model or service ValidationError into an error at `path`."""
    try:
        yield
    except ValidationError as exc:
        if hasattr(exc, "error_dict"):
            for name, messages in exc.message_dict.items():
                where = path if name == "__all__" else f"{path}.{field_names.get(name, name)}"
                errors.extend(f"{where}: {m}" for m in messages)
        else:
            errors.extend(f"{path}: {m}" for m in exc.messages)


def _diff(instance: Any, values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if getattr(instance, k) != v}


def config_import(*, data: dict[str, Any], dry_run: bool = False) -> ImportReport:
    """Create or update everything the document describes, in one transaction.

    Raises ConfigError (nothing written) when the document or any entry is invalid.
    """
    report = ImportReport(dry_run=dry_run)
    errors: list[str] = []
    try:
        with transaction.atomic():
            # Parsed inside the transaction: provider names are checked against the same
            # snapshot the writes go to.
            doc = _parse(data)
            report.warnings.extend(doc.warnings)
            providers = _apply_providers(doc.providers, report, errors)
            if errors:
                # Keys and routes below would refer to providers that were not saved.
                raise ConfigError(errors)
            _apply_keys(doc.keys, providers, report, errors)
            _apply_routes(doc.routes, providers, report, errors)
            _apply_clients(doc.clients, report, errors)
            if errors:
                raise ConfigError(errors)
            if dry_run:
                # Tokens generated in a dry run are rolled back with everything else.
                report.generated_tokens.clear()
                raise _Rollback
    except _Rollback:
        pass
    else:
        invalidate_routing_on_commit()
    return report


def _apply_providers(
    specs: list[_ProviderSpec], report: ImportReport, errors: list[str]
) -> dict[str, Provider]:
    counts = report.counts["providers"]
    for spec in specs:
        provider = Provider.objects.filter(name=spec.name).first()
        with _collect(errors, spec.path, {}):
            if provider is None:
                provider = Provider(name=spec.name, **spec.values)
                provider.full_clean()
                provider.save()
                counts.created += 1
                continue
            changes = _diff(provider, spec.values)
            if not changes:
                counts.unchanged += 1
                continue
            for name, value in changes.items():
                setattr(provider, name, value)
            provider.full_clean()
            provider.save()
            counts.updated += 1
    return {p.name: p for p in Provider.objects.all()}


_KEY_FIELD_NAMES = {"key_id": "id", "allowed_models": "models"}


def _apply_keys(
    specs: list[_KeySpec],
    providers: dict[str, Provider],
    report: ImportReport,
    errors: list[str],
) -> None:
    counts = report.counts["keys"]
    for spec in specs:
        key = ApiKey.objects.select_related("provider").filter(key_id=spec.key_id).first()
        provider = providers[spec.provider]
        with _collect(errors, spec.path, _KEY_FIELD_NAMES):
            if key is None:
                if spec.secret is None:
                    errors.append(f"{spec.path}.secret: required for a new key")
                    continue
                key = ApiKey(key_id=spec.key_id, provider=provider, **spec.values)
                key.full_clean(exclude=["secret_encrypted", "secret_ref", "secret_hint"])
                # The service's own warnings repeat what parsing reported, without the path.
                api_key_save(api_key=key, secret=_secret_text(spec.secret))
                counts.created += 1
                continue
            changes = _diff(key, {**spec.values, "provider_id": provider.pk})
            new_secret = None
            if spec.secret is not None and not _secret_unchanged(key, spec, report):
                new_secret = _secret_text(spec.secret)
            if not changes and new_secret is None:
                counts.unchanged += 1
                continue
            for name, value in changes.items():
                setattr(key, name, value)
            key.full_clean(exclude=["secret_encrypted", "secret_ref", "secret_hint"])
            api_key_save(api_key=key, secret=new_secret)
            counts.updated += 1


def _secret_text(spec: SecretSpec) -> str:
    # Re-wrap so that a literal that happens to look like a reference stays a literal.
    return spec.value if spec.kind == "reference" else f"literal://{spec.value}"


def _secret_unchanged(key: ApiKey, spec: _KeySpec, report: ImportReport) -> bool:
    assert spec.secret is not None
    try:
        return api_key_secret_matches(api_key=key, spec=spec.secret)
    except SecretDecryptionError:
        # The stored ciphertext is unreadable with today's keys; the file's secret replaces it,
        # which is also how an operator repairs a lost encryption key.
        report.warnings.append(
            f"{spec.path}.secret: the stored secret could not be decrypted; replaced"
        )
        return False


def _apply_routes(
    specs: list[_RouteSpec],
    providers: dict[str, Provider],
    report: ImportReport,
    errors: list[str],
) -> None:
    counts = report.counts["routes"]
    for spec in specs:
        route = Route.objects.filter(name=spec.name).first()
        with _collect(errors, spec.path, {}):
            created = route is None
            current: list[tuple[str, str]] = []
            if route is None:
                route = Route(name=spec.name, **{"strategy": DEFAULT_STRATEGY, **spec.values})
                changes = spec.values
            else:
                changes = _diff(route, spec.values)
                for name, value in changes.items():
                    setattr(route, name, value)
                current = [
                    (d.provider.name, d.model)
                    for d in route.deployments.select_related("provider").order_by("position")
                ]
                if not changes and current == spec.deployments:
                    counts.unchanged += 1
                    continue
            route.full_clean()
            route.save()
            if current != spec.deployments:
                # Replaced rather than patched: positions are unique per route, and the file's
                # order is the fallback order.
                route.deployments.all().delete()
                Deployment.objects.bulk_create(
                    Deployment(route=route, position=i, provider=providers[p], model=m)
                    for i, (p, m) in enumerate(spec.deployments)
                )
            if created:
                counts.created += 1
            else:
                counts.updated += 1


def _apply_clients(specs: list[_ClientSpec], report: ImportReport, errors: list[str]) -> None:
    counts = report.counts["clients"]
    for spec in specs:
        client = ClientToken.objects.filter(name=spec.name).first()
        with _collect(errors, spec.path, {}):
            if client is None:
                client, token = client_token_create(
                    name=spec.name,
                    routes=spec.routes if spec.routes is not None else DEFAULT_CLIENT_ROUTES,
                    scopes=spec.scopes if spec.scopes is not None else DEFAULT_CLIENT_SCOPES,
                    token=spec.token,
                )
                if spec.token is None:
                    report.generated_tokens[spec.name] = token
                counts.created += 1
                continue
            if client.revoked_at is not None:
                report.warnings.append(
                    f"{spec.path}: client '{spec.name}' is revoked; importing does not reinstate it"
                )
            routes = spec.routes if spec.routes is not None else client.routes
            scopes = spec.scopes if spec.scopes is not None else client.scopes
            new_token = spec.token
            if new_token is not None and hmac.compare_digest(
                hash_token(new_token), client.token_hash
            ):
                new_token = None
            if routes == client.routes and scopes == client.scopes and new_token is None:
                counts.unchanged += 1
                continue
            client_token_update(client_token=client, routes=routes, scopes=scopes, token=new_token)
            counts.updated += 1


# ---------------------------------------------------------------------------------------------
# Export


def config_export() -> dict[str, Any]:
    """Everything as an importable document, without secrets.

    Keys whose secret is a reference keep it (a reference is not secret); keys stored encrypted
    come without `secret`, which an import into the same database accepts (the secret is kept)
    and an import elsewhere rejects until one is added. Clients come without tokens; revoked
    clients are left out.
    """
    keys = []
    for key in ApiKey.objects.select_related("provider").order_by("provider__name", "key_id"):
        entry: dict[str, Any] = {"id": key.key_id, "provider": key.provider.name}
        if key.secret_ref:
            entry["secret"] = key.secret_ref
        entry.update(
            priority=key.priority,
            weight=key.weight,
            models=list(key.allowed_models),
            enabled=key.enabled,
        )
        keys.append(entry)
    return {
        "version": CONFIG_VERSION,
        "providers": {
            p.name: {
                "kind": p.kind,
                "base_url": p.base_url,
                "cooldown_seconds": p.cooldown_seconds,
                "quarantine_seconds": p.quarantine_seconds,
                "exhausted_seconds": p.exhausted_seconds,
                "enabled": p.enabled,
            }
            for p in Provider.objects.order_by("name")
        },
        "keys": keys,
        "routes": {
            r.name: {
                "strategy": r.strategy,
                "enabled": r.enabled,
                "deployments": [
                    {"provider": d.provider.name, "model": d.model} for d in r.deployments.all()
                ],
            }
            for r in Route.objects.order_by("name").prefetch_related("deployments__provider")
        },
        "clients": [
            {"name": c.name, "routes": list(c.routes), "scopes": list(c.scopes)}
            for c in ClientToken.objects.filter(revoked_at__isnull=True).order_by("name")
        ],
    }
