"""Django settings: Celery's and celery-sticky's under the CELERY_ namespace.

Redis, the key prefix and the state directory come from the test session's
environment (tests/conftest.py), so the test and its worker agree.
"""

import os

SECRET_KEY = "celery-sticky-django-test"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["tests.django_project.orders"]
DATABASES: dict[str, dict[str, str]] = {}

_redis = os.environ["STICKY_TEST_REDIS_URL"]
_prefix = os.environ["STICKY_TEST_PREFIX"] + "dj"

CELERY_BROKER_URL = os.environ.get("STICKY_TEST_BROKER_URL") or _redis
CELERY_RESULT_BACKEND = _redis
CELERY_TASK_DEFAULT_QUEUE = f"{_prefix}.default"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_STICKY_REDIS_URL = _redis  # the lease store (the broker may be RabbitMQ)
CELERY_STICKY_KEY_PREFIX = _prefix
CELERY_STICKY_QUEUE_PREFIX = _prefix
CELERY_STICKY_SECRET = f"{_prefix}-hand-over-secret"
CELERY_STICKY_STATE_DIR = os.environ["STICKY_TEST_STATE_DIR"]
CELERY_STICKY_LEASE_TTL = 10
