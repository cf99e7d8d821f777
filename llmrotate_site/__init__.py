# Loaded with Django so that `@shared_task`s bind to this app in every process.
from llmrotate_site.celery import app as celery_app

__all__ = ("celery_app",)
