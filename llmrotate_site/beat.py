"""The beat schedule: defined here, written into django-celery-beat's tables when beat starts.

Operators see the entries in the admin (Periodic tasks) and may switch any of them off, and
that sticks: the sync sets each entry's task, interval and description from this code (the
intervals come from settings), and never touches `enabled`.

Run exactly one beat process. Two would each send every entry, so probes would run twice as
often and notifications could be doubled.

One entry is also read by the web process: in embedded mode key state lives there, so it runs
the key re-validation itself (healthchecks/key_recheck.py), on that entry's switch and interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler

logger = logging.getLogger("llmrotate")


KEYS_REVALIDATE_ENTRY = "keys: re-validate quarantined and exhausted keys"


@dataclass(frozen=True)
class BeatEntry:
    name: str
    task: str
    every_seconds: float
    description: str


def beat_schedule() -> list[BeatEntry]:
    return [
        BeatEntry(
            "healthchecks: dispatch due probes",
            "healthchecks.probes_dispatch",
            settings.LLMROTATE_PROBE_TICK_SECONDS,
            "Sends the ping and HTTP probes that are due; each endpoint's intervals are set on "
            "the endpoint (Health checks → Endpoints). LLMROTATE_HEALTH_CHECKS, "
            "LLMROTATE_PING_PROBES and LLMROTATE_HTTP_PROBES switch them off everywhere; this "
            "entry then still advances the circuit breakers, so leave it on.",
        ),
        BeatEntry(
            KEYS_REVALIDATE_ENTRY,
            "healthchecks.keys_revalidate",
            settings.LLMROTATE_KEY_REVALIDATE_SECONDS,
            "GET /models with each quarantined (wait over) or exhausted key; success moves it "
            "to probing. In embedded mode the web process does this itself, following this "
            "entry's switch and interval.",
        ),
        BeatEntry(
            "healthchecks: prune old probe results",
            "healthchecks.health_events_prune",
            3600,
            "Deletes probe results older than LLMROTATE_HEALTH_EVENT_RETENTION_DAYS.",
        ),
        BeatEntry(
            "usage: prune old call records",
            "usage.usage_prune",
            3600,
            "Deletes call records and minute rollups older than LLMROTATE_USAGE_RETENTION_DAYS "
            "(0: keep forever); hourly and daily rollups stay. Also deletes wire-capture files "
            "past LLMROTATE_CAPTURE_RETENTION_HOURS or LLMROTATE_CAPTURE_MAX_TOTAL_BYTES.",
        ),
    ]


def beat_schedule_sync() -> list[str]:
    """Create or update the code-defined entries; returns the names that changed."""

    changed = []
    with transaction.atomic():
        for entry in beat_schedule():
            interval, _ = IntervalSchedule.objects.get_or_create(
                every=max(1, round(entry.every_seconds)), period=IntervalSchedule.SECONDS
            )
            # A run that waited in the broker longer than its interval (the worker was down)
            # is dropped: the next one is due anyway, and a restarted worker must not work
            # through a backlog of them all at once.
            expire = max(1, round(entry.every_seconds))
            wanted = {
                "task": entry.task,
                "interval": interval,
                "description": entry.description,
                "expire_seconds": expire,
            }
            task = PeriodicTask.objects.filter(name=entry.name).first()
            if task is None:
                PeriodicTask.objects.create(name=entry.name, **wanted)
            elif (task.task, task.interval_id, task.description, task.expire_seconds) != (
                entry.task,
                interval.pk,
                entry.description,
                expire,
            ):
                for field, value in wanted.items():
                    setattr(task, field, value)
                # The code's interval replaces any other kind of schedule set by hand.
                task.crontab = task.solar = task.clocked = None
                task.save()
            else:
                continue
            changed.append(entry.name)
    if changed:
        logger.info("beat schedule synced: %s", ", ".join(changed))
    return changed


def beat_entry_schedule(*, name: str) -> tuple[bool, float | None] | None:
    """(enabled, interval in seconds) of one entry as the admin has it; the interval is None
    when the entry runs on another kind of schedule. None when beat has not written it yet."""
    task = PeriodicTask.objects.filter(name=name).select_related("interval").first()
    if task is None:
        return None
    every = task.interval.schedule.run_every.total_seconds() if task.interval else None
    return task.enabled, every


class SyncedDatabaseScheduler(DatabaseScheduler):
    """django-celery-beat's scheduler, syncing the code's entries before its first read.

    Before, not after: the scheduler takes the first change timestamp it sees as its baseline,
    so entries written once it is running would only be noticed at the next unrelated change.
    """

    def setup_schedule(self) -> None:
        beat_schedule_sync()
        super().setup_schedule()


def keys_revalidation_schedule(*, default: float) -> tuple[bool, float]:
    """(enabled, seconds) of the key re-validation entry, for the embedded web process's own
    loop (healthchecks.key_recheck); `default` and on until beat has written the entry."""
    entry = beat_entry_schedule(name=KEYS_REVALIDATE_ENTRY)
    if entry is None:
        return True, default
    enabled, every = entry
    return enabled, default if every is None else every
