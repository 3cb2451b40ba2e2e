"""The dead-letter queue: messages no worker can handle, kept for an operator.

A message whose ``sticky`` header is malformed (a bug, another version, a
hand-made or hostile message), or whose arguments cannot even be decoded to find
its key, is poison: retrying it fails the same way, and before this queue existed
it stopped the consumer, or every reaper pass over a dead worker's queue. Where a
message arrives (the gate, the reaper, the drain) it is checked; one that fails
is republished unchanged to ``<sticky_queue_prefix>.dead`` with the reason
(``sticky_dead_reason`` header) and the queue it came from (``sticky_dead_from``),
logged, counted (``celery_sticky_dead_lettered_total``), and acknowledged. The
worker and the reaper go on with the next message.

``celery sticky dead`` lists the queue; ``celery sticky dead --requeue`` sends each
message back through its task's normal routing (the header is rebuilt from the
arguments), leaving in the queue the ones that still cannot be routed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.message import Message

from .. import metrics
from ..context import get_config
from ..wire import (
    DEAD_FROM,
    DEAD_REASON,
    HEADER,
    StickyHeader,
    dead_letter_queue_name,
    direct_queue,
)
from .forwarding import publish_copy

logger = logging.getLogger(__name__)

#: Longest reason kept in the header.
_MAX_REASON = 500


def dead_letter(app: Celery, message: Message, reason: str, *, source: str, where: str) -> None:
    """Move ``message`` to the dead-letter queue with ``reason``, then acknowledge it.

    ``source`` is the queue it was taken from, ``where`` who found it (``gate``,
    ``reaper``, ``drain``: the metric's label).
    """
    # Hook for per-key sequence numbers: once the header carries one, a message
    # dead-lettered here still consumes its key's number (record it as skipped for
    # the producer, or the owner would hold the key's later messages for the gap).
    reason = reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."
    raw = message.headers if isinstance(message.headers, dict) else {}
    headers = {**raw, DEAD_REASON: reason, DEAD_FROM: source}
    queue = dead_letter_queue_name(get_config(app).queue_prefix)
    publish_copy(app, message, headers, queue)
    if not message.acknowledged:
        message.ack()  # type: ignore[no-untyped-call]
    metrics.dead_lettered.labels(where).inc()
    logger.error(
        "sticky: dead-lettered %s[%s] from %s to %s: %s",
        raw.get("task"),
        raw.get("id"),
        source or "?",
        queue,
        reason,
    )


@dataclass(frozen=True)
class DeadLetter:
    """One message in the dead-letter queue, as ``celery sticky dead`` shows it."""

    task: str | None
    task_id: str | None
    reason: str
    source: str
    header: Any  # the raw sticky header, whatever it was

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "id": self.task_id,
            "reason": self.reason,
            "from": self.source,
            "header": _jsonable(self.header),
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value if not isinstance(value, str) else value.encode("utf-8", "replace").decode()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _describe(message: Message) -> DeadLetter:
    headers = message.headers if isinstance(message.headers, dict) else {}
    return DeadLetter(
        task=headers.get("task"),
        task_id=headers.get("id"),
        reason=str(headers.get(DEAD_REASON, "")),
        source=str(headers.get(DEAD_FROM, "")),
        header=headers.get(HEADER),
    )


def _take(app: Celery, limit: int) -> Iterator[tuple[Any, list[Message]]]:
    queue_name = dead_letter_queue_name(get_config(app).queue_prefix)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        bound = direct_queue(queue_name).bind(channel)  # type: ignore[no-untyped-call]
        bound.declare()
        messages: list[Message] = []
        while len(messages) < limit:
            message = bound.get(no_ack=False, accept={"json", "pickle", "yaml", "msgpack"})
            if message is None:
                break
            messages.append(message)
        yield channel, messages


def list_dead(app: Celery, limit: int = 1000) -> list[DeadLetter]:
    """The dead-letter queue's messages, oldest first (they stay in the queue)."""
    found = []
    for _channel, messages in _take(app, limit):
        for message in messages:
            found.append(_describe(message))
        for message in messages:  # back in the same order (each goes to the tail)
            message.requeue()  # type: ignore[no-untyped-call]
    return found


def requeue_dead(app: Celery, limit: int = 1000) -> tuple[list[DeadLetter], list[DeadLetter]]:
    """Send dead letters back through their task's normal routing.

    The sticky header and the dead-letter headers are dropped: the router builds
    a new header from the task's arguments (and the receiving worker does, for a
    queue the caller fixed). Returns ``(requeued, kept)``: a message whose task is
    unknown here or whose arguments cannot be decoded or routed stays in the queue.
    """
    requeued: list[DeadLetter] = []
    kept: list[DeadLetter] = []
    for _channel, messages in _take(app, limit):
        for message in messages:
            letter = _describe(message)
            try:
                queue, headers = _route(app, message)
            except Exception as exc:
                kept.append(letter)
                logger.warning(
                    "sticky: cannot requeue %s[%s]: %s", letter.task, letter.task_id, exc
                )
                message.requeue()  # type: ignore[no-untyped-call]
                continue
            publish_copy(app, message, headers, queue)
            message.ack()  # type: ignore[no-untyped-call]
            requeued.append(letter)
    return requeued, kept


def _route(app: Celery, message: Message) -> tuple[str, dict[str, Any]]:
    """The queue and headers the task's normal routing gives this message."""
    raw = message.headers if isinstance(message.headers, dict) else {}
    name = raw.get("task")
    if not isinstance(name, str) or name not in app.tasks:
        raise ValueError(f"task {name!r} is not registered in this app")
    headers = {k: v for k, v in raw.items() if k not in (HEADER, DEAD_REASON, DEAD_FROM)}
    args, kwargs, _embed = message.decode()  # type: ignore[no-untyped-call]
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise ValueError("the message body is not (args, kwargs, embed)")
    options: dict[str, Any] = {"headers": dict(headers)}
    routed = app.amqp.router.route(options, name, args, kwargs)
    queue = routed.get("queue")
    queue_name = getattr(queue, "name", queue) or app.conf.task_default_queue
    header = StickyHeader.from_headers(routed.get("headers"))
    if header is not None:
        headers = header.with_headers(headers)
    return str(queue_name), headers
