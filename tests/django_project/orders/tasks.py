"""A reusable Django app's tasks: found by ``app.autodiscover_tasks()``.

``@sticky_task`` without ``app=`` is shared like ``@shared_task``: it binds to the
project's app (and installs celery-sticky on it).
"""

from typing import Any

from celery import shared_task

from celery_sticky import INJECTED, StateHandle, sticky_task


@sticky_task(key="order_id", bind=True, acks_late=True)
def add_item(
    self: Any, order_id: str, sku: str, *, state: StateHandle = INJECTED
) -> dict[str, Any]:
    state["items"] = [*state.get("items", []), sku]
    return {"node": self.request.hostname, "items": state["items"]}


@shared_task
def plain(x: int) -> int:
    return x * 2
