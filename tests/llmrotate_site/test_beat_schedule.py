"""The beat schedule: defined in code, written into django-celery-beat's tables, with the
operator's on/off switch in the admin respected."""

from __future__ import annotations

import pytest
from django_celery_beat.models import PeriodicTask

from llmrotate_site.beat import SyncedDatabaseScheduler, beat_schedule, beat_schedule_sync

pytestmark = pytest.mark.django_db
DISPATCH = "healthchecks: dispatch due probes"


def test_the_schedule_is_written_once_and_a_second_sync_changes_nothing(settings):
    settings.LLMROTATE_PROBE_TICK_SECONDS = 5
    assert len(beat_schedule_sync()) == len(beat_schedule()) == 4
    tasks = {t.name: t for t in PeriodicTask.objects.all()}
    assert tasks[DISPATCH].task == "healthchecks.probes_dispatch"
    assert tasks[DISPATCH].interval.every == 5 and tasks[DISPATCH].enabled
    assert tasks["keys: re-validate quarantined and exhausted keys"].interval.every == 300
    assert beat_schedule_sync() == []


def test_an_entry_switched_off_in_the_admin_stays_off(settings):
    beat_schedule_sync()
    PeriodicTask.objects.filter(name=DISPATCH).update(enabled=False)
    settings.LLMROTATE_PROBE_TICK_SECONDS = 2  # a code/settings change is still applied
    assert beat_schedule_sync() == [DISPATCH]
    task = PeriodicTask.objects.get(name=DISPATCH)
    assert not task.enabled and task.interval.every == 2


def test_every_entry_names_a_registered_task():
    from llmrotate_site.celery import app

    app.loader.import_default_modules()
    assert {e.task for e in beat_schedule()} <= set(app.tasks)


def test_beat_syncs_before_its_first_read_of_the_schedule(transactional_db):
    from llmrotate_site.celery import app

    scheduler = SyncedDatabaseScheduler(app=app, lazy=False)
    assert DISPATCH in scheduler.schedule


def test_a_run_that_waited_longer_than_its_interval_expires(settings):
    """A worker that was down comes back to at most one run of each entry, not to a backlog
    of every tick it missed (beat goes on sending while no worker takes them)."""
    settings.LLMROTATE_PROBE_TICK_SECONDS = 5
    beat_schedule_sync()
    tasks = {t.name: t for t in PeriodicTask.objects.all()}
    for entry in beat_schedule():
        assert tasks[entry.name].expire_seconds == max(1, round(entry.every_seconds))
    settings.LLMROTATE_PROBE_TICK_SECONDS = 7
    assert beat_schedule_sync() == [DISPATCH]
    assert PeriodicTask.objects.get(name=DISPATCH).expire_seconds == 7
