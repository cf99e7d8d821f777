"""Formatting for the dashboard templates: compact numbers, money, durations, rates, and the
colour ("tone") that goes with a key state, breaker state or call outcome.

Every filter answers an em dash for a missing value, so a template never has to ask first.
Numbers follow the page's language (Django's localisation: 1,234.5 in English, 1.234,5 in
German); units (ms, s, k, M, %) and the dollar sign stay as they are.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django import template
from django.utils.formats import number_format
from django.utils.translation import gettext_lazy as _

from llmrotate_site.dashboard.query import DashboardQuery
from usage.models import CLIENT_CLOSED_STATUS

register = template.Library()

NONE = "—"
EN_DASH = "\u2013"
MINUS = "\u2212"
# One palette for every state the dashboard shows: ok (green), warn (amber), bad (red),
# info (blue), muted (grey). The CSS defines `.tone-<name>` for badges, dots and bars.
TONES = {
    # key health (keys.health.KeyStatus)
    "active": "ok",
    "cooldown": "warn",
    "exhausted": "warn",
    "quarantined": "bad",
    "probing": "info",
    "disabled": "muted",
    # breaker (healthchecks.breaker.BreakerStatus) and probes (ProbeStatus)
    "ok": "ok",
    "closed": "ok",
    "half_open": "info",
    "open": "bad",
    "failed": "bad",
    "unknown": "muted",
    "unavailable": "muted",
    # pool (keys.selectors.pool_health) and endpoint health (healthchecks.models.Endpoint.health)
    "up": "ok",
    "degraded": "warn",
    "down": "bad",
    # call outcomes (usage.models.Outcome); the rest are "bad"
    "success": "ok",
    "client_error": "warn",
    "rate_limited": "warn",
    "client_disconnected": "muted",
}


@register.filter
def tone(state: object) -> str:
    if state is True:
        return "ok"
    if state is False:
        return "bad"
    return TONES.get(str(state), "bad" if state else "muted")


@register.filter
def health_tone(success_rate: float | None) -> str:
    """Green from 99 %, amber from 90 %, red below: how a success rate should look."""
    if success_rate is None:
        return "muted"
    return "ok" if success_rate >= 0.99 else "warn" if success_rate >= 0.9 else "bad"


# The states and outcomes the pages show, in the page's language (English: the name with
# spaces). A value not listed here (a newer outcome, say) shows as its name with spaces.
STATE_LABELS = {
    "active": _("active"),
    "cooldown": _("cooldown"),
    "exhausted": _("exhausted"),
    "quarantined": _("quarantined"),
    "probing": _("probing"),
    "disabled": _("disabled"),
    "ok": _("ok"),
    "closed": _("closed"),
    "half_open": _("half open"),
    "open": _("open"),
    "failed": _("failed"),
    "unknown": _("unknown"),
    "unavailable": _("unavailable"),
    "up": _("up"),
    "degraded": _("degraded"),
    "down": _("down"),
    "success": _("success"),
    "client_error": _("client error"),
    "rate_limited": _("rate limited"),
    "quota_exhausted": _("quota exhausted"),
    "auth_failed": _("auth failed"),
    "upstream_error": _("upstream error"),
    "timeout": _("timeout"),
    "connection_error": _("connection error"),
    "bad_response": _("bad response"),
    "stream_error": _("stream error"),
    "client_disconnected": _("client disconnected"),
    "gateway_error": _("gateway error"),
    "rate_limited_by_gateway": _("rate limited by gateway"),
    "budget_exceeded": _("budget exceeded"),
    "refused": _("refused"),
    "complete": _("complete"),
    "chat": _("chat"),
    "responses": _("responses"),
    "text_completion": _("text completion"),
    "embeddings": _("embeddings"),
    "per_request": _("per request"),
    "per_session": _("per session"),
    # limits' meters: what is counted, and over which window
    "requests": _("requests"),
    "tokens": _("tokens"),
    "usd": _("usd"),
    "minute": _("minute"),
    "day": _("day"),
    "month": _("month"),
}


@register.filter
def label(state: object) -> str:
    """`half_open` → `half open`, in the page's language."""
    if state in (None, ""):
        return NONE
    known = STATE_LABELS.get(str(state))
    return str(known) if known is not None else str(state).replace("_", " ")


