"""The ``Sticky passivation`` worker step, on when ``sticky_idle_timeout`` is set.

Asks :func:`celery_sticky.worker.passivation.passivate` on the worker's timer, at
half the timeout (at most every minute), to end the workflows of idle keys.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from ...context import get_config
from ..passivation import passivate


class PassivationStep(bootsteps.StartStopStep):  # type: ignore[misc]
    label = "Sticky passivation"
    requires = ("celery_sticky.worker.bootsteps.node:StickyWorker",)

    def include_if(self, worker: Any) -> bool:
        return get_config(worker.app).idle_timeout is not None

    def start(self, worker: Any) -> None:
        step = worker.sticky
        idle_timeout = step.node.config.idle_timeout
        worker.timer.call_repeatedly(
            min(idle_timeout / 2, 60.0),
            passivate,
            (worker.app, step.node.queue, step.gate.idle, idle_timeout, step.gate.keys_with_tasks),
        )
