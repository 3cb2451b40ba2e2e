"""The ``Sticky gate`` consumer step: the gate and broker reconnects.

Consumer steps restart on every broker reconnect. When the connection goes,
kombu restores the messages the gate holds but has not started; the gate
forgets them (they come back). On Redis that restore runs on the connection
that just failed, so it fails too when the broker is unreachable, and the
messages would stay marked unacknowledged until ``visibility_timeout`` (an hour
by default): once reconnected, the worker takes back what is still marked for
its direct queue, in delivery order, before it consumes anything newer (the
gate then runs each producer's messages in sequence order). With reliable
delivery (:mod:`..delivery`) that is its whole in-flight lists (the direct
queue's and the shared queues'), messages of tasks still running included: their
copies come back, and the gate holds them as copies of a running task or finds
them applied. A broker that answers only now and then gets retried: what stays
in an in-flight list would wait behind everything newer. At shutdown, first send the
acknowledgements the consumer still holds back.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu.utils.functional import retry_over_time

from ..delivery import restore_shared
from ..reaper import restore_unacked

logger = logging.getLogger(__name__)

#: Seconds a reconnected consumer keeps trying to take its in-flight messages back.
RECONNECT_RESTORE_TIMEOUT = 60.0


class StickyConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """On a broker reconnect, forget gate entries whose messages come back anyway."""

    label = "Sticky gate"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self._started = False

    def start(self, consumer: Any) -> None:
        _survive_restore_on_a_dead_connection(consumer)
        if not self._started:
            self._started = True  # the Sticky step took back its unacked ones at start
            return
        step = getattr(consumer.controller, "sticky", None)
        if step is None or consumer.connection is None:
            return
        node = step.node

        def restore() -> int:
            channel = consumer.connection.default_channel
            return restore_unacked(channel, node.queue) + restore_shared(channel, node.name)

        def failed(exc: Exception, _intervals: Any, retries: int) -> float:
            logger.warning("sticky: could not take back unacked messages yet (%r)", exc)
            return min(0.5 * (retries + 1), 5.0)

        try:
            # Retried: what stays in an in-flight list waits behind everything newer
            # until the node restarts (seen in the nemesis with a flapping broker).
            restored = retry_over_time(  # type: ignore[no-untyped-call]
                restore, Exception, errback=failed, timeout=RECONNECT_RESTORE_TIMEOUT
            )
        except Exception:
            logger.exception(
                "sticky: could not take back unacked messages after a reconnect; they come "
                "back when %s restarts, drains or is reaped",
                node.name,
            )
            return
        if restored:
            logger.info(
                "sticky: took back %d unacked message(s) of %s after a broker reconnect",
                restored,
                node.name,
            )

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


def _survive_restore_on_a_dead_connection(consumer: Any) -> None:
    """Keep a broker cut from stopping the worker (kombu#582, kombu#970).

    When the Redis connection drops, Celery closes the task consumer's channel, and
    kombu's close restores the messages the channel delivered through a client of
    the connection that is already released: ``AttributeError: 'NoneType' object has
    no attribute 'hostname'``, which Celery reports as an unrecoverable error and
    stops the worker (seen in the nemesis runs: one worker in three per broker
    cut). Here that restore gives up instead: the messages stay marked
    unacknowledged, and :meth:`StickyConsumer.start` takes back the direct queue's
    once reconnected (others come back after ``visibility_timeout``, as they would
    had the worker stopped).
    """
    qos = getattr(getattr(getattr(consumer, "task_consumer", None), "channel", None), "qos", None)
    restore = getattr(qos, "restore_unacked", None)
    if qos is None or restore is None or getattr(restore, "sticky_guarded", False):
        return

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return restore(*args, **kwargs)
        except AttributeError:
            logger.warning(
                "sticky: kombu could not restore unacknowledged messages on a closed "
                "connection; they are taken back after the reconnect"
            )
            return []

    guarded.sticky_guarded = True  # type: ignore[attr-defined]
    qos.restore_unacked = guarded