def number(value: float, digits: int, *, grouping: bool = False) -> str:
    """`value` with `digits` decimals, written as the page's language writes numbers."""
    return number_format(round(value, digits), digits, force_grouping=grouping)


@register.filter
def compact(value: float | int | Decimal | None) -> str:
    """12 → 12, 12_345 → 12.3k, 1_234_567 → 1.23M."""
    if value is None:
        return NONE
    amount = float(value)
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(amount) >= size:
            scaled = amount / size
            digits = 2 if abs(scaled) < 10 else 1 if abs(scaled) < 100 else 0
            return f"{number(scaled, digits)}{suffix}"
    return number(amount, 0) if amount == int(amount) else number(amount, 1)


@register.filter
def usd(value: float | Decimal | None) -> str:
    """Dollars with the precision small amounts need: $1,234.56, $0.42, $0.0031."""
    if value is None:
        return NONE
    amount = float(value)
    if amount == 0:
        return "$0"
    if abs(amount) >= 1:
        return f"${number(amount, 2, grouping=True)}"
    if abs(amount) >= 0.01:
        return f"${number(amount, 3)}"
    return f"${number(amount, 4)}" if abs(amount) >= 0.0001 else f"<${number(0.0001, 4)}"


@register.filter
def ms(value: float | None) -> str:
    """850 ms, 1.24 s, 2.1 min."""
    if value is None:
        return NONE
    if value < 1000:
        return f"{number(value, 0)} ms"
    if value < 60_000:
        return f"{number(value / 1000, 2)} s"
    return f"{number(value / 60_000, 1)} min"


@register.filter
def ms_range(low: float | None, high: float | None) -> str:
    """40-62 ms with an en dash; each end with its own unit when they differ (850 ms - 1.24 s)."""
    if low is None or high is None:
        return NONE
    if high < 1000:
        return f"{number(low, 0)}{EN_DASH}{number(high, 0)} ms"
    return f"{ms(low)} {EN_DASH} {ms(high)}"


@register.filter
def pct(rate: float | None) -> str:
    """0.9876 → 98.8%; the exact ends stay whole (100%, 0%)."""
    if rate is None:
        return NONE
    percent = rate * 100
    if percent in (0, 100):
        return f"{number(percent, 0)}%"
    return f"{number(percent, 1)}%"


@register.filter
def share(part: float | int | None, whole: float | int | None) -> str:
    """Part of whole in percent, for bar widths (CSS: "33.3", whatever the page's language);
    0 without a whole."""
    return f"{100 * float(part or 0) / float(whole):.1f}" if whole else "0"


@register.filter
def iso(moment: datetime | None) -> str:
    """For the `data-` attributes the page's JS ticks from (countdowns, "ago")."""
    return moment.isoformat() if moment else ""


@register.simple_tag
def query_with(q: DashboardQuery, **changes: str | None) -> str:
    """`{% query_with q status="error" cursor=None %}`: this page's query with changes."""
    return q.with_params(**changes)


@register.filter
def signed_percent(percent: float | None) -> str:
    """4.2 → +4.2%, -10 → -10.0% (with a minus sign): a difference, so its sign always shows."""
    if percent is None:
        return NONE
    if round(percent, 1) == 0:
        return "0%"
    sign = "+" if percent > 0 else MINUS
    return f"{sign}{number(abs(percent), 1)}%"


@register.filter
def drift_tone(percent: float | None) -> str:
    """How far apart two token counts may be before it matters: tokenizers of one family
    differ by a few percent (message framing), a wrong family or a billing change by more."""
    if percent is None:
        return "muted"
    return "ok" if abs(percent) < 5 else "warn" if abs(percent) < 15 else "bad"


@register.filter
def status_tone(code: int | None) -> str:
    """The colour of an HTTP status a client got; a client that hung up is nobody's error."""
    if not code or code == CLIENT_CLOSED_STATUS:
        return "muted"
    return "ok" if code < 400 else "warn" if code < 500 else "bad"


@register.filter
def status_words(code: int | None) -> str:
    """The words beside a status code that needs them."""
    return str(_("client hung up")) if code == CLIENT_CLOSED_STATUS else ""
