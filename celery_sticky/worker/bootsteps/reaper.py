"""The ``Sticky reaper`` worker step: every worker reaps dead workers' queues.

A thin adapter around :class:`celery_sticky.worker.reaper.Reaper`: started after
the node registered, stopped (reverse order) before the node marks itself
draining, so a draining worker reaps nobody.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from ..reaper import Reaper


class ReaperStep(bootsteps.StartStopStep):  # type: ignore[misc]
    label = "Sticky reaper"
    requires = ("celery_sticky.worker.bootsteps.node:StickyWorker",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        node = worker.sticky.node
        self.reaper = Reaper(
            worker.app, node.store, node.name, min(1.0, node.config.heartbeat_interval)
        )

    def start(self, worker: Any) -> None:
        self.reaper.start()

    def stop(self, worker: Any) -> None:
        self.reaper.stop()

    shutdown = stop
