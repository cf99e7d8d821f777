"""The Celery app: `celery -A llmrotate_site worker` / `beat`, or all of it via `manage.py serve`.

Configuration is the `CELERY_*` settings (llmrotate_site/settings.py, "Celery" section): Redis as
the broker when REDIS_URL is set, otherwise kombu's filesystem transport under the data
directory, so that a fresh clone needs no broker service. Tasks are found in each app's
`tasks.py`. The beat schedule lives in llmrotate_site/beat.py, whose scheduler writes it into
django-celery-beat's tables when beat starts.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmrotate_site.settings")

app = Celery("llmrotate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
