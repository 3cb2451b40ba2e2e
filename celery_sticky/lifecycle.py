"""Ending a workflow: its lease released, its local state and records deleted.

A workflow ends when a task calls ``state.finish()`` or is declared with
``ends_workflow=True`` (the deletion commits with the task), when
:func:`release` is called from outside, and when its key stays idle for
``sticky_idle_timeout`` seconds (passivation). The last two send celery-sticky's
own ``end_workflow`` task to the key, so the end runs on the owner, through the
per-key gate, after every task already queued for the key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, current_app

from .errors import LeaseStoreUnavailable
from .events import ownership_changed

logger = logging.getLogger(__name__)

END_WORKFLOW = "celery_sticky.end_workflow"


def end_lease(
    app: Celery, workflow: str, key: str, owner: str, epoch: int = 0, send: Any = None
) -> None:
    """Release ``owner``'s lease of the key after its workflow ended."""
    from .app import lease_store, router_of
    from .handoff import handoff_store
    from .settings import get_config

    try:
        leases = lease_store(app)
        # A replicated copy of an ended workflow must not come back to life.
        handoff_store(get_config(app), leases).delete(workflow, key)
        leases.release(workflow, key, owner=owner)
    except LeaseStoreUnavailable as exc:
        # The state is gone already; the lease lapses with the owner or moves on.
        logger.warning("sticky: could not release %s:%s: %s", workflow, key, exc)
    router = router_of(app)
    if router is not None:
        router.forget(workflow, key)
    ownership_changed("released", workflow, key, epoch, owner, send=send)


def release(workflow: str, key: str, *, app: Celery | None = None) -> Any:
    """End a workflow from outside: release its lease and delete its local state.

    Returns the ``AsyncResult`` of the ``end_workflow`` task sent to the key's
    owner (it runs after every task already queued for the key), or None when
    nobody holds the key.
    """
    from .app import lease_store

    app = app or current_app
    if lease_store(app).lookup(workflow, key) is None:
        return None
    return app.tasks[END_WORKFLOW].apply_async(kwargs={"workflow": workflow, "key": key})


def passivate(
    app: Celery, queue: str, idle: dict[tuple[str, str], float], idle_timeout: float
) -> int:
    """Send ``end_workflow`` for every key idle longer than ``idle_timeout``.

    ``idle`` maps keys with no task queued or running to the monotonic time
    their last task ended; passivated keys are removed from it. The task itself
    checks again, against the key's last commit, before ending anything.
    """
    now = time.monotonic()
    sent = 0
    for (workflow, key), since in list(idle.items()):
        if now - since < idle_timeout:
            continue
        del idle[(workflow, key)]
        app.tasks[END_WORKFLOW].apply_async(
            kwargs={"workflow": workflow, "key": key, "idle_since": time.time() - idle_timeout},
            queue=queue,
        )
        sent += 1
    return sent
