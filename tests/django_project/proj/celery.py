"""The project's Celery app, as Celery's Django guide writes it."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.proj.settings")

app = Celery("proj")
# Every CELERY_* setting of Django's settings, celery-sticky's CELERY_STICKY_* included.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
