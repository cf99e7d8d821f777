"""factory_boy factories for the models tests need most.

Secrets are generated per instance and stored the way the services store them (encrypted,
hashed); the plaintext stays on the instance as `raw_secret` / `raw_token` for assertions.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import factory
from django.utils import timezone
from factory.django import DjangoModelFactory

from common.redaction import mask_secret
from keys.crypto import encrypt_secret, generate_client_token, hash_token
from keys.models import ApiKey, ClientToken, Deployment, Provider, Route
from keys.services import client_token_lookup_prefix
from usage.models import CallRecord, Outcome, UsageSource


class _KeepsPlaintext(DjangoModelFactory):  # type: ignore[misc]
    """Pops a declared plaintext attribute before the model sees it, then puts it back on the
    instance, so `factory.create()` returns an object that still knows its own secret."""

    class Meta:
        abstract = True

    _plaintext_attribute = ""

    @classmethod
    def _create(cls, model_class: type, *args: Any, **kwargs: Any) -> Any:
        plaintext = kwargs.pop(cls._plaintext_attribute)
        obj = super()._create(model_class, *args, **kwargs)
        setattr(obj, cls._plaintext_attribute, plaintext)
        return obj

    @classmethod
    def _build(cls, model_class: type, *args: Any, **kwargs: Any) -> Any:
        plaintext = kwargs.pop(cls._plaintext_attribute)
        obj = super()._build(model_class, *args, **kwargs)
        setattr(obj, cls._plaintext_attribute, plaintext)
        return obj


class ProviderFactory(DjangoModelFactory):  # type: ignore[misc]
    class Meta:
        model = Provider
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"provider-{n}")
    kind = Provider.Kind.OPENAI
    base_url = factory.LazyAttribute(lambda o: f"https://{o.name}.example.test/v1")


class ApiKeyFactory(_KeepsPlaintext):
    class Meta:
        model = ApiKey

    _plaintext_attribute = "raw_secret"

    key_id = factory.Sequence(lambda n: f"key-{n}")
    provider = factory.SubFactory(ProviderFactory)
    raw_secret = factory.LazyFunction(lambda: f"sk-test-{secrets.token_urlsafe(24)}")
    secret_encrypted = factory.LazyAttribute(lambda o: encrypt_secret(o.raw_secret))
    secret_hint = factory.LazyAttribute(lambda o: mask_secret(o.raw_secret))


class DeploymentFactory(DjangoModelFactory):  # type: ignore[misc]
    class Meta:
        model = Deployment

    route = factory.SubFactory("tests.factories.RouteFactory", deployments=[])
    position = factory.Sequence(lambda n: n)
    provider = factory.SubFactory(ProviderFactory)
    model = "gpt-4o-mini"


class RouteFactory(DjangoModelFactory):  # type: ignore[misc]
    """A route; `deployments=[(provider, "model"), …]` sets its chain (default: one step on a
    new provider, with the route's own name as the upstream model)."""

    class Meta:
        model = Route
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"model-{n}")

    @factory.post_generation
    def deployments(
        obj: Route,  # factory_boy passes the instance first, in place of self
        create: bool,
        extracted: list[tuple[Provider, str]] | None,
        **kwargs: Any,
    ) -> None:
        if not create:
            return
        chain = extracted if extracted is not None else [(ProviderFactory(), obj.name)]
        for position, (provider, model) in enumerate(chain):
            Deployment.objects.create(route=obj, position=position, provider=provider, model=model)


class ClientTokenFactory(_KeepsPlaintext):
    class Meta:
        model = ClientToken

    _plaintext_attribute = "raw_token"

    name = factory.Sequence(lambda n: f"client-{n}")
    raw_token = factory.LazyFunction(lambda: generate_client_token()[0])
    prefix = factory.LazyAttribute(lambda o: client_token_lookup_prefix(o.raw_token))
    token_hash = factory.LazyAttribute(lambda o: hash_token(o.raw_token))
    routes = factory.LazyFunction(lambda: ["*"])
    scopes = factory.LazyFunction(lambda: [ClientToken.Scope.PROXY.value])


class CallRecordFactory(DjangoModelFactory):  # type: ignore[misc]
    class Meta:
        model = CallRecord

    request_id = factory.Sequence(lambda n: f"req-{n:08d}")
    attempt = 1
    started_at = factory.LazyFunction(timezone.now)
    finished_at = factory.LazyAttribute(
        lambda o: o.started_at + timedelta(milliseconds=o.latency_ms)
    )
    client = "client-0"
    requested_model = "gpt-4o-mini"
    provider = "openai"
    upstream_model = factory.LazyAttribute(lambda o: o.requested_model)
    key_id = "openai-1"
    status_code = 200
    outcome = Outcome.SUCCESS
    prompt_tokens = 12
    completion_tokens = 30
    total_tokens = factory.LazyAttribute(lambda o: o.prompt_tokens + o.completion_tokens)
    usage_source = UsageSource.REPORTED
    latency_ms = 420.0
    ttft_ms = 180.0
