"""The broker side of sticky queues: making them known to an app, and looking into them.

Publishing to a queue name an app does not know makes Celery look it up and, on
the first publish over a connection, declare it (two extra round trips on
Redis): :func:`ensure_queue` adds a direct or affinity queue to the app's known
queues once. :func:`queue_size` and :func:`queued_keys` are read-only looks the
CLI, moves and the reaper take.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..wire import HEADER, direct_queue

if TYPE_CHECKING:
    from celery import Celery


def ensure_queue(app: Celery, name: str) -> None:
    """Make ``name`` a known queue of the app, so publishing to it needs no lookup."""
    queues = app.amqp.queues
    if name not in queues:
        queues.add(direct_queue(name))


def broker_is_amqp(app: Celery) -> bool:
    """Whether the app publishes to an AMQP broker (RabbitMQ), by its broker URL."""
    url = str(app.conf.broker_write_url or app.conf.broker_url or "")
    return url.split(":", 1)[0] in ("amqp", "amqps", "pyamqp")


def connection_options(app: Celery, timeout: float | None) -> dict[str, Any]:
    """``connection_for_write`` options that bound each socket operation (connecting,
    reading, writing) to ``timeout`` seconds; none for None."""
    if timeout is None:
        return {}
    # py-amqp's names and kombu Redis's; each transport reads its own.
    names = ("read_timeout", "write_timeout") if broker_is_amqp(app) else ("socket_timeout",)
    return {"connect_timeout": timeout, "transport_options": {name: timeout for name in names}}


def queue_size(app: Celery, queue: str, timeout: float | None = None) -> int:
    """Messages waiting in ``queue`` (0 when it does not exist).

    ``timeout``: seconds each socket operation may take (connecting, reading,
    writing), after which it raises; None waits as the app's broker settings say,
    which on a connection the network silently dropped can be for ever.
    """
    with app.connection_for_write(**connection_options(app, timeout)) as connection:
        bound = direct_queue(queue).bind(connection.default_channel)  # type: ignore[no-untyped-call]
        try:
            return int(bound.queue_declare(passive=True).message_count)
        except Exception:  # a queue that does not exist (RabbitMQ answers 404)
            return 0


def queued_keys(app: Celery, queue: str, limit: int = 10_000) -> set[tuple[str, str]] | None:
    """Keys with tasks waiting in a direct queue on a Redis broker (not prefetched).

    None when it cannot tell: the broker is not Redis and the queue is not
    empty, or the queue holds more than ``limit`` messages.
    """
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = getattr(channel, "client", None)
        if client is None or not hasattr(channel, "_q_for_pri"):
            return set() if queue_size(app, queue) == 0 else None
        found: set[tuple[str, str]] = set()
        for priority in channel.priority_steps:
            name = channel._q_for_pri(queue, priority)
            if client.llen(name) > limit:
                return None
            for raw in client.lrange(name, 0, limit):
                try:
                    header = json.loads(raw)["headers"][HEADER]
                    found.add((str(header[0]), str(header[1])))
                except (ValueError, KeyError, TypeError, IndexError):
                    continue
        return found
