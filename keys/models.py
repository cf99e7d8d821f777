"""Providers, upstream keys, routes with their fallback chains, and client tokens.

Health state (cooldowns, quarantine, counters) is not here: it changes on every call, so it
lives in the key state store (in process, or Redis when scaled out). See keys/state_store.py.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models

from keys.strategies import STRATEGIES

slug_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
    "Use letters, digits, '.', '_', ':' and '-', starting with a letter or digit.",
)


def validate_base_url(value: str) -> None:
    """What the proxy can append paths to. httpx would send userinfo as Basic auth instead of
    the key, and `/chat/completions` appended after a query or fragment would land in it."""
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValidationError("Enter a valid URL.") from None
    if parts.scheme not in ("http", "https"):
        raise ValidationError("base_url must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValidationError("base_url must not contain credentials; put the key in an API key")
    if "?" in value or "#" in value:  # even an empty one: `https://host/v1?`
        raise ValidationError("base_url must not contain a query string or fragment")


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI"
        ANTHROPIC = "anthropic", "Anthropic"
        OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible (vLLM, Ollama, …)"

    name = models.CharField(max_length=64, unique=True, validators=[slug_validator])
    kind = models.CharField(max_length=32, choices=Kind.choices, default=Kind.OPENAI)
    base_url = models.URLField(
        max_length=500,
        validators=[validate_base_url],
        help_text="Including the version prefix, e.g. https://api.openai.com/v1",
    )
    enabled = models.BooleanField(default=True)
    cooldown_seconds = models.PositiveIntegerField(
        default=30, help_text="Cooldown after a 429 that carries no Retry-After."
    )
    quarantine_seconds = models.PositiveIntegerField(
        default=300,
        help_text="After a 401/403 the key waits this long, then must pass a re-check.",
    )
    exhausted_seconds = models.PositiveIntegerField(
        default=3600, help_text="Pause after a quota or billing error."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    """An upstream provider key.

    The secret is one of: Fernet ciphertext (`secret_encrypted`), or a reference
    (`secret_ref`, `env://NAME` or `file://path`) whose value never enters the database.
    """

    key_id = models.CharField(
        "key id",
        max_length=64,
        unique=True,
        validators=[slug_validator],
        help_text="Stable name used in logs and records, e.g. openai-1.",
    )
    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="keys")
    secret_encrypted = models.TextField(blank=True, default="", editable=False)
    secret_ref = models.CharField(max_length=500, blank=True, default="", editable=False)
    # Masked form computed when the secret was set, so lists never need to decrypt.
    secret_hint = models.CharField(max_length=64, blank=True, default="", editable=False)
    enabled = models.BooleanField(default=True)
    priority = models.IntegerField(default=0, help_text="Lower numbers are tried first.")
    weight = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1)], help_text="Share for weighted strategies."
    )
    allowed_models = models.JSONField(
        "models",
        default=list,
        blank=True,
        help_text="Upstream models this key may serve. Empty means all.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider__name", "priority", "key_id"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return self.key_id


class Route(models.Model):
    """What clients ask for (the `model` of a request) and where it may go, in order."""

    name = models.CharField(
        max_length=200, unique=True, help_text="The model name clients send, e.g. gpt-4o-mini."
    )
    strategy = models.CharField(max_length=32, choices=STRATEGIES, default="health_aware")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Deployment(models.Model):
    """One step of a route's fallback chain: a provider and the model name it knows."""

    route = models.ForeignKey(Route, on_delete=models.CASCADE, related_name="deployments")
    position = models.PositiveIntegerField(default=0)
    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="deployments")
    model = models.CharField(max_length=200, help_text="Model name sent upstream.")

    class Meta:
        ordering = ["route", "position", "id"]
        constraints = [
            models.UniqueConstraint(fields=["route", "position"], name="deployment_position")
        ]

    def __str__(self) -> str:
        return f"{self.provider.name}/{self.model}"


class ClientToken(models.Model):
    """A credential for callers of the gateway. Only a hash is stored; the token is shown once."""

    class Scope(models.TextChoices):
        PROXY = "proxy", "proxy (call models)"
        MONITOR = "monitor", "monitor (read the monitoring API)"

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    token_hash = models.CharField(max_length=64, editable=False)
    routes = models.JSONField(
        default=list, blank=True, help_text='Route names this token may use; ["*"] for all.'
    )
    scopes = models.JSONField(default=list, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def masked(self) -> str:
        return f"llmr_{self.prefix}_…"
