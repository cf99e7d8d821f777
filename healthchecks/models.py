"""Upstream endpoints (one per provider base URL), their probe results and breaker rows.

Endpoints are created and removed by `healthchecks.services.endpoints_sync` as providers come
and go; operators only tune how each one is probed. The probe result fields are written by the
probes and shown read-only.
"""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from common.redaction import base_url_masked


class ProbeKind(models.TextChoices):
    PING = "ping", _("ICMP ping")
    HTTP = "http", "HTTP"


def probe_kind_switched_on(kind: str) -> bool:
    """Do the settings allow this kind of probe at all (LLMROTATE_HEALTH_CHECKS, and
    LLMROTATE_PING_PROBES / LLMROTATE_HTTP_PROBES), before each endpoint's own switch?"""
    if not settings.LLMROTATE_HEALTH_CHECKS:
        return False
    if kind == ProbeKind.PING:
        return bool(settings.LLMROTATE_PING_PROBES)
    return bool(settings.LLMROTATE_HTTP_PROBES)


class ProbeStatus(models.TextChoices):
    UNKNOWN = "unknown", _("not probed yet")
    OK = "ok", _("ok")
    FAILED = "failed", _("failed")
    # ICMP needs a socket the kernel may refuse (no root, ping_group_range): health then rests
    # on the HTTP probe alone.
    UNAVAILABLE = "unavailable", _("unavailable here")
    DISABLED = "disabled", _("disabled")


class Endpoint(models.Model):
    base_url = models.CharField(
        _("base URL"),
        max_length=500,
        unique=True,
        editable=False,
        help_text=_("A provider base URL, without a trailing slash."),
    )
    enabled = models.BooleanField(default=True, help_text=_("Probe this endpoint at all."))
    ping_enabled = models.BooleanField(_("ping"), default=True)
    ping_interval_seconds = models.PositiveIntegerField(
        _("ping every (s)"), default=30, validators=[MinValueValidator(1)]
    )
    ping_failure_threshold = models.PositiveIntegerField(
        _("ping failures to trip"), default=3, validators=[MinValueValidator(1)]
    )
    http_enabled = models.BooleanField(_("HTTP probe"), default=True)
    http_interval_seconds = models.PositiveIntegerField(
        _("HTTP probe every (s)"), default=60, validators=[MinValueValidator(1)]
    )
    http_failure_threshold = models.PositiveIntegerField(
        _("HTTP failures to trip"), default=2, validators=[MinValueValidator(1)]
    )
    http_url = models.URLField(
        _("HTTP probe URL"),
        max_length=500,
        blank=True,
        default="",
        help_text=_("Empty: an authenticated GET {base URL}/models, which spends no tokens."),
    )
    http_expected_status = models.PositiveSmallIntegerField(
        _("expected status"),
        null=True,
        blank=True,
        help_text=_(
            "Empty: any answer below 500 is up. 401/403 never count as down: they say the key "
            "is bad, not the endpoint."
        ),
    )
    http_timeout_seconds = models.FloatField(
        _("HTTP timeout (s)"), default=5.0, validators=[MinValueValidator(0.1)]
    )

    # Written by the probes.
    ping_status = models.CharField(
        max_length=16, choices=ProbeStatus.choices, default=ProbeStatus.UNKNOWN, editable=False
    )
    http_status = models.CharField(
        max_length=16, choices=ProbeStatus.choices, default=ProbeStatus.UNKNOWN, editable=False
    )
    ping_failures = models.PositiveIntegerField(
        _("consecutive ping failures"), default=0, editable=False
    )
    http_failures = models.PositiveIntegerField(
        _("consecutive HTTP failures"), default=0, editable=False
    )
    last_latency_ms = models.FloatField(null=True, blank=True, editable=False)
    last_checked_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The last probe of each kind that succeeded: /metrics exports them, so that an alert
    # notices probes that stopped (a dead beat or worker), not only probes that fail.
    last_ping_ok_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_http_ok_at = models.DateTimeField(null=True, blank=True, editable=False)
    # None until a probe has said something; False while the probes say it is down, which
    # opens its breaker (healthchecks.services: failed pings alone do not, see `health`).
    is_up = models.BooleanField(_("up"), null=True, editable=False)
    last_change_at = models.DateTimeField(null=True, blank=True, editable=False)
    # When the dispatcher sends the next probe of each kind (claimed atomically, see services).
    next_ping_at = models.DateTimeField(null=True, blank=True, editable=False)
    next_http_at = models.DateTimeField(null=True, blank=True, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["base_url"]

    def __str__(self) -> str:
        # Shown by the admin (and kept in its change log), and by any log line or error that
        # formats an endpoint: never the credentials a base URL may hold.
        return base_url_masked(self.base_url)

    @property
    def probe_url(self) -> str:
        return self.http_url or f"{self.base_url}/models"

    @property
    def ping_on(self) -> bool:
        """Pinged: switched on here and by the settings."""
        return self.ping_enabled and probe_kind_switched_on(ProbeKind.PING)

    @property
    def http_on(self) -> bool:
        return self.http_enabled and probe_kind_switched_on(ProbeKind.HTTP)

    @property
    def ping_down(self) -> bool:
        """The pings (still switched on) have failed their threshold in a row."""
        return self.ping_on and self.ping_failures >= self.ping_failure_threshold

    @property
    def http_down(self) -> bool:
        """The HTTP probes (still switched on) have failed their threshold in a row."""
        return self.http_on and self.http_failures >= self.http_failure_threshold

    @property
    def health(self) -> str:
        """unknown, up, down, or degraded: pings fail their threshold but the HTTP probe gets
        answers (many providers filter ICMP), so the endpoint stays in routing."""
        if self.is_up is None:
            return "unknown"
        if not self.is_up:
            return "down"
        return "degraded" if self.ping_down else "up"


class HealthEvent(models.Model):
    """One probe result."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=8, choices=ProbeKind.choices)
    ok = models.BooleanField()
    status = models.CharField(max_length=16, choices=ProbeStatus.choices)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["endpoint", "created_at"], name="healthevent_endpoint_time")
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.kind} {self.status}"


class BreakerRecord(models.Model):
    """The breaker state of one endpoint in embedded mode (Redis holds it when scaled out).

    Keyed by the base URL rather than by Endpoint: the proxy may trip a breaker before the
    worker has created the endpoint's row.
    """

    endpoint = models.CharField(max_length=500, unique=True)
    state = models.TextField(default="{}")  # BreakerState.to_json()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return base_url_masked(self.endpoint)
