"""Whether a key's missing message may still be on its way: the gate's backlog probe.

A key's owner holds a producer's later number while an earlier one has not arrived
(:mod:`celery_sticky.worker.gate`), for ``sticky_gap_timeout`` seconds, and longer
while the missing message may still come: for as long as messages wait where a
sticky message waits before it reaches its key's owner, up to ``GAP_BACKLOG_FACTOR``
timeouts in all. Those places are the direct queues of the registered workers,
alive or dead (a forward joins the owner's queue at its tail, a dead or draining
worker's queue is moved on by the reaper or the drain, a stale route leaves a
message in a former owner's queue, which forwards it), and, on a Redis broker, the
in-flight lists of the other workers' direct queues (what they took and did not
acknowledge yet: held by their gate, or caught in a frozen worker's socket). This
worker's own in-flight list does not count: it holds the very entries that wait.
Seen in the nemesis: steps forwarded back and forth between restarting workers
reached their owner 40 s after it had declared them lost, while it had nothing
left in its own queue.

What it does not see: messages a RabbitMQ consumer prefetched and has not
acknowledged (a passive declare counts ready messages only), and the shared task
queue (plain tasks keep it busy). A busy cluster makes a truly lost message hold
its key for ``GAP_BACKLOG_FACTOR`` timeouts instead of one.

The probe asks the broker from a thread of its own, never in the consumer's event
loop: a broker that does not answer (a cut or blackholed connection) would stop
the loop, and every key of the worker with it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..producer.queues import broker_is_amqp, connection_options
from ..wire import direct_queue, inflight_key
from .delivery import is_redis_channel

if TYPE_CHECKING:
    from celery import Celery

    from .node import StickyNode

logger = logging.getLogger(__name__)

#: A gap whose missing number may still come waits for at most this many
#: ``sticky_gap_timeout`` in all.
GAP_BACKLOG_FACTOR = 10


def messages_waiting(app: Celery, own_queue: str, others: list[str], timeout: float) -> bool:
    """Whether a message waits in ``own_queue`` or in one of the ``others`` (direct
    queues of other workers), ready or (Redis) in their in-flight lists. Each socket
    operation may take ``timeout`` seconds."""
    amqp = broker_is_amqp(app)
    with app.connection_for_write(**connection_options(app, timeout)) as connection:
        channel = connection.default_channel
        for queue in (own_queue, *others):
            try:
                bound: Any = direct_queue(queue).bind(channel)  # type: ignore[no-untyped-call]
                if bound.queue_declare(passive=True).message_count:
                    return True
            except Exception:  # a queue the broker does not know (an empty one on Redis)
                if amqp:  # RabbitMQ's 404 closed the channel it was asked on
                    channel = connection.channel()
        if others and is_redis_channel(channel) and not channel.global_keyprefix:
            with channel.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                for queue in others:
                    pipe.llen(inflight_key(queue))
                return any(pipe.execute())
    return False


class BacklogProbe:
    """Whether messages wait where a key's missing one may be (see the module doc),
    asked in a thread of its own: about once a second while the gate keeps asking,
    asleep otherwise. An answer older than ``STALE`` seconds, or none yet, counts as
    yes (the key waits on, within its bound)."""

    INTERVAL = 1.0
    STALE = 5.0

    def __init__(self, app: Celery, node: StickyNode) -> None:
        self.app = app
        self.node = node
        self._answer = True
        self._answered = float("-inf")
        self._wanted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sticky-backlog", daemon=True)
        self._thread.start()

    def ask(self, now: float) -> bool:
        self._wanted.set()
        return self._answer or now - self._answered > self.STALE

    def _others(self) -> list[str]:
        """The direct queues of every other registered worker, alive or not."""
        return sorted(
            {w.queue for w in self.node.store.workers() if w.name != self.node.name and w.queue}
        )

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                # Bounded: a connection the network dropped silently (a blackholed
                # broker) once held this thread for good, and every answer after it
                # was stale, so each gap waited GAP_BACKLOG_FACTOR timeouts.
                answer = messages_waiting(self.app, self.node.queue, self._others(), self.STALE)
            except Exception:
                logger.debug("sticky: could not look into the queues", exc_info=True)
                answer = True
            self._answer, self._answered = answer, time.monotonic()
            time.sleep(self.INTERVAL)
