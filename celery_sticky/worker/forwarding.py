"""Forwarding: pass a message that reached the wrong worker on to the key's owner.

Happens when a producer routed under a stale cached lease, or when a queue fixed
by the caller delivered a task of a key owned elsewhere. The message is
republished unchanged but for its ``sticky`` header (owner's epoch, one more
hop), then acknowledged: at least once, never lost.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.message import Message

from .. import metrics
from ..errors import ForwardingError
from ..producer.queues import ensure_queue
from ..wire import StickyHeader, direct_queue

logger = logging.getLogger(__name__)

# Message properties worth carrying over; the rest belong to the transport.
#: Seconds a publish waits for the broker's confirmation (RabbitMQ) before it counts
#: the connection as broken.
CONFIRM_TIMEOUT = 30.0
_PROPERTIES = ("correlation_id", "reply_to", "priority", "delivery_mode", "expiration")


def forward(
    app: Celery, message: Message, header: StickyHeader, owner_queue: str, epoch: int, max_hops: int
) -> None:
    """Republish ``message`` to ``owner_queue`` and acknowledge the original.

    Raises :class:`ForwardingError` (after failing the task visibly and acking)
    when the message has already travelled ``max_hops`` times under one lease.

    Only hops under one lease count: a forward to an owner under a newer epoch than
    the message carries follows a real change of owner (a take-over, a move), and
    starts the count again. Under churn (an owner paused and reaped while a message
    travelled to it, then its successor drained) a message may legitimately travel
    more often than ``max_hops``; failing it would lose a step. Workers that disagree
    about one lease (a routing loop) still stop at ``max_hops``.
    """
    task_id = (message.headers or {}).get("id")
    task_name = (message.headers or {}).get("task")
    if epoch > header.epoch:
        header = header._replace(hops=0)
    if header.hops >= max_hops:
        exc = ForwardingError(
            f"task {task_name}[{task_id}] of key {header.workflow}:{header.key} was forwarded "
            f"{header.hops} times (sticky_max_hops={max_hops}); last owner queue {owner_queue}"
        )
        task = app.tasks.get(task_name)
        if task is not None and task_id:
            task.backend.mark_as_failure(task_id, exc)
        message.ack()  # type: ignore[no-untyped-call]
        raise exc
    moved = header._replace(epoch=epoch, hops=header.hops + 1)
    republish(app, message, moved, owner_queue)
    metrics.forwarded.inc()
    logger.info(
        "sticky: forwarded %s[%s] of %s:%s to %s (hop %d)",
        task_name,
        task_id,
        header.workflow,
        header.key,
        owner_queue,
        moved.hops,
    )


def republish(app: Celery, message: Message, header: StickyHeader | None, queue_name: str) -> None:
    """Publish ``message`` unchanged (but for its sticky header) to a queue, then ack it."""
    headers = dict(message.headers or {})
    if header is not None:
        headers = header.with_headers(headers)
    publish_copy(app, message, headers, queue_name)
    message.ack()  # type: ignore[no-untyped-call]


def publish_copy(app: Celery, message: Message, headers: dict[str, Any], queue_name: str) -> None:
    """Publish ``message``'s body with ``headers`` to ``queue_name`` (the original stays)."""
    properties: dict[str, Any] = {
        name: message.properties[name] for name in _PROPERTIES if message.properties.get(name)
    }
    ensure_queue(app, queue_name)
    queue = direct_queue(queue_name)
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            retry=True,
            # With publisher confirms (RabbitMQ, see confirm_publishes): how long to
            # wait for one before the connection counts as broken and is retried.
            confirm_timeout=CONFIRM_TIMEOUT,
            **properties,
        )
