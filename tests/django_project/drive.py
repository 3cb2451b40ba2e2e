"""The producer side, as a Django process would be (``python -m tests.django_project.drive``):
publishes through the project's app and prints what came back, as JSON."""

import json
import sys

import django

django.setup()

from celery_sticky.context import get_config  # noqa: E402
from tests.django_project.orders.tasks import add_item, plain  # noqa: E402
from tests.django_project.proj import celery_app  # noqa: E402

order = sys.argv[1]
config = get_config(celery_app)
first = add_item.delay(order, "sku-1").get(timeout=30)
second = add_item.delay(order, "sku-2").get(timeout=30)
print(
    json.dumps(
        {
            "key_prefix": config.key_prefix,
            "queue_prefix": config.queue_prefix,
            "first": first,
            "second": second,
            "plain": plain.delay(21).get(timeout=30),
            "tasks": sorted(t for t in celery_app.tasks if not t.startswith("celery.")),
        }
    )
)
