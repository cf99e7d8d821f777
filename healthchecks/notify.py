"""Telling people that an endpoint's health changed: a log line, a Django signal, webhooks.

Each webhook gets the same JSON body, POSTed by a Celery task that retries with backoff, signed
with HMAC-SHA256 over the exact bytes of the body (docs/configuration.md shows how to verify):

    X-Llmrotate-Signature: sha256=<hex digest>
    X-Llmrotate-Timestamp: <unix seconds, also the body's "timestamp">

The body's `id` and `timestamp` are covered by the signature, so a receiver can refuse replays
(an id seen before, or a timestamp too old). Retries resend the same body, id included.

LLMROTATE_NOTIFICATIONS off stops the webhooks only (none queued, queued ones dropped by the
task): the log line is the operator's own record, and the signal never leaves the process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings

from common.redaction import base_url_masked
from healthchecks.signals import endpoint_health_changed

logger = logging.getLogger("llmrotate.health")

SIGNATURE_HEADER = "X-Llmrotate-Signature"
TIMESTAMP_HEADER = "X-Llmrotate-Timestamp"


class WebhookError(Exception):
    """The receiver answered, but not with a 2xx: worth retrying."""


def webhook_host(url: str) -> str:
    """Where a webhook goes, for logs: the host only. Chat webhooks (Slack, Discord, Teams) carry
    their secret in the path, so neither the path nor the query is shown."""
    host = urlsplit(url).netloc.rsplit("@", 1)[-1]
    return host or "(invalid webhook URL)"


def webhook_signature(*, secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def health_change_notify(
    *, endpoint: str, event: str, previous: str, current: str, reason: str, now: float | None = None
) -> dict[str, Any]:
    """Log, signal and queue webhooks for one change. Never raises for a delivery problem."""
    at = time.time() if now is None else now
    payload: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "event": event,
        "endpoint": base_url_masked(endpoint),
        "previous": previous,
        "current": current,
        "reason": reason,
        "timestamp": int(at),
        "occurred_at": datetime.fromtimestamp(at, UTC).isoformat(),
    }
    log = logger.info if event in ("endpoint.up", "breaker.closed") else logger.warning
    log("endpoint %s: %s (%s -> %s) %s", payload["endpoint"], event, previous, current, reason)
    endpoint_health_changed.send(sender=health_change_notify, payload=payload)
    _webhooks_queue(payload)
    return payload


def budget_alert_notify(
    *,
    label: str,
    period: str,
    percent: int,
    budget_usd: float,
    spent_usd: float,
    resets_at: float,
    **_: Any,
) -> dict[str, Any]:
    """A budget reached `percent` of itself this `period` (keys.limits.budget_check, which
    sends each share once per budget and period): a log line and the signed webhooks."""
    at = time.time()
    payload: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "event": "budget.threshold",
        "budget": label,
        "period": period,
        "percent": percent,
        "budget_usd": round(budget_usd, 6),
        "spent_usd": round(spent_usd, 6),
        "resets_at": datetime.fromtimestamp(resets_at, UTC).isoformat(),
        "timestamp": int(at),
        "occurred_at": datetime.fromtimestamp(at, UTC).isoformat(),
    }
    logger.warning(
        "budget of %s: %d%% of $%.4f per %s spent ($%.4f)",
        label,
        percent,
        budget_usd,
        period,
        spent_usd,
    )
    _webhooks_queue(payload)
    return payload


def _webhooks_queue(payload: dict[str, Any]) -> None:
    urls = settings.LLMROTATE_WEBHOOK_URLS if settings.LLMROTATE_NOTIFICATIONS else []
    if urls:
        from healthchecks.tasks import webhook_deliver

        body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        for url in urls:
            try:
                webhook_deliver.delay(url=url, body=body)
            except Exception:  # the broker is down: the change is logged and signalled anyway
                logger.exception("could not queue the webhook to %s", webhook_host(url))


def webhook_post(*, url: str, body: str) -> int:
    """POST one notification, signed. Raises httpx.HTTPError or WebhookError to be retried."""
    raw = body.encode()
    timestamp = str(json.loads(body).get("timestamp", int(time.time())))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "llmrotate-webhook",
        SIGNATURE_HEADER: webhook_signature(secret=settings.LLMROTATE_WEBHOOK_SECRET, body=raw),
        TIMESTAMP_HEADER: timestamp,
    }
    # trust_env=False: a webhook goes where the operator said, not through environment proxies.
    with httpx.Client(timeout=5.0, trust_env=False, follow_redirects=False) as client:
        response = client.post(url, content=raw, headers=headers)
    if not response.is_success:
        raise WebhookError(f"{webhook_host(url)} answered HTTP {response.status_code}")
    return response.status_code
