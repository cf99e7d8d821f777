"""Celery tasks: thin adapters over healthchecks.services (and healthchecks.key_recheck for keys).

The beat schedule that runs the periodic ones is in llmrotate_site/beat.py.
"""

from __future__ import annotations

import logging

from celery import Task, shared_task
from django.conf import settings

from healthchecks import services

logger = logging.getLogger("llmrotate.health")


@shared_task(name="healthchecks.probes_dispatch", ignore_result=True)
def probes_dispatch() -> int:
    def send(endpoint_id: int, kind: str) -> None:
        # A probe that waited longer than a tick in a backed-up queue is stale: the next tick
        # sends a fresh one.
        probe_run.apply_async(
            kwargs={"endpoint_id": endpoint_id, "kind": kind},
            expires=max(settings.LLMROTATE_PROBE_TICK_SECONDS * 2, 30),
        )

    return services.probes_dispatch(send=send)


@shared_task(name="healthchecks.probe_run", ignore_result=True)
def probe_run(*, endpoint_id: int, kind: str) -> None:
    services.endpoint_probe(endpoint_id=endpoint_id, kind=kind)


@shared_task(name="healthchecks.health_events_prune", ignore_result=True)
def health_events_prune() -> int:
    return services.health_events_prune()


@shared_task(name="healthchecks.keys_revalidate", ignore_result=True)
def keys_revalidate() -> int:
    from healthchecks.key_recheck import keys_revalidate_blocking

    if not settings.REDIS_URL:
        # Embedded mode keeps key state inside the web process, out of this worker's sight;
        # the web process runs the same re-validation itself, on this task's beat entry
        # (healthchecks/key_recheck.py keys_revalidate_forever).
        logger.debug("key re-validation runs in the web process in embedded mode")
        return 0
    return len(keys_revalidate_blocking())


@shared_task(
    name="healthchecks.webhook_deliver",
    ignore_result=True,
    bind=True,
    max_retries=None,  # bounded below by LLMROTATE_WEBHOOK_RETRIES, read at run time
)
def webhook_deliver(self: Task, *, url: str, body: str) -> None:
    import httpx

    from healthchecks.notify import WebhookError, webhook_host, webhook_post

    if not settings.LLMROTATE_NOTIFICATIONS:
        # Queued (or waiting to be retried) before notifications were switched off.
        logger.info("notifications are off: webhook to %s dropped", webhook_host(url))
        return
    try:
        webhook_post(url=url, body=body)
    except (httpx.HTTPError, WebhookError) as exc:
        attempt = self.request.retries
        if attempt >= settings.LLMROTATE_WEBHOOK_RETRIES:
            logger.error("webhook to %s failed for good: %s", webhook_host(url), exc)
            return
        delay = min(2 ** (attempt + 1), 300)  # 2, 4, 8 … seconds, at most five minutes
        logger.warning("webhook to %s failed (%s); retrying in %ss", webhook_host(url), exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
