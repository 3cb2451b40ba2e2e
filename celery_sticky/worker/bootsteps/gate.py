"""The ``Sticky gate`` consumer step: the gate and broker reconnects.

Consumer steps restart on every broker reconnect. When the connection goes,
kombu restores the messages the gate holds but has not started; the gate
forgets them (they come back). At shutdown, first send the acknowledgements
the consumer still holds back.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps


class StickyConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """On a broker reconnect, forget gate entries whose messages come back anyway."""

    label = "Sticky gate"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def stop(self, consumer: Any) -> None:
        step = getattr(consumer.controller, "sticky", None)
        if step is not None:
            step.gate.forget_unstarted()

    def shutdown(self, consumer: Any) -> None:
        # Without an event loop (gevent, eventlet pools) Celery 5.3 queues acks as
        # pending operations, run only between two polls of the broker, and closes the
        # connection without running the last ones (celery#5663): the broker restores
        # messages whose tasks already ran and the drain runs them again on the keys'
        # next owners. This step shuts down before the Connection step: send them now.
        consumer.perform_pending_operations()
        self.stop(consumer)
