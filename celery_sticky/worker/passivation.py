"""Passivation: ending the workflows of keys that stayed idle for ``sticky_idle_timeout``.

Akka Cluster Sharding passivates idle entities; here an idle key's workflow
ends as if a task had called ``state.finish()``: its lease is released and its
local state deleted. The worker's gate records when each key's last task ended;
:func:`passivate` sends celery-sticky's own ``end_workflow`` task to the keys idle
for longer than the timeout, through the worker's own queue, so the end runs in
the key's line. The task checks again, against the key's last commit, before
ending anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..producer.own_tasks import END_WORKFLOW, own_task


def passivate(
    app: Any,
    queue: str,
    idle: dict[tuple[str, str], float],
    idle_timeout: float,
    busy: Callable[[], set[tuple[str, str]]] = set,
) -> int:
    """Send ``end_workflow`` for every key idle longer than ``idle_timeout``.

    ``idle`` maps keys with no task queued or running to the monotonic time
    their last task ended; passivated keys are removed from it. ``busy()`` names
    the keys with a task waiting here all the same (a countdown, ETA or retry on
    the worker's timer, or queued in the gate): those are not idle, and stay in
    ``idle`` to be looked at again.
    """
    now = time.monotonic()
    sent = 0
    end_workflow = own_task(app, END_WORKFLOW)
    due = [(k, since) for k, since in list(idle.items()) if now - since >= idle_timeout]
    waiting = busy() if due else set()
    for (workflow, key), _since in due:
        if (workflow, key) in waiting:
            continue
        idle.pop((workflow, key), None)
        end_workflow.apply_async(
            kwargs={"workflow": workflow, "key": key, "idle_since": time.time() - idle_timeout},
            queue=queue,
        )
        sent += 1
    return sent
