"""The ``Sticky delivery`` consumer step: every queue of this node over ``BLMOVE`` (Redis).

A thin adapter around :mod:`celery_sticky.worker.delivery`. When reliable delivery
is on (``sticky_reliable_delivery``, a Redis broker), it takes the worker's queues
out of Celery's task consumer and consumes each on a channel of its own (``BLMOVE``
takes from one list), on the same broker connection and event loop, with Celery's
own task handler (so the ``Task.Strategy``, the gate and everything after are
unchanged); Celery's prefetch control sets every channel. Broadcast (fanout)
queues stay on Celery's task consumer, and so do queues added later with
``celery control add_consumer``.

The direct queue's in-flight list is named after the queue; a shared queue's is
this node's own, recorded in ``_sticky.taken.<node>`` before the first ``BLMOVE``
so that whoever finds the node dead gives its messages back.

Consumer steps restart on every broker reconnect: ``stop`` cancels the consumers,
``shutdown`` also closes the channels, which gives back to each queue's head what
it delivered and nobody acknowledged (the gate forgets those, see :mod:`.gate`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import bootsteps
from kombu.messaging import Consumer as _Consumer

from ..delivery import (
    give_back,
    open_channel,
    reliable_delivery_enabled,
    share_prefetch,
    take_shared,
)

logger = logging.getLogger(__name__)

Consumer: Any = _Consumer  # untyped in kombu


def _takes(queue: Any) -> bool:
    """Whether a queue of the task consumer is taken with ``BLMOVE`` (not a broadcast)."""
    exchange = getattr(queue, "exchange", None)
    return getattr(exchange, "type", "direct") != "fanout"


class ReliableDelivery(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consume this node's queues with BLMOVE, each on a channel of its own."""

    label = "Sticky delivery"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.channels: dict[str, Any] = {}  # queue name -> its channel
        self.consumers: list[Any] = []

    def start(self, c: Any) -> None:
        step = getattr(c.controller, "sticky", None)
        if step is None or c.task_consumer is None:
            return
        if not reliable_delivery_enabled(step.node.config, c.connection):
            return
        node = step.node
        taken = [q for q in c.task_consumer.queues if _takes(q)]
        # Before the event loop calls task_consumer.consume(): it never consumes them.
        c.task_consumer.queues = [q for q in c.task_consumer.queues if not _takes(q)]
        previous, self.channels = self.channels, {}
        for queue in taken:
            shared = queue.name != node.queue
            if shared:
                take_shared(c.connection.default_channel, node.name, queue.name)
            channel = open_channel(c.connection, queue.name, node.name if shared else "")
            self.channels[queue.name] = channel
            if queue.name in previous:
                give_back(previous.pop(queue.name), channel)
            share_prefetch(c.qos, channel)
            consumer = Consumer(
                channel,
                queues=[queue],
                on_message=c.create_task_handler(),
                accept=c.app.conf.accept_content,
                on_decode_error=c.on_decode_error,
                auto_declare=False,  # declared with the task consumer's queues
            )
            consumer.consume()
            self.consumers.append(consumer)
        for old in previous.values():  # a queue no longer consumed
            give_back(old, None)
        logger.info(
            "sticky: %s takes its queues with BLMOVE: %s",
            node.name,
            ", ".join(sorted(self.channels)),
        )

    def stop(self, c: Any) -> None:
        consumers, self.consumers = self.consumers, []
        for consumer in consumers:
            with contextlib.suppress(Exception):
                consumer.cancel()

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        channels, self.channels = self.channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                channel.close()
