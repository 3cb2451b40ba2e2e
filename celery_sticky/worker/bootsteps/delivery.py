"""The ``Sticky delivery`` consumer step: this node's direct queue over ``BLMOVE`` (Redis).

A thin adapter around :mod:`celery_sticky.worker.delivery`. When reliable delivery
is on (``sticky_reliable_delivery``, a Redis broker), it takes the direct queue out
of Celery's task consumer and consumes it on a channel of its own, on the same
broker connection and event loop, with Celery's own task handler (so the
``Task.Strategy``, the gate and everything after are unchanged); Celery's prefetch
control sets both channels. Every other queue stays on Celery's task consumer.

Consumer steps restart on every broker reconnect: ``stop`` cancels the consumer,
``shutdown`` also closes the channel, which gives back to the queue's head what it
delivered and nobody acknowledged (the gate forgets those, see :mod:`.gate`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import bootsteps
from kombu.messaging import Consumer as _Consumer

from ...wire import direct_queue
from ..delivery import give_back, open_channel, reliable_delivery_enabled, share_prefetch

logger = logging.getLogger(__name__)

Consumer: Any = _Consumer  # untyped in kombu


class ReliableDelivery(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consume this node's direct queue with BLMOVE, on a channel of its own."""

    label = "Sticky delivery"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.channel: Any = None
        self.consumer: Any = None

    def start(self, c: Any) -> None:
        step = getattr(c.controller, "sticky", None)
        if step is None or c.task_consumer is None:
            return
        if not reliable_delivery_enabled(step.node.config, c.connection):
            return
        queue = step.node.queue
        # Before the event loop calls task_consumer.consume(): it never consumes it.
        c.task_consumer.queues = [q for q in c.task_consumer.queues if q.name != queue]
        previous, self.channel = self.channel, open_channel(c.connection, queue)
        channel = self.channel
        if previous is not None:
            give_back(previous, channel)
        share_prefetch(c.qos, channel)
        self.consumer = Consumer(
            channel,
            queues=[direct_queue(queue)],
            on_message=c.create_task_handler(),
            accept=c.app.conf.accept_content,
            on_decode_error=c.on_decode_error,
            auto_declare=False,  # declared with the task consumer's queues
        )
        self.consumer.consume()
        logger.info("sticky: %s takes its queue %s with BLMOVE", step.node.name, queue)

    def stop(self, c: Any) -> None:
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.cancel()

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        channel, self.channel, self.consumer = self.channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()
